"""The fused native CPU kernels (csrc/, loaded with ctypes), torch-facing.

Same signatures and results as `reference.py` (within a few ulp: only libm's
log/cos/sin differ from torch's), but each step is one pass over memory with
the Philox noise drawn inside the kernel. The library is loaded lazily on
first use; `available()` says whether it could be, `unavailable_reason()`
why not. ``PUREGEN_NATIVE=0`` disables it (for debugging).
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from pathlib import Path

import torch

from . import philox

ABI_VERSION = 1  # must equal puregen_native_abi_version() of csrc/kernels.cpp
LIBRARY_NAME = "libpuregen_native.so"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_path: Path | None = None
_reason: str | None = None
_loaded = False

_i64, _u64, _u32, _f32, _int = ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, ctypes.c_int
_ptr = ctypes.c_void_p
_SIGNATURES = {
    "puregen_native_abi_version": [],
    "puregen_random_uint32": [_ptr, _i64, _u64, _u32, _u32, _i64, _ptr],
    "puregen_normal_noise": [_ptr, _i64, _i64, _u64, _u32, _u32, _ptr, _int],
    "puregen_langevin_update": [_ptr, _ptr, _ptr, _i64, _i64, _f32, _f32, _ptr, _u64, _u32, _u32, _int],
    "puregen_ddpm_forward_noise": [_ptr, _ptr, _i64, _i64, _f32, _f32, _ptr, _u64, _u32, _int],
    "puregen_ddpm_reverse_step": [_ptr, _ptr, _ptr, _i64, _i64, _u32, _f32, _f32, _f32, _f32, _f32, _int, _ptr, _u64,
                                  _u32, _int],
}
_STATUS = {1: "bad argument", 2: "sample index out of [0, 2**48)"}


def _candidates() -> list[Path]:
    # The package's __path__ rather than only this file's folder: in an
    # editable install the sources (and this file) stay in the tree while the
    # built library is installed into site-packages, which scikit-build-core's
    # redirect adds to __path__.
    from . import __path__ as package_path

    dirs = [Path(__file__).resolve().parent, *(Path(p).resolve() for p in package_path)]
    return list(dict.fromkeys(d / LIBRARY_NAME for d in dirs))


def _load() -> None:
    global _lib, _path, _reason, _loaded
    with _lock:
        if _loaded:
            return
        _loaded = True
        if os.environ.get("PUREGEN_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _reason = "disabled by PUREGEN_NATIVE=0"
            return
        candidates = _candidates()
        found = [p for p in candidates if p.is_file()]
        if not found:
            _reason = f"library file missing ({LIBRARY_NAME} not in {', '.join(str(p.parent) for p in candidates)}); " \
                      "reinstall puregen to build csrc/"
            return
        try:
            lib = ctypes.CDLL(str(found[0]))
            for name, argtypes in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = argtypes, ctypes.c_int
            version = lib.puregen_native_abi_version()
        except (OSError, AttributeError) as exc:
            _reason = f"could not load {found[0]}: {exc}"
            return
        if version != ABI_VERSION:
            _reason = f"ABI mismatch: {found[0]} has version {version}, this module expects {ABI_VERSION}; reinstall puregen"
            return
        _lib, _path = lib, found[0]


def available() -> bool:
    _load()
    return _lib is not None


def unavailable_reason() -> str | None:
    _load()
    return _reason


def library_path() -> Path | None:
    _load()
    return _path


def _library() -> ctypes.CDLL:
    if not available():
        raise RuntimeError(f"puregen native kernels unavailable: {_reason}")
    return _lib


def _call(name: str, *args) -> None:
    # numpy and 0-dim tensor scalars become Python ints or floats (ctypes takes only those)
    args = [a if isinstance(a, (int, float, type(None))) else a.item() for a in args]
    status = getattr(_library(), name)(*args)
    if status:
        raise ValueError(f"{name}: {_STATUS.get(status, f'error {status}')}")


def _ptr_of(t: torch.Tensor) -> int | None:
    return t.data_ptr() if t.numel() else None


def _nthreads() -> int:
    return torch.get_num_threads()


def _check_args(indices: torch.Tensor, batch: int | None, seed: int, stream: int, step: int) -> torch.Tensor:
    """Validates the noise arguments like `philox` does; returns contiguous int64 CPU indices."""
    if not isinstance(indices, torch.Tensor) or indices.device.type != "cpu":
        raise ValueError("indices must be a CPU tensor")
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype.is_complex:
        raise ValueError(f"indices must be a 1-D integer tensor, got {tuple(indices.shape)} {indices.dtype}")
    if batch is not None and indices.shape[0] != batch:
        raise ValueError(f"indices has {indices.shape[0]} entries for a batch of {batch}")
    philox.seed_to_key(seed)
    idx = indices.to(torch.int64).contiguous()
    philox.check_counter_args(stream, step, idx)
    return idx


def _state(x: torch.Tensor, name: str) -> torch.Tensor:
    """The fp32 state the step reads, as a contiguous (NCHW-ordered) CPU tensor."""
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor (the native kernels are CPU only)")
    if x.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension")
    return x.contiguous()


def _operand(t: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """grad / eps: any floating dtype and layout, read as contiguous fp32 (as the reference's `.to(float32)`)."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.shape != like.shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} does not match {tuple(like.shape)}")
    # .contiguous() before the cast: a channels_last tensor must be read in NCHW order.
    return t.contiguous().to(torch.float32).contiguous()


def random_uint32(indices: torch.Tensor, *, seed: int, stream: int, step: int, num_blocks: int) -> torch.Tensor:
    """The integer stream: (B, num_blocks, 4) int64 tensor of uint32 values, as `philox.random_uint32`."""
    idx = _check_args(indices, None, seed, stream, step)
    if not 0 <= num_blocks <= 1 << 32:
        raise ValueError(f"num_blocks {num_blocks} out of range")
    out = torch.empty((idx.shape[0], num_blocks, 4), dtype=torch.int32)
    _call("puregen_random_uint32", _ptr_of(idx), idx.shape[0], seed, stream, step, num_blocks, _ptr_of(out))
    return out.to(torch.int64) & philox.MASK32  # the int32 bits read as uint32


def normal_noise(indices: torch.Tensor, sample_shape: tuple[int, ...], *, seed: int, stream: int,
                 step: int) -> torch.Tensor:
    """Standard normal noise of shape ``(len(indices), *sample_shape)``, float32, as `philox.normal_noise`."""
    idx = _check_args(indices, None, seed, stream, step)
    out = torch.empty((idx.shape[0], *sample_shape), dtype=torch.float32)
    _call("puregen_normal_noise", _ptr_of(idx), idx.shape[0], math.prod(sample_shape), seed, stream, step,
          _ptr_of(out), _nthreads())
    return out


def langevin_update(x: torch.Tensor, grad: torch.Tensor, *, drift: float, noise_scale: float, indices: torch.Tensor,
                    seed: int, stream: int, step: int) -> torch.Tensor:
    """``x - drift * grad + noise_scale * n`` in fp32, fused (see `reference.langevin_update`)."""
    x = _state(x, "x")
    grad = _operand(grad, x, "grad")
    idx = _check_args(indices, x.shape[0], seed, stream, step)
    out = torch.empty_like(x)
    _call("puregen_langevin_update", _ptr_of(x), _ptr_of(grad), _ptr_of(out), x.shape[0], math.prod(x.shape[1:]),
          float(drift), float(noise_scale), _ptr_of(idx), seed, stream, step, _nthreads())
    return out


def ddpm_forward_noise(x0: torch.Tensor, *, sqrt_alpha_bar: float, sqrt_one_minus_alpha_bar: float,
                       indices: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """``sqrt(abar) x0 + sqrt(1 - abar) n`` (step 0 of its stream), fused."""
    x0 = _state(x0, "x0")
    idx = _check_args(indices, x0.shape[0], seed, stream, 0)
    out = torch.empty_like(x0)
    _call("puregen_ddpm_forward_noise", _ptr_of(x0), _ptr_of(out), x0.shape[0], math.prod(x0.shape[1:]),
          float(sqrt_alpha_bar), float(sqrt_one_minus_alpha_bar), _ptr_of(idx), seed, stream, _nthreads())
    return out


def ddpm_reverse_step(x_t: torch.Tensor, eps_pred: torch.Tensor, *, t: int, coefs, indices: torch.Tensor, seed: int,
                      stream: int, clip_x0: bool = True) -> torch.Tensor:
    """One ancestral step t -> t-1, fused (see `reference.ddpm_reverse_step`)."""
    x_t = _state(x_t, "x_t")
    eps = _operand(eps_pred, x_t, "eps_pred")
    idx = _check_args(indices, x_t.shape[0], seed, stream, t)
    out = torch.empty_like(x_t)
    _call("puregen_ddpm_reverse_step", _ptr_of(x_t), _ptr_of(eps), _ptr_of(out), x_t.shape[0],
          math.prod(x_t.shape[1:]), t, float(coefs.recip_sqrt_abar), float(coefs.sqrt_recip_abar_m1),
          float(coefs.mean_x0), float(coefs.mean_xt), float(coefs.sigma), int(bool(clip_x0)), _ptr_of(idx), seed, stream, _nthreads())
    return out
