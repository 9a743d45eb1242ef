"""`guided`: DDPM purification whose reverse steps are pulled toward the input (GDMP, Wang et al. 2022), in
pixels (MSE, SSIM) or in the features of an adversarially trained network (adversarial guidance, Lin et al.
2024); the dynamics and the choices made are in `puregen.engine.guided`."""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.guided import GUIDE_MODES, GuidanceConfig, guided_diffuse_denoise
from ...engine.samplers import DifferentiableEpsilon
from ...kernels import philox, reference
from ...errors import InputError
from ...models.checkpoints import load_model
from ...models.classifiers import FeatureExtractor
from ..base import BatchContext, Method, MethodOutput
from ..options import one_of, option, positive_number, within
from ..registry import register
from ..stages import DiffusionOptions


@dataclass(frozen=True)
class GuidedOptions(DiffusionOptions):
    # GDMP starts its reverse process at t = 70 of 1000 (the same --t-star option, with that default).
    t_star: int = DiffusionOptions.t_star_default(70)
    guide_mode: str = option("mse", "guided: the similarity that pulls each reverse step toward the input, mse "
                             "(negative mean squared error per sample), ssim, or adversarial (the distance between "
                             "the features of --guide-classifier)", type=str, check=one_of(GUIDE_MODES))
    guide_classifier: str | None = option(None, "guided --guide-mode adversarial: the adversarially trained "
                                          "classifier (`puregen train classifier --adversarial`) whose features "
                                          "measure the distance", type=str)
    guide_scale: float = option(600.0, "guided: the guidance scale (GDMP's m = (2 eps / 3) / scale; 600 is its "
                                "CIFAR-10 value read per sample)", check=positive_number)
    guide_budget: float = option(8 / 255, "guided: the attack budget eps in [0, 1] pixel units that the guidance "
                                 "scale is written against", check=within(1e-6, 1.0))

    def guidance(self) -> GuidanceConfig:
        return GuidanceConfig(mode=self.guide_mode, scale=self.guide_scale, budget=self.guide_budget)

    def validate(self) -> None:
        super().validate()
        if (self.guide_mode == "adversarial") != (self.guide_classifier is not None):
            raise InputError("--guide-mode adversarial needs --guide-classifier DIR (an adversarially trained "
                             "classifier), and --guide-classifier applies to that mode only")


@register
class GuidedDiffusion(Method):
    name = "guided"
    label = "GDMP-guided"
    help = "GDMP: diffuse to t* = 70, then DDPM reverse steps guided toward the input (MSE, SSIM or robust features)"
    Config = GuidedOptions
    presets = {"tiny": {"t_star": 10}}
    networks = ("unet",)
    noise_streams = (philox.STREAM_DDPM_FORWARD, philox.STREAM_DDPM_REVERSE, philox.STREAM_GUIDED_TARGET)
    differentiable = True

    def __init__(self, config):
        super().__init__(config)
        # The auxiliary network is loaded here, so a missing or mismatched checkpoint fails before any work.
        self.features = None
        if config.guide_classifier is not None:
            classifier = load_model(config.guide_classifier, expect="classifier").model
            self.features = FeatureExtractor(classifier).eval().requires_grad_(False)

    def network_evaluations(self) -> int:
        return self.config.diffusion().network_evaluations

    def purify(self, x, ctx: BatchContext) -> MethodOutput:
        return MethodOutput(guided_diffuse_denoise(x, ctx.networks, self.config.diffusion(), self.config.guidance(),
                                                   key=ctx.key, on_step=ctx.on_step, features=self.features))

    def purify_differentiable(self, x, ctx: BatchContext):
        """The same dynamics on the torch reference steps and the fp32 UNet with autograd. The guidance's own
        gradient is differentiated through (SSIM: a double backward), so an attack sees the whole map."""
        return guided_diffuse_denoise(x, DifferentiableEpsilon(ctx.networks.unet, checkpoint=ctx.checkpoint), self.config.diffusion(),
                                      self.config.guidance(), key=ctx.key, kernels=reference, differentiable=True,
                                      features=self.features)
