"""The native CPU kernels (csrc/) against the noise contract and the reference steps.

The integer stream must be bit-identical. Normals and the fused steps may differ
from torch only through logf/cosf/sinf (glibc versus torch's vectorized ones),
so the noise-free parts of each step are compared bit for bit and the noisy
outputs within a few ulp of the noise term.

These tests fail when the library is missing (a broken build must not pass
CI); set PUREGEN_ALLOW_NO_NATIVE=1 to skip them instead.
"""

import ctypes
import os
import subprocess
import sys

import pytest
import torch

from puregen.engine.schedule import DDPMSchedule
from puregen.kernels import native, philox, reference
from tests.test_philox import GOLDEN_INDICES, GOLDEN_NORMALS, GOLDEN_WORDS

ULP = 2.0**-23  # float32 spacing relative to the magnitude (an upper bound)
NOISE_ULPS = 4  # libm vs torch log/cos/sin, each ~1 ulp, through sqrt and two products
SEED = 0x1234_5678_9ABC  # above 2**32: both key words used
BIG = (1 << 40) + 3  # an index with high bits in the counter's c3 word


@pytest.fixture(autouse=True, scope="module")
def _library():
    if not native.available():
        reason = f"native kernels unavailable: {native.unavailable_reason()}"
        if os.environ.get("PUREGEN_ALLOW_NO_NATIVE") == "1":
            pytest.skip(reason)
        pytest.fail(reason + " (set PUREGEN_ALLOW_NO_NATIVE=1 to skip)")


def _randn(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.7 + 0.1
    assert (x != 0).any()  # never an all-zero input
    return x.to(dtype)


def _indices(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 50_000, (b,), generator=g)
    idx[-1] = BIG
    return idx


def _assert_noise_close(got, ref, noise_term):
    """|got - ref| <= NOISE_ULPS ulp of the noise term + 1 ulp of the result (final rounding)."""
    bound = NOISE_ULPS * ULP * noise_term.abs() + ULP * ref.abs()
    err = (got - ref).abs()
    assert torch.isfinite(got).all()
    assert (err <= bound).all(), f"max err {err.max().item():.3g}, worst err/bound {(err / bound).max().item():.3g}"


SHAPES = [(1, 1, 28, 28), (7, 3, 5, 5), (7, 3, 32, 32), (2, 13), (3, 1, 1, 1), (4, 2, 3)]  # numel % 4 != 0 included


# ---------------------------------------------------------------- noise contract

def test_golden_words_bit_identical():
    idx = torch.tensor(GOLDEN_INDICES)
    words = native.random_uint32(idx, seed=2024, stream=3, step=5, num_blocks=2)
    assert words.dtype == torch.int64
    assert words.tolist() == GOLDEN_WORDS


@pytest.mark.parametrize("num_blocks", [1, 5, 300])
def test_integer_stream_bit_identical(num_blocks):
    idx = torch.tensor([0, 1, 2**32 - 1, 2**32, BIG, philox.MAX_SAMPLE_INDEX])
    for seed, stream, step in [(0, 0, 0), (SEED, philox.MAX_STREAM, philox.MASK32), (2**64 - 1, 3, 999)]:
        kw = dict(seed=seed, stream=stream, step=step, num_blocks=num_blocks)
        assert torch.equal(native.random_uint32(idx, **kw), philox.random_uint32(idx, **kw))


def test_golden_normals():
    idx = torch.tensor(GOLDEN_INDICES)
    n = native.normal_noise(idx, (2, 2, 2), seed=2024, stream=1, step=0)
    # same tolerance as tests/test_philox.py: a few ulp for another libm's log/cos/sin
    torch.testing.assert_close(n.reshape(4, -1), torch.tensor(GOLDEN_NORMALS), rtol=4e-7, atol=4e-7)


@pytest.mark.parametrize("sample_shape", [(3, 32, 32), (1, 28, 28), (5,), (3, 3, 3), (1,)])
def test_normals_within_a_few_ulp(sample_shape):
    idx = _indices(9)
    kw = dict(seed=SEED, stream=philox.STREAM_EBM, step=17)
    got = native.normal_noise(idx, sample_shape, **kw)
    ref = philox.normal_noise(idx, sample_shape, **kw)
    assert got.shape == ref.shape and got.dtype == torch.float32
    # |z| <= ~5.6: 4 ulp relative to the magnitude, floored at 4 ulp of 1 near zero (cos/sin ~ 0)
    torch.testing.assert_close(got, ref, rtol=NOISE_ULPS * ULP, atol=NOISE_ULPS * ULP)


# ---------------------------------------------------------------- fused steps vs reference

def _coefs(t):
    return DDPMSchedule().reverse_coefficients(t)


@pytest.mark.parametrize("shape", SHAPES)
def test_langevin_update_matches_reference(shape):
    x, grad, idx = _randn(shape, 1), _randn(shape, 2) * 50, _indices(shape[0])
    kw = dict(drift=1.25e-2**2 / 2 / 1e-4, noise_scale=1.25e-2, indices=idx, seed=SEED, stream=1, step=3)
    got = native.langevin_update(x, grad, **kw)
    ref = reference.langevin_update(x, grad, **kw)
    n = philox.normal_noise(idx, shape[1:], seed=SEED, stream=1, step=3)
    _assert_noise_close(got, ref, kw["noise_scale"] * n)
    # the noise-free part is the reference's float32 arithmetic bit for bit
    kw0 = dict(kw, noise_scale=0.0)
    assert torch.equal(native.langevin_update(x, grad, **kw0), reference.langevin_update(x, grad, **kw0))


@pytest.mark.parametrize("shape", SHAPES)
def test_ddpm_forward_noise_matches_reference(shape):
    x0, idx = _randn(shape, 3), _indices(shape[0], 1)
    kw = dict(sqrt_alpha_bar=0.9655, sqrt_one_minus_alpha_bar=0.2604, indices=idx, seed=SEED, stream=2)
    got = native.ddpm_forward_noise(x0, **kw)
    ref = reference.ddpm_forward_noise(x0, **kw)
    n = philox.normal_noise(idx, shape[1:], seed=SEED, stream=2, step=0)
    _assert_noise_close(got, ref, kw["sqrt_one_minus_alpha_bar"] * n)
    kw0 = dict(kw, sqrt_one_minus_alpha_bar=0.0)
    assert torch.equal(native.ddpm_forward_noise(x0, **kw0), reference.ddpm_forward_noise(x0, **kw0))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0, 1, 74, 999])
