"""`diffpure`: diffuse to t*, then solve the reverse VP-SDE (or its probability-flow ODE) back to 0 with the
DDPM's epsilon-model as the score (Nie et al., ICML 2022). Test-time purification of adversarial inputs;
the dynamics are in `puregen.engine.vpsde`."""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.samplers import DifferentiableEpsilon
from ...engine.vpsde import SOLVERS, DiffPureConfig, VPSDE, diffpure
from ...kernels import philox
from ..base import BatchContext, Method, MethodOutput
from ..options import one_of, option
from ..registry import register
from ..stages import DiffusionOptions


@dataclass(frozen=True)
class DiffPureOptions(DiffusionOptions):
    # t* in trained timesteps, as for `ddpm`: DiffPure's t* = 0.1 is 100 of 1000. The same option (its
    # help is DiffusionOptions'), with DiffPure's default.
    t_star: int = DiffusionOptions.t_star_default(100)
    solver: str = option("sde", "diffpure: the reverse-time solver, sde (Euler-Maruyama of the reverse VP-SDE) or "
                         "ode (Euler on the probability-flow ODE, deterministic after the diffusion)", type=str,
                         check=one_of(SOLVERS))

    def vpsde(self) -> DiffPureConfig:
        """The continuous-time run: t* / N, and `reverse_steps` solver steps (default t*: dt = 1 / N)."""
        n = self.num_train_timesteps
        return DiffPureConfig(t_star=self.t_star / n, solver=self.solver, steps=self.reverse_steps or self.t_star,
                              sde=VPSDE(self.beta_start, self.beta_end, n))


@register
class DiffPure(Method):
    name = "diffpure"
    label = "DiffPure"
    help = "DiffPure: diffuse to t* = 100 (t = 0.1), then solve the reverse VP-SDE (or ODE) back to 0"
    Config = DiffPureOptions
    presets = {"tiny": {"t_star": 20}}
    networks = ("unet",)
    noise_streams = (philox.STREAM_DIFFPURE_FORWARD, philox.STREAM_DIFFPURE_SDE)
    differentiable = True

    def network_evaluations(self) -> int:
        return self.config.vpsde().steps

    def purify(self, x, ctx: BatchContext) -> MethodOutput:
        return MethodOutput(diffpure(x, ctx.networks, self.config.vpsde(), key=ctx.key, on_step=ctx.on_step))

    def purify_differentiable(self, x, ctx: BatchContext):
        """The same dynamics on the fp32 eager UNet with autograd (a fresh noise key per call, a fresh draw)."""
        return diffpure(x, DifferentiableEpsilon(ctx.networks.unet, checkpoint=ctx.checkpoint), self.config.vpsde(), key=ctx.key)
