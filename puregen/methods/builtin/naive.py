"""`naive`: the EBM's Langevin stage, then the DDPM's diffuse-and-denoise (PureGen-Naive)."""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.samplers import diffuse_denoise, langevin
from ...kernels import philox
from ..base import BatchContext, Method, MethodOutput
from ..registry import register
from ..stages import DiffusionOptions, LangevinOptions


@dataclass(frozen=True)
class NaiveConfig(LangevinOptions, DiffusionOptions):
    pass


@register
class NaiveCombination(Method):
    name = "naive"
    label = "PureGen-Naive"
    help = "ebm, then ddpm on its result"
    Config = NaiveConfig
    presets = {"tiny": {"steps": 20, "t_star": 20}}
    networks = ("ebm", "unet")
    noise_streams = (philox.STREAM_EBM, philox.STREAM_DDPM_FORWARD, philox.STREAM_DDPM_REVERSE)
    # Its first stage is exactly `ebm` with the same Langevin options: a caller holding that fp32 result
    # (the evaluation harness caches it) gets naive's bytes for the cost of the DDPM stage alone.
    first_stage = "ebm"

    def network_evaluations(self) -> int:
        return self.config.steps + self.config.diffusion().network_evaluations

    def purify(self, x, ctx: BatchContext) -> MethodOutput:
        c = self.config
        if ctx.first_stage_output is None:
            x = langevin(x, ctx.networks, c.langevin(), key=ctx.key, on_step=ctx.on_step)
        else:
            x = ctx.first_stage_output
            ctx.step(c.steps)
        return MethodOutput(diffuse_denoise(x, ctx.networks, c.diffusion(), key=ctx.key, on_step=ctx.on_step))
