"""Triton kernels: the purifiers' update steps with the noise drawn in the kernel, and GroupNorm+SiLU.

Import only where triton is installed (`triton_support.available()` says
whether the kernels can run). Every wrapper has the signature of its
`reference` (or `philox`) twin plus an optional ``out=`` buffer, and follows
the noise contract of `philox.py` to the bit in the integer stream:

* ``tl.philox(seed, c0, c1, c2, c3, 10)`` splits the 64-bit seed into
  ``k0 = seed & 0xFFFFFFFF`` and ``k1 = seed >> 32`` (32-bit counters) and
  raises the key after each round, which is our "raise before rounds 2..10";
  its round (``c0 = hi(M1*c2)^c1^k0, c1 = lo(M1*c2), c2 = hi(M0*c0)^c3^k1,
  c3 = lo(M0*c0)``) is Random123's, as in `philox.philox4x32`. The tests
  check this against the golden vectors rather than trusting it.
* counters are uint32: ``(block, step, i & 0xFFFFFFFF, stream | (i >> 32) << 16)``.
* each program owns ``BQ`` Philox blocks (``4*BQ`` consecutive elements of one
  sample), so the four words of a call become four adjacent outputs and the
  loads and stores stay contiguous.

`triton.jit` decides when a function is decorated whether it is compiled (CUDA)
or interpreted (``TRITON_INTERPRET=1``, CPU tensors): for Triton's own helpers
(``tl.zeros``, ``tl.sum``, ``tl.philox``) that is when triton is first
imported, so the variable must be set before anything imports triton.
`INTERPRETED` records the choice; the wrappers refuse tensors it cannot serve.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import philox


@triton.jit
def _probe():
    pass


# Ask triton.jit itself (the choice it makes for this module's kernels and made
# for Triton's helpers), rather than re-reading the environment.
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"
if INTERPRETED != (type(tl.zeros).__name__ == "InterpretedFunction"):
    raise ImportError(
        "TRITON_INTERPRET changed between the first import of triton and this import: "
        "interpreted kernels cannot call compiled Triton helpers (or the reverse); set it before importing triton"
    )

_BQ = 256  # Philox blocks per program: 1024 elements
# No FMA contraction: the kernels round after every multiply and add, as the
# reference's separate torch ops do, whatever the Triton version's default
# (3.9 contracts unless told, 3.10 will not).
_OPTS = {"enable_fp_fusion": False}


@triton.jit
def _philox_block(seed, blk, step, idx, stream):
    """The four uint32 words of Philox blocks `blk` (uint32 [BQ]) of sample `idx` (int64 scalar)."""
    zero = tl.zeros(blk.shape, tl.uint32)
    c1 = zero + step.to(tl.uint32)
    c2 = zero + (idx & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + (((idx >> 32) << 16) | stream).to(tl.uint32)
    return tl.philox(seed, blk, c1, c2, c3, 10)


@triton.jit
def _uniform(w):
    # Top 23 bits + 0.5, times 2**-23: exact in fp32 and strictly inside (0, 1).
    return ((w >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def _interleave4(a, b, c, d):
    """[BQ] x4 -> [4*BQ] with a, b, c, d at offsets 4k+0, 4k+1, 4k+2, 4k+3."""
    # join(join(a, c), join(b, d))[k, i, j] = (a, b; c, d)[i][j], so k-major
    # flattening gives a, b, c, d at 4k + 2i + j.
    x = tl.join(tl.join(a, c), tl.join(b, d))
    return tl.reshape(x, (4 * a.shape[0],))


@triton.jit
def _box_muller(w_a, w_b):
    # On NVIDIA, tl.log/cos/sin compile to libdevice's accurate logf/cosf/sinf,
    # not to approximate instructions (test_kernels_compile_for_cuda checks the
    # PTX); sqrt_rn is the IEEE square root (tl.sqrt may be approximate).
    # The interpreter computes them with numpy: a few ulp from torch's.
    radius = tl.sqrt_rn(-2.0 * tl.log(_uniform(w_a)))
    angle = 6.283185307179586 * _uniform(w_b)  # 2*pi, rounded to fp32 as torch does
    return radius * tl.cos(angle), radius * tl.sin(angle)


@triton.jit
def _normals(seed, stream, step, idx_ptr, numel, BQ: tl.constexpr):
    """This program's 4*BQ standard normals, their flat offsets in the batch, and the mask."""
    b = tl.program_id(0)  # sample on axis 0: CUDA allows 2**31 - 1 programs there
    blk = tl.program_id(1) * BQ + tl.arange(0, BQ)
    idx = tl.load(idx_ptr + b)  # int64 global sample index
    w0, w1, w2, w3 = _philox_block(seed, blk.to(tl.uint32), step, idx, stream)
    z0, z1 = _box_muller(w0, w1)
    z2, z3 = _box_muller(w2, w3)
    z = _interleave4(z0, z1, z2, z3)
    elem = tl.program_id(1) * (4 * BQ) + tl.arange(0, 4 * BQ)
    offs = b.to(tl.int64) * numel + elem
    return z, offs, elem < numel