@pytest.mark.parametrize("clip_x0", [True, False])
def test_ddpm_reverse_step_matches_reference(shape, t, clip_x0):
    x_t, eps, idx = _randn(shape, 4) * 2, _randn(shape, 5), _indices(shape[0], 2)
    coefs = _coefs(t)
    kw = dict(t=t, coefs=coefs, indices=idx, seed=SEED, stream=3, clip_x0=clip_x0)
    got = native.ddpm_reverse_step(x_t, eps, **kw)
    ref = reference.ddpm_reverse_step(x_t, eps, **kw)
    if t == 0:
        assert torch.equal(got, ref)  # no noise: bit-identical
    else:
        n = philox.normal_noise(idx, shape[1:], seed=SEED, stream=3, step=t)
        _assert_noise_close(got, ref, coefs.sigma * n)


def test_reverse_step_clip_is_exercised_and_nan_propagates():
    shape = (3, 2, 5)
    x_t, eps, idx = _randn(shape, 6) * 3, _randn(shape, 7), _indices(3)
    coefs = _coefs(0)
    x0 = coefs.recip_sqrt_abar * x_t - coefs.sqrt_recip_abar_m1 * eps
    assert (x0.abs() > 1).any() and (x0.abs() < 1).any()
    x_t[1, 1, 2] = float("nan")
    kw = dict(t=0, coefs=coefs, indices=idx, seed=1, stream=3)
    got, ref = native.ddpm_reverse_step(x_t, eps, **kw), reference.ddpm_reverse_step(x_t, eps, **kw)
    assert torch.equal(got.isnan(), ref.isnan()) and got[1, 1, 2].isnan()
    assert torch.equal(got.nan_to_num(), ref.nan_to_num())


