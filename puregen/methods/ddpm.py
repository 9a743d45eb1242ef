"""`ddpm`: diffuse to t*, then denoise with the DDPM's ancestral reverse steps (PureGen-DDPM)."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.samplers import diffuse_denoise
from ..kernels import philox
from .base import BatchContext, Method, MethodOutput
from .registry import register
from .stages import DiffusionOptions


@dataclass(frozen=True)
class DDPMConfig(DiffusionOptions):
    pass


@register
class DDPMDiffuseDenoise(Method):
    name = "ddpm"
    label = "PureGen-DDPM"
    help = "DDPM diffuse to t* = 75, then denoise with the ancestral reverse steps"
    Config = DDPMConfig
    presets = {"tiny": {"t_star": 20}}
    networks = ("unet",)
    noise_streams = (philox.STREAM_DDPM_FORWARD, philox.STREAM_DDPM_REVERSE)

    def network_evaluations(self) -> int:
        return self.config.diffusion().network_evaluations

    def purify(self, x, ctx: BatchContext) -> MethodOutput:
        return MethodOutput(diffuse_denoise(x, ctx.networks, self.config.diffusion(), key=ctx.key,
                                            on_step=ctx.on_step))
