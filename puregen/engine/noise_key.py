"""The noise key: which Gaussians a batch of samples draws, as one value checked once.

Every random number the purifiers use is a function of (seed, stream, sample
index, step, element) through the Philox contract in `puregen.kernels.philox`.
The seed and the samples' global row indices are fixed where a request enters
the engine (the Python API, the pipeline, a worker); from there they travel
together as a `NoiseKey`, already validated, and each stage derives its stream
from it. Nothing below the entry point checks a bare seed again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..kernels import philox

SEED_RANGE = (0, 1 << 64)  # the Philox key is 64 bits


def check_seed(seed) -> int:
    """The seed as the noise streams take it: an integer in [0, 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"--seed must be an integer, got {seed!r}")
    if not SEED_RANGE[0] <= int(seed) < SEED_RANGE[1]:
        raise InputError(f"--seed must be in [0, 2**64), got {seed}")
    return int(seed)


@dataclass(frozen=True, eq=False)
class NoiseKey:
    """A seed and the global row indices of a batch's samples (int64, distinct, in [0, 2**48)).

    Make one with `NoiseKey.of(seed, indices)` or `NoiseKey.rows(seed, start, stop)`; both
    validate. Row b of a batch draws its noise from (seed, indices[b]) alone, so the same
    sample gets the same bytes in any batch.
    """

    seed: int
    indices: torch.Tensor

    @classmethod
    def of(cls, seed, indices) -> "NoiseKey":
        seed = check_seed(seed)
        idx = torch.as_tensor(np.ascontiguousarray(indices) if not torch.is_tensor(indices) else indices)
        if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.dtype.is_complex:
            raise InputError(f"indices must be integers, got {idx.dtype}")
        idx = idx.to(torch.int64).reshape(-1)
        if idx.numel():
            lo, hi = (int(v) for v in torch.aminmax(idx))
            if lo < 0:
                raise InputError("indices must be non-negative")
            if hi > philox.MAX_SAMPLE_INDEX:
                raise InputError(f"indices must be below 2**48 (the noise counter's sample field), got {hi}")
            if torch.unique(idx).numel() != idx.numel():
                raise InputError("indices must be distinct: each names one sample's noise")
        return cls(seed, idx)

    @classmethod
    def rows(cls, seed, start: int, stop: int) -> "NoiseKey":
        """The key of rows start .. stop-1 of a dataset: distinct by construction, so only the seed and the
        range are checked (the pipeline makes one per batch)."""
        seed = check_seed(seed)
        if start < 0:
            raise InputError("indices must be non-negative")
        if stop - 1 > philox.MAX_SAMPLE_INDEX:
            raise InputError(f"indices must be below 2**48 (the noise counter's sample field), got {stop - 1}")
        return cls(seed, torch.arange(start, stop, dtype=torch.int64))

    def __len__(self) -> int:
        return self.indices.numel()

    def select(self, rows: torch.Tensor) -> "NoiseKey":
        """The key of a subset of this batch's rows (still valid: a subset of distinct indices)."""
        return NoiseKey(self.seed, self.indices[rows.to(self.indices.device)])

    def split(self, start: int, stop: int) -> "NoiseKey":
        return NoiseKey(self.seed, self.indices[start:stop])

    def to(self, device) -> "NoiseKey":
        return NoiseKey(self.seed, self.indices.to(device))