# The seed, step and stream change between launches: no new compilation when one
# of them happens to be 1 or a multiple of 16 (Triton specializes such ints).
_NO_SPEC = ["seed", "stream", "step"]


@triton.jit(do_not_specialize=_NO_SPEC)
def _uint32_kernel(idx_ptr, out_ptr, seed, stream, step, num_blocks, BQ: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1) * BQ + tl.arange(0, BQ)
    idx = tl.load(idx_ptr + b)
    w0, w1, w2, w3 = _philox_block(seed, blk.to(tl.uint32), step, idx, stream)
    # uint32 -> int64 zero-extends, like the reference's int64 words.
    w = _interleave4(w0.to(tl.int64), w1.to(tl.int64), w2.to(tl.int64), w3.to(tl.int64))
    word = tl.program_id(1) * (4 * BQ) + tl.arange(0, 4 * BQ)
    tl.store(out_ptr + b.to(tl.int64) * (4 * num_blocks) + word, w, mask=word < 4 * num_blocks)


@triton.jit(do_not_specialize=_NO_SPEC)
def _normal_kernel(idx_ptr, out_ptr, seed, stream, step, numel, BQ: tl.constexpr):
    z, offs, mask = _normals(seed, stream, step, idx_ptr, numel, BQ)
    tl.store(out_ptr + offs, z, mask=mask)


@triton.jit(do_not_specialize=_NO_SPEC)
def _langevin_kernel(x_ptr, g_ptr, idx_ptr, out_ptr, drift, noise_scale, seed, stream, step, numel,
                     BQ: tl.constexpr):
    z, offs, mask = _normals(seed, stream, step, idx_ptr, numel, BQ)
    x = tl.load(x_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)  # bf16/fp16 gradients upcast here
    tl.store(out_ptr + offs, x - drift * g + noise_scale * z, mask=mask)


@triton.jit(do_not_specialize=_NO_SPEC)
def _forward_kernel(x_ptr, idx_ptr, out_ptr, a, b, seed, stream, step, numel, BQ: tl.constexpr):
    z, offs, mask = _normals(seed, stream, step, idx_ptr, numel, BQ)
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, a * x + b * z, mask=mask)


@triton.jit(do_not_specialize=_NO_SPEC)
def _reverse_kernel(xt_ptr, eps_ptr, idx_ptr, out_ptr, recip_sqrt_abar, sqrt_recip_abar_m1, mean_x0, mean_xt,
                    sigma, seed, stream, step, numel, CLIP: tl.constexpr, NOISE: tl.constexpr, BQ: tl.constexpr):
    if NOISE:
        z, offs, mask = _normals(seed, stream, step, idx_ptr, numel, BQ)
    else:  # t == 0: the mean only, no Philox work
        elem = tl.program_id(1) * (4 * BQ) + tl.arange(0, 4 * BQ)
        offs = tl.program_id(0).to(tl.int64) * numel + elem
        mask = elem < numel
    xt = tl.load(xt_ptr + offs, mask=mask)
    eps = tl.load(eps_ptr + offs, mask=mask).to(tl.float32)
    x0 = recip_sqrt_abar * xt - sqrt_recip_abar_m1 * eps
    if CLIP:
        x0 = tl.clamp(x0, -1.0, 1.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch.clamp
    y = mean_x0 * x0 + mean_xt * xt
    if NOISE:
        y = y + sigma * z
    tl.store(out_ptr + offs, y, mask=mask)


# ---------------------------------------------------------------- host side


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton "
            "is first imported in the process (CPU tensors, interpreter)"
        )


