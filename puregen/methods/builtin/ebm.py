"""`ebm`: EBM Langevin dynamics (PureGen-EBM, arXiv 2405.18627)."""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.samplers import langevin
from ...kernels import philox
from ..base import BatchContext, Method, MethodOutput
from ..registry import register
from ..stages import LangevinOptions


@dataclass(frozen=True)
class EBMConfig(LangevinOptions):
    pass


@register
class EBMLangevin(Method):
    name = "ebm"
    label = "PureGen-EBM"
    help = "EBM Langevin dynamics: x <- x - eps^2/(2 temp) grad G(x) + eps n, 150 steps"
    Config = EBMConfig
    presets = {"tiny": {"steps": 20}}
    networks = ("ebm",)
    noise_streams = (philox.STREAM_EBM,)

    def network_evaluations(self) -> int:
        return self.config.steps

    def purify(self, x, ctx: BatchContext) -> MethodOutput:
        return MethodOutput(langevin(x, ctx.networks, self.config.langevin(), key=ctx.key, on_step=ctx.on_step))
