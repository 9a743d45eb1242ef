"""`filt`: diffuse and denoise only the highest-energy share of the images (PureGen-Filt).

Its scope is `prepass`: every image's EBM energy is computed first, and the
images ranked above the `filter_frac` quantile (ties broken by global index,
so the selection is a function of the data whatever the batching) go through
the DDPM; the rest pass through byte for byte. With `--energy-threshold` the
selection is fixed by the config, and no prepass is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ...engine.samplers import diffuse_denoise
from ...kernels import philox
from ..base import BatchContext, DatasetState, Method, MethodOutput
from ..options import finite_number, option, within
from ..registry import register
from ..stages import DiffusionOptions


@dataclass(frozen=True)
class FiltConfig(DiffusionOptions):
    filter_frac: float = option(0.5, "share k of highest-energy images that filt purifies", check=within(0.0, 1.0))
    energy_threshold: float | None = option(None, "fixed energy threshold for filt (no global pass)", type=float,
                                            check=finite_number)


@dataclass(frozen=True)
class FiltSelection:
    """Which images `filt` purifies: those ranked above (energy, index) of the boundary."""

    energy: float
    index: float  # the boundary's global index; +inf for a plain threshold

    def selects(self, energies: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return (energies > self.energy) | ((energies == self.energy) & (indices > self.index))

    @classmethod
    def from_threshold(cls, threshold: float) -> "FiltSelection":
        return cls(float(threshold), math.inf)

    @classmethod
    def from_quantile(cls, energies: np.ndarray, indices: np.ndarray, filter_frac: float) -> "FiltSelection":
        """Purify the top `filter_frac` share (rounded half up) of the ranked images."""
        n = len(energies)
        n_select = int(math.floor(filter_frac * n + 0.5))
        n_keep = n - n_select
        if n_keep == 0:
            return cls(-math.inf, -math.inf)
        order = np.lexsort((indices, energies))
        boundary = order[n_keep - 1]
        return cls(float(energies[boundary]), float(indices[boundary]))

    def to_state(self) -> DatasetState:
        return {"energy": self.energy, "index": self.index}


@register
class EnergyFilteredDiffusion(Method):
    name = "filt"
    label = "PureGen-Filt"
    help = "ddpm (t* = 125) on the filter_frac share of highest EBM energy; the rest pass through unchanged"
    Config = FiltConfig
    presets = {"paper": {"t_star": 125}, "tiny": {"t_star": 20}}
    networks = ("ebm", "unet")
    noise_streams = (philox.STREAM_DDPM_FORWARD, philox.STREAM_DDPM_REVERSE)
    scope = "prepass"
    state_options = ("energy_threshold",)

    def network_evaluations(self) -> int:
        return self.config.diffusion().network_evaluations

    def given_state(self) -> DatasetState | None:
        if self.config.energy_threshold is None:
            return None
        return FiltSelection.from_threshold(self.config.energy_threshold).to_state()

    def prepass(self, x, ctx: BatchContext) -> np.ndarray:
        return ctx.networks.energy(x).cpu().numpy().astype(np.float32)

    def state_from_prepass(self, values: np.ndarray, indices: np.ndarray) -> DatasetState:
        return FiltSelection.from_quantile(values, indices, self.config.filter_frac).to_state()

    def purify(self, x, ctx: BatchContext) -> MethodOutput:
        selection = FiltSelection(**ctx.state)
        chosen = selection.selects(ctx.energy_before, ctx.key.indices.cpu().numpy())
        if chosen.any():
            rows = torch.from_numpy(np.flatnonzero(chosen)).to(x.device)
            purified = diffuse_denoise(x[rows], ctx.networks, self.config.diffusion(), key=ctx.key.select(rows))
            x = x.clone()
            x[rows] = purified
        ctx.step(self.network_evaluations())
        return MethodOutput(x, audit={"filt_selected": chosen}, unchanged=~chosen)