def _check_noise_args(indices: torch.Tensor, seed: int, stream: int, step: int) -> None:
    # Same refusals as the reference.
    philox.seed_to_key(seed)
    philox.check_counter_args(stream, step, indices)


def _prepare_indices(indices: torch.Tensor, device: torch.device, batch: int) -> torch.Tensor:
    idx = indices.reshape(-1).to(device=device, dtype=torch.int64).contiguous()
    if idx.numel() != batch:
        raise ValueError(f"{idx.numel()} indices for a batch of {batch}")
    return idx


def _state(x: torch.Tensor) -> torch.Tensor:
    """fp32, contiguous NCHW (a channels_last input is copied: elements are numbered in NCHW order)."""
    return x.to(torch.float32).contiguous()


def _out_buffer(out: torch.Tensor | None, shape, device, dtype=torch.float32) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, device=device, dtype=dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}")
    return out


def _grid(batch: int, num_blocks: int):
    return (batch, triton.cdiv(num_blocks, _BQ))


def _step_buffers(x: torch.Tensor, indices: torch.Tensor, seed: int, stream: int, step: int,
                  out: torch.Tensor | None):
    """What every update step launches with: the fp32 state, its indices, the output and the per-sample numel."""
    _check_device(x)
    _check_noise_args(indices, seed, stream, step)
    xs = _state(x)
    idx = _prepare_indices(indices, x.device, x.shape[0])
    out = _out_buffer(out, x.shape, x.device)
    numel = xs[0].numel() if xs.shape[0] else 0
    return xs, idx, out, numel


