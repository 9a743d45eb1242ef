"""Triton kernels against the noise contract and the reference steps, on CPU in Triton's interpreter.

Run by `tests/test_kernels_triton.py` in a fresh process (not collected by
itself: its name does not start with ``test_``). To run it by hand:
``pytest tests/kernels_triton_cases.py``.

Why a fresh process: `triton.jit` decides once, when a function is decorated,
whether it is compiled for a GPU or interpreted with numpy. That holds for our
kernels and for Triton's own helpers (``tl.zeros``, ``tl.sum``, ``tl.philox``
are ``@triton.jit`` functions decorated when triton is first imported), and an
interpreted kernel cannot call a compiled helper. So TRITON_INTERPRET=1 must be
set before *triton* is imported anywhere in the process, and in a shared
pytest session something else may import it first (diffusers, torch.compile).
This module sets it before its own imports and checks that it took.

Shapes are small: the interpreter is ~100x slower than torch.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything below can import triton

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from puregen.kernels import philox  # noqa: E402
from puregen.kernels import reference as ref  # noqa: E402
from tests.test_philox import GOLDEN_INDICES, GOLDEN_NORMALS, GOLDEN_WORDS  # noqa: E402

NAN = float("nan")


@pytest.fixture(scope="module")
def tk():
    import triton.language as tl

    from puregen.kernels import triton_kernels, triton_support

    assert type(tl.zeros).__name__ == "InterpretedFunction", (
        "triton was imported before TRITON_INTERPRET=1 was set: run this file in a fresh process"
    )
    assert triton_kernels.INTERPRETED
    assert triton_support.available() and triton_support.unavailable_reason() is None
    return triton_kernels


def nan_like(shape, dtype=torch.float32):
    """An output buffer that fails the comparison wherever the kernel does not write."""
    return torch.full(shape, NAN, dtype=dtype)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# Indices: B=1, B=3, one above 2**32 and the largest allowed (2**48 - 1), a shuffled batch.
INDEX_SETS = [[0], [5, (1 << 33) + 7, 2], [philox.MAX_SAMPLE_INDEX, 1 << 32, 12345, 0, 17]]


def test_integer_stream_matches_golden_vectors(tk):
    out = torch.full((4, 2, 4), -1, dtype=torch.int64)  # -1 is no uint32: unwritten words fail
    words = tk.random_uint32(torch.tensor(GOLDEN_INDICES), seed=2024, stream=3, step=5, num_blocks=2, out=out)
    assert words.tolist() == GOLDEN_WORDS


@pytest.mark.parametrize("seed", [0, 2024, (1 << 32) + 5, (1 << 63) + 11, (1 << 64) - 1])
@pytest.mark.parametrize("step", [0, 1, (1 << 31) + 3, (1 << 32) - 1])
def test_integer_stream_bit_identical_to_reference(tk, seed, step):
    # 700 blocks: three programs per sample, the last one partly masked.
    idx = torch.tensor(INDEX_SETS[2])
    out = torch.full((len(idx), 700, 4), -1, dtype=torch.int64)
    got = tk.random_uint32(idx, seed=seed, stream=philox.MAX_STREAM, step=step, num_blocks=700, out=out)
    assert torch.equal(got, philox.random_uint32(idx, seed=seed, stream=philox.MAX_STREAM, step=step, num_blocks=700))


def test_golden_normals(tk):
    n = tk.normal_noise(torch.tensor(GOLDEN_INDICES), (2, 2, 2), seed=2024, stream=1, step=0, out=nan_like((4, 2, 2, 2)))
    # Same float32 formula; numpy's log/cos/sin vs torch's differ by a few ulp
    # (measured max 2.4e-7): the tolerance of tests/test_philox.py.
    torch.testing.assert_close(n.reshape(4, -1), torch.tensor(GOLDEN_NORMALS), rtol=4e-7, atol=4e-7)


@pytest.mark.parametrize("indices", INDEX_SETS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 33, 33)])  # 1, 105 (not a multiple of 4), 2178 (3 programs)
def test_normals_match_reference(tk, indices, shape):
    idx = torch.tensor(indices)
    got = tk.normal_noise(idx, shape, seed=77, stream=philox.STREAM_EBM, step=3, out=nan_like((len(idx), *shape)))
    want = philox.normal_noise(idx, shape, seed=77, stream=philox.STREAM_EBM, step=3)
    # a few ulp (fp32 ulp at 1.0 is 1.2e-7; measured max 4.8e-7 at |z| ~ 4)
    torch.testing.assert_close(got, want, rtol=4e-7, atol=4e-7)


def test_noise_depends_only_on_index(tk):
    idx = torch.tensor(INDEX_SETS[2])
    full = tk.normal_noise(idx, (3, 4, 5), seed=1, stream=1, step=2)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(tk.normal_noise(idx[perm], (3, 4, 5), seed=1, stream=1, step=2), full[perm])
    assert torch.equal(tk.normal_noise(idx[2:3], (3, 4, 5), seed=1, stream=1, step=2), full[2:3])


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("indices", INDEX_SETS[:2])
def test_langevin_update_matches_reference(tk, grad_dtype, indices):
    idx = torch.tensor(indices)
    b = len(idx)
    x, grad = randn(b, 3, 5, 7, seed=1), randn(b, 3, 5, 7, seed=2, scale=3.0).to(grad_dtype)
    kw = dict(drift=0.013, noise_scale=0.11, indices=idx, seed=2024, stream=philox.STREAM_EBM, step=41)
    got = tk.langevin_update(x, grad, out=nan_like(x.shape), **kw)
    # noise a few ulp apart, times noise_scale, plus fp32 rounding of |x| ~ 4
    torch.testing.assert_close(got, ref.langevin_update(x, grad, **kw), rtol=1e-6, atol=1e-6)


def test_langevin_update_in_place(tk):
    # out=x: every program reads its elements before writing the same ones.
    x, grad = randn(3, 2, 33, 17, seed=11), randn(3, 2, 33, 17, seed=12)  # 1122 elements: two programs a sample
    kw = dict(drift=0.02, noise_scale=0.3, indices=torch.tensor([3, 1, 2]), seed=8, stream=1, step=5)
    want = ref.langevin_update(x, grad, **kw)
    got = tk.langevin_update(x, grad, out=x, **kw)
    assert got.data_ptr() == x.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # as above


def test_langevin_update_channels_last(tk):
    # Elements are numbered in NCHW order whatever the memory format.
    x, grad = randn(3, 4, 6, 5, seed=3), randn(3, 4, 6, 5, seed=4)
    kw = dict(drift=0.5, noise_scale=0.2, indices=torch.tensor([9, 1, 4]), seed=5, stream=1, step=0)
    cl = torch.channels_last
    got = tk.langevin_update(x.contiguous(memory_format=cl), grad.contiguous(memory_format=cl), **kw)
    torch.testing.assert_close(got, ref.langevin_update(x, grad, **kw), rtol=1e-6, atol=1e-6)  # as above


@pytest.mark.parametrize("indices", INDEX_SETS[:2])
def test_ddpm_forward_noise_matches_reference(tk, indices):
    idx = torch.tensor(indices)
    x0 = randn(len(idx), 1, 9, 7, seed=5).clamp(-1, 1)
    kw = dict(sqrt_alpha_bar=0.83, sqrt_one_minus_alpha_bar=math.sqrt(1 - 0.83**2), indices=idx, seed=11,
              stream=philox.STREAM_DDPM_FORWARD)
    got = tk.ddpm_forward_noise(x0, out=nan_like(x0.shape), **kw)
    torch.testing.assert_close(got, ref.ddpm_forward_noise(x0, **kw), rtol=1e-6, atol=1e-6)  # few-ulp noise * 0.56


@pytest.mark.parametrize("t", [0, 1, 57])
@pytest.mark.parametrize("clip_x0", [True, False])
@pytest.mark.parametrize("eps_dtype", [torch.float32, torch.bfloat16])
def test_ddpm_reverse_step_matches_reference(tk, t, clip_x0, eps_dtype):
    idx = torch.tensor(INDEX_SETS[1])
    x_t = randn(3, 3, 5, 7, seed=6, scale=1.5)  # x0 leaves [-1, 1], so the clip matters
    eps = randn(3, 3, 5, 7, seed=7).to(eps_dtype)
    coefs = ref.ReverseCoefficients(1.25, 0.75, 0.31, 0.64, 0.0 if t == 0 else 0.17)
    kw = dict(t=t, coefs=coefs, indices=idx, seed=99, stream=philox.STREAM_DDPM_REVERSE, clip_x0=clip_x0)
    got = tk.ddpm_reverse_step(x_t, eps, out=nan_like(x_t.shape), **kw)
    torch.testing.assert_close(got, ref.ddpm_reverse_step(x_t, eps, **kw), rtol=1e-6, atol=1e-6)  # as Langevin


def test_ddpm_reverse_step_keeps_nan(tk):
    # A NaN from the model must surface, not be clipped to +-1 (torch.clamp keeps NaN).
    x_t, eps = randn(2, 1, 3, 4, seed=9, scale=3.0), randn(2, 1, 3, 4, seed=10)
    eps[1, 0, 2, 1] = NAN
    kw = dict(t=3, coefs=ref.ReverseCoefficients(1.25, 0.75, 0.31, 0.64, 0.17), indices=torch.tensor([4, 8]), seed=1,
              stream=philox.STREAM_DDPM_REVERSE)
    got = tk.ddpm_reverse_step(x_t, eps, **kw)
    assert got.isnan().sum() == 1 and got[1, 0, 2, 1].isnan()
    torch.testing.assert_close(got, ref.ddpm_reverse_step(x_t, eps, **kw), rtol=1e-6, atol=1e-6, equal_nan=True)


def test_empty_batch(tk):
    none = torch.zeros(0, dtype=torch.int64)
    assert tk.normal_noise(none, (3, 4), seed=0, stream=1, step=0).shape == (0, 3, 4)
    x = torch.zeros(0, 1, 2, 2)
    assert tk.langevin_update(x, x, drift=0.1, noise_scale=0.1, indices=none, seed=0, stream=1, step=0).shape == x.shape


def test_bad_arguments_are_refused(tk):
    x = torch.zeros(2, 1, 2, 2)
    kw = dict(drift=0.1, noise_scale=0.1, seed=0, stream=1, step=0)
    with pytest.raises(ValueError):
        tk.langevin_update(x, x, indices=torch.tensor([0, -1]), **kw)
    with pytest.raises(ValueError):
        tk.langevin_update(x, x, indices=torch.tensor([0, 1 << 48]), **kw)
    with pytest.raises(ValueError):
        tk.langevin_update(x, x, indices=torch.tensor([0]), **kw)  # 1 index for 2 samples
    with pytest.raises(ValueError):
        tk.langevin_update(x, x, indices=torch.tensor([0, 1]), out=torch.empty(2, 4), **kw)
    with pytest.raises(ValueError):
        tk.normal_noise(torch.tensor([0]), (4,), seed=1 << 64, stream=1, step=0)
    with pytest.raises(ValueError):
        tk.normal_noise(torch.tensor([0]), (4,), seed=0, stream=1 << 16, step=0)


def _gn_inputs(dtype, shape=(2, 8, 6, 5), groups=4, seed=8):
    x = (randn(*shape, seed=seed, scale=3.0) + 1.0).to(dtype)  # a non-zero mean: tests the centred variance
    w = randn(shape[1], seed=seed + 1).to(dtype)
    b = randn(shape[1], seed=seed + 2).to(dtype)
    return x, w, b, groups


def _gn_oracle(x, w, b, groups, eps=1e-5):
    """fp32 GroupNorm + SiLU of the (possibly rounded) inputs."""
    return F.silu(F.group_norm(x.float(), groups, w.float(), b.float(), eps))


@pytest.mark.parametrize("shape,groups", [((2, 8, 6, 5), 4), ((1, 4, 48, 48), 2), ((3, 6, 1, 1), 3)])
def test_group_norm_silu_fp32(tk, shape, groups):
    # (1, 4, 48, 48) with 2 groups: 4608 elements per group, two chunks of the kernel's loop.
    x, w, b, g = _gn_inputs(torch.float32, shape, groups)
    got = tk.group_norm_silu(x, w, b, g, 1e-5, out=nan_like(x.shape))
    torch.testing.assert_close(got, F.silu(F.group_norm(x, g, w, b, 1e-5)), rtol=1e-5, atol=1e-5)  # fp32 sums in another order


def test_group_norm_silu_channels_last_and_no_affine(tk):
    x, _, _, g = _gn_inputs(torch.float32)
    got = tk.group_norm_silu(x.contiguous(memory_format=torch.channels_last), None, None, g, 1e-6)
    torch.testing.assert_close(got, F.silu(F.group_norm(x, g, eps=1e-6)), rtol=1e-5, atol=1e-5)  # as fp32


@pytest.mark.parametrize("dtype,ulp", [(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)])
def test_group_norm_silu_half_precision(tk, dtype, ulp):
    x, w, b, g = _gn_inputs(dtype)
    got = tk.group_norm_silu(x, w, b, g, 1e-5, out=nan_like(x.shape, dtype))
    assert got.dtype == dtype
    # Statistics in fp32, one rounding at the end: within one ulp (relative
    # spacing `ulp`) of the fp32 result on the same inputs.
    torch.testing.assert_close(got.float(), _gn_oracle(x, w, b, g), rtol=ulp, atol=1e-5)
    # torch's own half-precision path rounds twice (after the norm and after
    # SiLU): two ulp from it.
    torch.testing.assert_close(got.float(), F.silu(F.group_norm(x, g, w, b, 1e-5)).float(), rtol=2 * ulp, atol=1e-5)


def test_group_norm_silu_op_on_cpu_and_under_compile(tk):
    from puregen.kernels.group_norm_silu import group_norm_silu, group_norm_silu_op

    norm = torch.nn.GroupNorm(4, 8, eps=1e-5)
    x, w, b, _ = _gn_inputs(torch.float32)
    with torch.no_grad():
        norm.weight.copy_(w)
        norm.bias.copy_(b)
        want = F.silu(norm(x))
        assert torch.equal(group_norm_silu(x, norm), want)  # CPU: the plain torch implementation
        # fake (meta) implementation: traced by torch.compile without a graph break
        compiled = torch.compile(lambda t: group_norm_silu(t, norm) * 2.0, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), want * 2.0, rtol=0, atol=0)  # the same CPU kernel runs
    torch.library.opcheck(group_norm_silu_op, (x, w, b, 4, 1e-5))


# Compiled (not interpreted) for an H100 ahead of time, in a subprocess since
# this process's kernels are interpreted: no GPU needed, ptxas ships with triton.
_AOT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from puregen.kernels import triton_kernels as tk

assert not tk.INTERPRETED
STEP = {"seed": "u64", "stream": "i32", "step": "i64", "numel": "i32", "BQ": "constexpr"}
cases = [
    (tk._normal_kernel, {"idx_ptr": "*i64", "out_ptr": "*fp32", **STEP}, {"BQ": 256}),
    (tk._langevin_kernel, {"x_ptr": "*fp32", "g_ptr": "*bf16", "idx_ptr": "*i64", "out_ptr": "*fp32",
                           "drift": "fp32", "noise_scale": "fp32", **STEP}, {"BQ": 256}),
    (tk._reverse_kernel, {"xt_ptr": "*fp32", "eps_ptr": "*bf16", "idx_ptr": "*i64", "out_ptr": "*fp32",
                          **{k: "fp32" for k in ("recip_sqrt_abar", "sqrt_recip_abar_m1", "mean_x0", "mean_xt", "sigma")},
                          **STEP, "CLIP": "constexpr", "NOISE": "constexpr"}, {"CLIP": True, "NOISE": True, "BQ": 256}),
    (tk._group_norm_silu_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "HW": "i32",
                                  "CPG": "i32", "groups": "i32", "eps": "fp32", "BLOCK": "constexpr"}, {"BLOCK": 1024}),
]
for fn, sig, const in cases:
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options=tk._OPTS)
    ptx = k.asm["ptx"]
    if fn is not tk._group_norm_silu_kernel:  # SiLU's exp may be approximate; the noise's log/cos/sin may not
        bad = [op for op in ("lg2.approx", "sin.approx", "cos.approx", "ex2.approx") if op in ptx]
        assert not bad, (fn.__name__, bad)
    assert "fma.rn.f32" not in ptx, fn.__name__  # no contraction of the step arithmetic
print("compiled", len(cases))
"""


def test_kernels_compile_for_cuda(tk, tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["TRITON_DEFAULT_FP_FUSION"] = "0"  # silences 3.9's warning; the kernels ask for no fusion anyway
    res = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