def test_bf16_and_channels_last_operands():
    shape = (4, 3, 8, 8)
    x, idx = _randn(shape, 8), _indices(4)
    grad = _randn(shape, 9).to(torch.bfloat16).to(memory_format=torch.channels_last)
    kw = dict(drift=0.5, noise_scale=0.0, indices=idx, seed=2, stream=1, step=0)
    assert torch.equal(native.langevin_update(x, grad, **kw), reference.langevin_update(x, grad, **kw))
    eps = _randn(shape, 10).to(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    kw = dict(t=0, coefs=_coefs(0), indices=idx, seed=2, stream=3)
    assert torch.equal(native.ddpm_reverse_step(x_cl, eps, **kw), reference.ddpm_reverse_step(x_cl, eps, **kw))
    x_t = x[:, :, ::2, ::2]  # non-contiguous state
    got = native.ddpm_forward_noise(x_t, sqrt_alpha_bar=0.5, sqrt_one_minus_alpha_bar=0.0, indices=idx, seed=1, stream=2)
    assert torch.equal(got, 0.5 * x_t)


def test_noise_depends_only_on_the_global_index():
    shape = (6, 3, 7, 7)
    x, grad, idx = _randn(shape, 11), _randn(shape, 12), _indices(6, 3)
    kw = dict(drift=0.01, noise_scale=0.5, seed=SEED, stream=1, step=2)
    full = native.langevin_update(x, grad, indices=idx, **kw)
    perm = torch.tensor([5, 0, 3, 1, 4, 2])
    assert torch.equal(native.langevin_update(x[perm], grad[perm], indices=idx[perm], **kw), full[perm])
    assert torch.equal(native.langevin_update(x[4:5], grad[4:5], indices=idx[4:5], **kw), full[4:5])


# ---------------------------------------------------------------- raw ABI: every element written, none beyond

def _f32p(t):
    return ctypes.c_void_p(t.data_ptr())


@pytest.mark.parametrize("shape", [(7, 3, 5, 5), (1, 13), (2, 3, 32, 32)])
def test_every_element_written_and_nothing_past_the_end(shape):
    b, numel = shape[0], torch.Size(shape[1:]).numel()
    x, grad, idx = _randn(shape, 13), _randn(shape, 14), _indices(b)
    coefs = _coefs(10)
    lib = native._library()
    expected = {
        "langevin": native.langevin_update(x, grad, drift=0.1, noise_scale=0.3, indices=idx, seed=5, stream=1, step=1),
        "forward": native.ddpm_forward_noise(x, sqrt_alpha_bar=0.8, sqrt_one_minus_alpha_bar=0.6, indices=idx, seed=5,
                                             stream=2),
        "reverse": native.ddpm_reverse_step(x, grad, t=10, coefs=coefs, indices=idx, seed=5, stream=3),
        "reverse0": native.ddpm_reverse_step(x, grad, t=0, coefs=coefs, indices=idx, seed=5, stream=3),
        "normal": native.normal_noise(idx, shape[1:], seed=5, stream=1, step=4),
    }
    pi = _f32p(idx)
    for name, want in expected.items():
        buf = torch.full((b * numel + 9,), float("nan"))  # 9 guard elements after the end
        o = _f32p(buf)
        if name == "langevin":
            st = lib.puregen_langevin_update(_f32p(x), _f32p(grad), o, b, numel, 0.1, 0.3, pi, 5, 1, 1, 2)
        elif name == "forward":
            st = lib.puregen_ddpm_forward_noise(_f32p(x), o, b, numel, 0.8, 0.6, pi, 5, 2, 2)
        elif name.startswith("reverse"):
            t = 10 if name == "reverse" else 0
            st = lib.puregen_ddpm_reverse_step(_f32p(x), _f32p(grad), o, b, numel, t, coefs.recip_sqrt_abar,
                                               coefs.sqrt_recip_abar_m1, coefs.mean_x0, coefs.mean_xt, coefs.sigma,
                                               1, pi, 5, 3, 2)
        else:
            st = lib.puregen_normal_noise(pi, b, numel, 5, 1, 4, o, 2)
        assert st == 0
        assert not buf[: b * numel].isnan().any(), name
        assert buf[b * numel:].isnan().all(), f"{name} wrote past the end"
        assert torch.equal(buf[: b * numel].reshape(want.shape), want), name


def test_in_place_update():
    shape = (3, 1, 9, 9)
    x, grad, idx = _randn(shape, 15), _randn(shape, 16), _indices(3)
    want = native.langevin_update(x, grad, drift=0.2, noise_scale=0.4, indices=idx, seed=8, stream=1, step=6)
    buf = x.clone()
    st = native._library().puregen_langevin_update(_f32p(buf), _f32p(grad), _f32p(buf), 3, 81, 0.2, 0.4, _f32p(idx),
                                                   8, 1, 6, 2)
    assert st == 0 and torch.equal(buf, want)


# ---------------------------------------------------------------- threads

def test_one_and_two_threads_give_identical_bytes():
    shape = (64, 3, 32, 32)
    x, grad, idx = _randn(shape, 17), _randn(shape, 18), _indices(64)
    coefs = _coefs(50)
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs.append([
            native.langevin_update(x, grad, drift=0.7, noise_scale=0.01, indices=idx, seed=3, stream=1, step=9),
            native.ddpm_forward_noise(x, sqrt_alpha_bar=0.9, sqrt_one_minus_alpha_bar=0.4, indices=idx, seed=3,
                                      stream=2),
            native.ddpm_reverse_step(x, grad, t=50, coefs=coefs, indices=idx, seed=3, stream=3),
            native.normal_noise(idx, shape[1:], seed=3, stream=1, step=0),
        ])
    for one, two in zip(*runs):
        assert one.numpy().tobytes() == two.numpy().tobytes()


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs_are_refused():
    x, idx = _randn((2, 4), 19), torch.tensor([0, 1])
    kw = dict(drift=0.1, noise_scale=0.1, indices=idx, seed=0, stream=1, step=0)
    with pytest.raises(ValueError, match="shape"):
        native.langevin_update(x, _randn((2, 5), 1), **kw)
    with pytest.raises(ValueError, match="entries"):
        native.langevin_update(x, x, **dict(kw, indices=torch.tensor([0, 1, 2])))
    with pytest.raises(TypeError, match="float32"):
        native.langevin_update(x.double(), x, **kw)
    with pytest.raises(ValueError, match="meta|CPU"):
        native.langevin_update(x.to("meta"), x, **kw)
    with pytest.raises(ValueError, match="2\\*\\*48"):
        native.langevin_update(x, x, **dict(kw, indices=torch.tensor([0, -1])))
    with pytest.raises(ValueError, match="2\\*\\*48"):
        native.normal_noise(torch.tensor([1 << 48]), (4,), seed=0, stream=1, step=0)
    with pytest.raises(ValueError, match="stream"):
        native.ddpm_forward_noise(x, sqrt_alpha_bar=1.0, sqrt_one_minus_alpha_bar=0.0, indices=idx, seed=0,
                                  stream=1 << 16)
    with pytest.raises(ValueError, match="seed"):
        native.normal_noise(idx, (4,), seed=-1, stream=1, step=0)
    with pytest.raises(ValueError, match="step"):
        native.ddpm_reverse_step(x, x, t=-1, coefs=_coefs(1), indices=idx, seed=0, stream=3)
    with pytest.raises(ValueError, match="1-D integer"):
        native.normal_noise(idx.float(), (4,), seed=0, stream=1, step=0)
    # the C side checks too (a caller bypassing the wrappers)
    bad = torch.tensor([-5])
    assert native._library().puregen_normal_noise(_f32p(bad), 1, 4, 0, 1, 0, _f32p(x), 1) == 2
    assert native._library().puregen_normal_noise(_f32p(idx), 2, 4, 0, 70000, 0, _f32p(x), 1) == 1


def test_empty_batch():
    x, idx = torch.empty((0, 3, 4, 4)), torch.empty((0,), dtype=torch.int64)
    out = native.langevin_update(x, x, drift=0.1, noise_scale=0.1, indices=idx, seed=0, stream=1, step=0)
    assert out.shape == x.shape


# ---------------------------------------------------------------- loading

def _probe(env_extra, code="from puregen.kernels import native; print(native.available()); print(native.unavailable_reason())"):
    env = {k: v for k, v in os.environ.items() if k != "PUREGEN_NATIVE"}
    env.update(env_extra)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def test_disabled_by_env_var():
    available, reason = _probe({"PUREGEN_NATIVE": "0"})
    assert available == "False" and "PUREGEN_NATIVE=0" in reason


def test_missing_file_and_abi_mismatch_have_reasons():
    missing = "from puregen.kernels import native; native.LIBRARY_NAME = 'libnope.so'; " \
              "print(native.available()); print(native.unavailable_reason())"
    available, reason = _probe({}, missing)
    assert available == "False" and "missing" in reason
    mismatch = "from puregen.kernels import native; native.ABI_VERSION = 999; " \
               "print(native.available()); print(native.unavailable_reason())"
    available, reason = _probe({}, mismatch)
    assert available == "False" and "ABI mismatch" in reason
    assert native.library_path() is not None and native.library_path().is_file()


def test_numpy_and_tensor_scalars_are_accepted():
    import numpy as np

    x, grad, idx = _randn((2, 7), 20), _randn((2, 7), 21), torch.tensor([4, 5])
    want = native.langevin_update(x, grad, drift=0.25, noise_scale=0.5, indices=idx, seed=9, stream=1, step=2)
    got = native.langevin_update(x, grad, drift=np.float32(0.25), noise_scale=torch.tensor(0.5), indices=idx,
                                 seed=np.uint64(9), stream=np.int32(1), step=torch.tensor(2))
    assert torch.equal(got, want)