def random_uint32(indices: torch.Tensor, *, seed: int, stream: int, step: int, num_blocks: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, num_blocks, 4) int64 tensor of uint32 words, as `philox.random_uint32`."""
    _check_device(indices)
    _check_noise_args(indices, seed, stream, step)
    idx = _prepare_indices(indices, indices.device, indices.numel())
    out = _out_buffer(out, (idx.numel(), num_blocks, 4), idx.device, torch.int64)
    if idx.numel() and num_blocks:
        _uint32_kernel[_grid(idx.numel(), num_blocks)](idx, out, seed, stream, step, num_blocks, BQ=_BQ, **_OPTS)
    return out


def normal_noise(indices: torch.Tensor, sample_shape: tuple[int, ...], *, seed: int, stream: int, step: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Standard normals of shape ``(len(indices), *sample_shape)``, float32, as `philox.normal_noise`."""
    _check_device(indices)
    _check_noise_args(indices, seed, stream, step)
    idx = _prepare_indices(indices, indices.device, indices.numel())
    out = _out_buffer(out, (idx.numel(), *sample_shape), idx.device)
    numel = math.prod(sample_shape)
    if idx.numel() and numel:
        _normal_kernel[_grid(idx.numel(), (numel + 3) // 4)](idx, out, seed, stream, step, numel, BQ=_BQ, **_OPTS)
    return out


def langevin_update(x: torch.Tensor, grad: torch.Tensor, *, drift: float, noise_scale: float,
                    indices: torch.Tensor, seed: int, stream: int, step: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``x - drift * grad + noise_scale * n`` in fp32 (grad may be bf16/fp16), as `reference.langevin_update`.

    ``out=x`` (x fp32 and contiguous) updates x in place: each element is read before it is written.
    """
    xs, idx, out, numel = _step_buffers(x, indices, seed, stream, step, out)
    if grad.shape != x.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != x shape {tuple(x.shape)}")
    g = grad.contiguous()
    if xs.numel():
        _langevin_kernel[_grid(xs.shape[0], (numel + 3) // 4)](
            xs, g, idx, out, float(drift), float(noise_scale), seed, stream, step, numel, BQ=_BQ, **_OPTS)
    return out


def ddpm_forward_noise(x0: torch.Tensor, *, sqrt_alpha_bar: float, sqrt_one_minus_alpha_bar: float,
                       indices: torch.Tensor, seed: int, stream: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """``sqrt(abar) x0 + sqrt(1 - abar) n`` with noise step 0, as `reference.ddpm_forward_noise`."""
    xs, idx, out, numel = _step_buffers(x0, indices, seed, stream, 0, out)
    if xs.numel():
        _forward_kernel[_grid(xs.shape[0], (numel + 3) // 4)](
            xs, idx, out, float(sqrt_alpha_bar), float(sqrt_one_minus_alpha_bar), seed, stream, 0, numel, BQ=_BQ, **_OPTS)
    return out


def ddpm_reverse_step(x_t: torch.Tensor, eps_pred: torch.Tensor, *, t: int, coefs, indices: torch.Tensor,
                      seed: int, stream: int, clip_x0: bool = True,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """One ancestral step t -> t-1 (noise step t, none at t == 0), as `reference.ddpm_reverse_step`."""
    xs, idx, out, numel = _step_buffers(x_t, indices, seed, stream, t, out)
    if eps_pred.shape != x_t.shape:
        raise ValueError(f"eps_pred shape {tuple(eps_pred.shape)} != x_t shape {tuple(x_t.shape)}")
    eps = eps_pred.contiguous()
    if xs.numel():
        _reverse_kernel[_grid(xs.shape[0], (numel + 3) // 4)](
            xs, eps, idx, out, coefs.recip_sqrt_abar, coefs.sqrt_recip_abar_m1, coefs.mean_x0, coefs.mean_xt,
            coefs.sigma, seed, stream, t, numel, CLIP=bool(clip_x0), NOISE=t != 0, BQ=_BQ, **_OPTS)
    return out


# ---------------------------------------------------------------- GroupNorm + SiLU


@triton.jit
def _group_norm_silu_kernel(x_ptr, w_ptr, b_ptr, y_ptr, HW, CPG, groups, eps, BLOCK: tl.constexpr):
    """One program per (sample, group): in NCHW that group is one contiguous run of CPG*HW elements."""
    pid = tl.program_id(0)
    g = pid % groups
    size = CPG * HW
    base = pid.to(tl.int64) * size
    # Two passes for the statistics (mean, then centred squares), in fp32:
    # a one-pass sum of squares loses digits when |mean| >> std.
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, size, BLOCK):
        o = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + base + o, mask=o < size, other=0.0).to(tl.float32)
    mean = tl.sum(acc, 0) / size
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, size, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < size
        d = tl.where(m, tl.load(x_ptr + base + o, mask=m, other=0.0).to(tl.float32) - mean, 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt_rn(tl.sum(acc, 0) / size + eps)
    for start in range(0, size, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < size
        c = g * CPG + o // HW
        w = tl.load(w_ptr + c, mask=m, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + base + o, mask=m, other=0.0).to(tl.float32)
        h = (x - mean) * rstd * w + b
        y = h * tl.sigmoid(h)
        tl.store(y_ptr + base + o, y.to(y_ptr.dtype.element_ty), mask=m)


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                    eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(group_norm(x))`` for x of shape (N, C, ...), in x's dtype, statistics in fp32.

    The result is contiguous (NCHW), whatever x's memory format.
    """
    _check_device(x)
    if x.dim() < 2 or x.shape[1] % groups:
        raise ValueError(f"groups={groups} must divide the channels of x with shape {tuple(x.shape)}")
    xs = x.contiguous()
    n, c = xs.shape[:2]
    hw = xs[0, 0].numel() if xs.numel() else 0
    if weight is None:
        weight = torch.ones(c, device=x.device, dtype=x.dtype)
    if bias is None:
        bias = torch.zeros(c, device=x.device, dtype=x.dtype)
    out = _out_buffer(out, xs.shape, x.device, x.dtype)
    size = (c // groups) * hw
    if xs.numel():
        block = min(triton.next_power_of_2(size), 4096)
        _group_norm_silu_kernel[(n * groups,)](
            xs, weight.contiguous(), bias.contiguous(), out, hw, c // groups, groups, float(eps), BLOCK=block, **_OPTS)
    return out
