"""`ddpm`: diffuse to t*, then denoise with the DDPM's ancestral reverse steps (PureGen-DDPM)."""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.samplers import DifferentiableEpsilon, diffuse_denoise
from ...kernels import philox, reference
from ..base import BatchContext, Method, MethodOutput
from ..registry import register
from ..stages import DiffusionOptions


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
    differentiable = True

    def network_evaluations(self) -> int:
        return self.config.diffusion().network_evaluations

    def purify(self, x, ctx: BatchContext) -> MethodOutput:
        return MethodOutput(diffuse_denoise(x, ctx.networks, self.config.diffusion(), key=ctx.key,
                                            on_step=ctx.on_step))

    def purify_differentiable(self, x, ctx: BatchContext):
        """The same dynamics on the torch reference steps and the fp32 UNet, with autograd: for an attack that
        differentiates through the purification (a fresh noise key per call gives a fresh sample of it)."""
        unet = DifferentiableEpsilon(ctx.networks.unet, checkpoint=ctx.checkpoint)
        return diffuse_denoise(x, unet, self.config.diffusion(), key=ctx.key, kernels=reference)
