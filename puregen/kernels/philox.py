"""The noise contract: Philox-4x32-10 counters, keys and the normal transform.

This module is the single written-down definition of every random number the
engine uses: each is a pure function of the seed, the stream (the stage that
draws it), the sample's global index in the dataset, the step and the
element, so a sample's bytes do not depend on how a job is batched, ordered
or resumed (README, "Reproducibility"). Every implementation (this torch
reference, the native C++ kernels, the Triton kernels) must reproduce it bit
for bit in the integer stream; the golden vectors in `tests/test_philox.py`
pin it.

Layout, for sample ``i`` (its global row index in the input dataset):

* key (64 bits) = ``(k0, k1) = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)``
* counter (128 bits) = ``(c0, c1, c2, c3)`` with

  - ``c0`` = block = ``element // 4`` (element = flat C*H*W index inside the
    sample, so one Philox call yields the noise of four consecutive elements),
  - ``c1`` = step of the stage (Langevin step, reverse-diffusion timestep, 0
    for the forward noising),
  - ``c2`` = low 32 bits of ``i``,
  - ``c3`` = ``stream | ((i >> 32) << 16)``: the stage in the low 16 bits,
    the high bits of the sample index above it.

* uint32 -> uniform: ``u = ((x >> 9) + 0.5) * 2**-23`` (the top 23 bits), exactly
  representable in float32 and strictly inside (0, 1), so ``log(u)`` is always
  finite (with 24 bits, ``2**24 - 0.5`` would round up to 1.0 in float32).
* uniform -> normal: Box-Muller with BOTH outputs used. Outputs ``(x0, x1)`` of a
  Philox call give elements ``4*c0 + 0`` (``r*cos``) and ``4*c0 + 1``
  (``r*sin``); ``(x2, x3)`` give ``4*c0 + 2`` (cos) and ``4*c0 + 3`` (sin),
  with ``r = sqrt(-2 log u_a)`` and angle ``2*pi*u_b`` (``u_a`` from the even
  output, ``u_b`` from the odd one). Computed in float32.

Streams separate the stages so that no two stages reuse the same Gaussians;
a repetition ``r`` of the `reps` combination uses ``stream + REPEAT_STRIDE*r``.
"""

from __future__ import annotations

import math

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF

STREAM_EBM = 1
STREAM_DDPM_FORWARD = 2
STREAM_DDPM_REVERSE = 3
STREAM_DVAE = 4  # D-VAE's latent samples (steps 0, 1, 2: the three encoder passes); 4 mod 16 is no reps stage's
STREAM_DIFFPURE_FORWARD = 5  # DiffPure's diffusion to t* (step 0)
STREAM_DIFFPURE_SDE = 6  # DiffPure's reverse-SDE increments (step i: solver step i)
STREAM_GUIDED_TARGET = 7  # guided: the input diffused to step t as the guidance's target (step t)
REPEAT_STRIDE = 16
MAX_STREAM = 0xFFFF
MAX_SAMPLE_INDEX = (1 << 48) - 1


def stage_stream(base: int, repetition: int = 0) -> int:
    """The stream id of a stage in a given repetition of `reps`."""
    stream = base + REPEAT_STRIDE * repetition
    if not 0 <= stream <= MAX_STREAM:
        raise ValueError(f"stream {stream} out of range (0..{MAX_STREAM})")
    return stream


def seed_to_key(seed: int) -> tuple[int, int]:
    if not 0 <= seed < (1 << 64):
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed & MASK32, (seed >> 32) & MASK32


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * m`` for uint32 values held in int64.

    The 64-bit product does not fit a signed int64, so ``a`` is split in two
    16-bit halves whose partial products (< 2**48) are exact.
    """
    a_lo = a & 0xFFFF
    a_hi = a >> 16
    p_lo = a_lo * m
    p_hi = a_hi * m
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int):
    """Philox-4x32-10 on int64 tensors holding uint32 words (broadcasting)."""
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def check_counter_args(stream: int, step: int, indices: torch.Tensor) -> None:
    """The counter layout's limits, shared by every implementation: stream, step and sample indices."""
    if not 0 <= stream <= MAX_STREAM:
        raise ValueError(f"stream {stream} out of range (0..{MAX_STREAM})")
    if not 0 <= step <= MASK32:
        raise ValueError(f"step {step} out of range")
    if indices.numel():
        lo, hi = (int(v) for v in torch.aminmax(indices.to(torch.int64)))  # one device sync, not two
        if lo < 0 or hi > MAX_SAMPLE_INDEX:
            raise ValueError("sample indices must lie in [0, 2**48)")


def counter_words(indices: torch.Tensor, step: int, stream: int, num_blocks: int):
    """The four counter words for each (sample, block) pair: shapes (B, blocks)."""
    check_counter_args(stream, step, indices)
    idx = indices.to(torch.int64).reshape(-1, 1)
    blocks = torch.arange(num_blocks, dtype=torch.int64, device=idx.device).reshape(1, -1)
    c0 = blocks.expand(idx.shape[0], num_blocks)
    c1 = torch.full_like(c0, step)
    c2 = (idx & MASK32).expand_as(c0)
    c3 = ((idx >> 32) << 16 | stream).expand_as(c0)
    return c0, c1, c2, c3


def random_uint32(indices: torch.Tensor, *, seed: int, stream: int, step: int, num_blocks: int) -> torch.Tensor:
    """The integer stream: (B, num_blocks, 4) int64 tensor of uint32 values."""
    k0, k1 = seed_to_key(seed)
    out = philox4x32(*counter_words(indices, step, stream, num_blocks), k0, k1)
    return torch.stack(out, dim=-1)


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Top 23 bits to a float32 strictly inside (0, 1)."""
    return ((x >> 9).to(torch.float32) + 0.5) * (2.0**-23)


def box_muller(words: torch.Tensor) -> torch.Tensor:
    """(..., 4) uint32 words -> (..., 4) standard normals, both outputs used."""
    u = uint32_to_uniform(words)
    u_a = u[..., 0::2]
    u_b = u[..., 1::2]
    radius = torch.sqrt(-2.0 * torch.log(u_a))
    angle = (2.0 * math.pi) * u_b
    z_cos = radius * torch.cos(angle)
    z_sin = radius * torch.sin(angle)
    return torch.stack((z_cos, z_sin), dim=-1).reshape(words.shape)


def normal_noise(
    indices: torch.Tensor,
    sample_shape: tuple[int, ...],
    *,
    seed: int,
    stream: int,
    step: int,
) -> torch.Tensor:
    """Standard normal noise of shape ``(len(indices), *sample_shape)``, float32.

    Row ``b`` depends only on ``(seed, stream, indices[b], step)``: never on
    the batch it was drawn in.
    """
    numel = math.prod(sample_shape)
    num_blocks = (numel + 3) // 4
    words = random_uint32(indices, seed=seed, stream=stream, step=step, num_blocks=num_blocks)
    normals = box_muller(words).reshape(words.shape[0], num_blocks * 4)[:, :numel]
    return normals.reshape(words.shape[0], *sample_shape)
