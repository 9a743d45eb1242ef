"""`reps`: R repetitions of a short Langevin stage and a shallow diffusion (PureGen-Reps).

Repetition r draws its noise from its own streams: the Langevin and diffusion streams plus
`philox.REPEAT_STRIDE * r` (`philox.stage_stream(base, r)`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.samplers import diffuse_denoise, langevin
from ...kernels import philox
from ..base import BatchContext, Method, MethodOutput
from ..options import at_least, option
from ..registry import register
from ..stages import DiffusionOptions, LangevinOptions


@dataclass(frozen=True)
class RepsConfig(LangevinOptions, DiffusionOptions):
    reps: int = option(5, "repetitions R of the reps method", check=at_least(1))


@register
class RepeatedCombination(Method):
    name = "reps"
    label = "PureGen-Reps"
    help = "R repetitions of (ebm for a few steps, then ddpm to a shallow t*): 5 x (10 steps, t* = 50)"
    Config = RepsConfig
    presets = {"paper": {"steps": 10, "t_star": 50}, "tiny": {"steps": 5, "t_star": 10, "reps": 2}}
    networks = ("ebm", "unet")
    noise_streams = (philox.STREAM_EBM, philox.STREAM_DDPM_FORWARD, philox.STREAM_DDPM_REVERSE)  # + stride * r

    def network_evaluations(self) -> int:
        c = self.config
        return c.reps * (c.steps + c.diffusion().network_evaluations)

    def purify(self, x, ctx: BatchContext) -> MethodOutput:
        c = self.config
        for r in range(c.reps):
            x = langevin(x, ctx.networks, c.langevin(), key=ctx.key, repetition=r, on_step=ctx.on_step)
            x = diffuse_denoise(x, ctx.networks, c.diffusion(), key=ctx.key, repetition=r, on_step=ctx.on_step)
        return MethodOutput(x)
