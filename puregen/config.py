"""Typed configuration of the purification methods, with named presets.

`paper` holds the published hyperparameters of PureGen (arXiv 2405.18627),
which are the dataclass defaults below (README's "Methods and defaults"
table); `tiny` is for tests and CPU demos (few steps, small models).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import InputError

METHODS = ("ebm", "ddpm", "naive", "reps", "filt", "jpeg")
PRESETS = ("paper", "tiny")

# Which methods read each override of `method_config` (the CLI refuses an option its method ignores).
OPTION_METHODS = {
    "steps": ("ebm", "naive", "reps"),
    "temp": ("ebm", "naive", "reps"),
    "t_star": ("ddpm", "naive", "reps", "filt"),
    "reverse_steps": ("ddpm", "naive", "reps", "filt"),
    "reps": ("reps",),
    "filter_frac": ("filt",),
    "energy_threshold": ("filt",),
    "jpeg_quality": ("jpeg",),
}


def check_options_apply(method: str, options: dict) -> None:
    """Refuse options (name -> value, None = not given) that `method` does not read."""
    for name, value in options.items():
        if value is not None and method not in OPTION_METHODS[name]:
            flag = "--" + name.replace("_", "-")
            reads = sorted("--" + o.replace("_", "-") for o, ms in OPTION_METHODS.items() if method in ms)
            raise InputError(f"{flag} does not apply to --method {method} "
                             f"(it reads {', '.join(reads) if reads else 'no such option'})")


@dataclass(frozen=True)
class LangevinConfig:
    steps: int = 150
    eps: float = 1.25e-2
    temp: float = 1e-4

    @property
    def drift(self) -> float:
        """The fp32 factor on grad_x G: eps^2 / (2 temp)."""
        return self.eps**2 / (2.0 * self.temp)


@dataclass(frozen=True)
class DiffusionConfig:
    t_star: int = 75
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000
    clip_x0: bool = True
    # Reverse steps actually run, spread evenly over the t* trained timesteps (respacing, as in
    # improved-diffusion); None runs all t*. Fewer steps trade fidelity for speed at the same noise level.
    reverse_steps: int | None = None


@dataclass(frozen=True)
class RepsConfig:
    ebm_steps: int = 10
    t_star: int = 50
    reps: int = 5


@dataclass(frozen=True)
class FiltConfig:
    filter_frac: float = 0.5
    t_star: int = 125
    # A stream has no global quantile: there the threshold must be given.
    energy_threshold: float | None = None


@dataclass(frozen=True)
class JPEGConfig:
    quality: int = 75


@dataclass(frozen=True)
class MethodConfig:
    method: str
    preset: str = "paper"
    langevin: LangevinConfig = field(default_factory=LangevinConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    reps: RepsConfig = field(default_factory=RepsConfig)
    filt: FiltConfig = field(default_factory=FiltConfig)
    jpeg: JPEGConfig = field(default_factory=JPEGConfig)

    @property
    def needs_ebm(self) -> bool:
        return self.method in ("ebm", "naive", "reps", "filt")

    @property
    def needs_ddpm(self) -> bool:
        return self.method in ("ddpm", "naive", "reps", "filt")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _preset(preset: str, method: str) -> MethodConfig:
    if preset == "paper":
        return MethodConfig(method=method, preset=preset)
    if preset == "tiny":
        return MethodConfig(
            method=method,
            preset=preset,
            langevin=LangevinConfig(steps=20),
            diffusion=DiffusionConfig(t_star=20),
            reps=RepsConfig(ebm_steps=5, t_star=10, reps=2),
            filt=FiltConfig(filter_frac=0.5, t_star=20),
        )
    raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


def method_config(
    method: str,
    preset: str = "paper",
    *,
    steps: int | None = None,
    t_star: int | None = None,
    reps: int | None = None,
    filter_frac: float | None = None,
    energy_threshold: float | None = None,
    jpeg_quality: int | None = None,
    reverse_steps: int | None = None,
    temp: float | None = None,
) -> MethodConfig:
    """The preset's configuration of `method`, with the command line's overrides.

    `steps` and `t_star` apply to the stage they name in the chosen method:
    for `reps` they set the EBM steps and t* of each repetition, for `filt`
    the t* of its DDPM pass. `temp` is the Langevin temperature of every EBM
    stage: below the temperature the EBM was trained at, the chain samples a
    sharpened model, so its drift pulls harder at the same noise.
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    cfg = _preset(preset, method)
    if steps is not None:
        if steps < 1:
            raise InputError(f"--steps must be >= 1, got {steps}")
        cfg = dataclasses.replace(cfg, langevin=dataclasses.replace(cfg.langevin, steps=steps))
        cfg = dataclasses.replace(cfg, reps=dataclasses.replace(cfg.reps, ebm_steps=steps))
    if temp is not None:
        if not (math.isfinite(temp) and temp > 0):
            raise InputError(f"--temp must be a positive number, got {temp}")
        cfg = dataclasses.replace(cfg, langevin=dataclasses.replace(cfg.langevin, temp=float(temp)))
    if t_star is not None:
        if not 1 <= t_star <= cfg.diffusion.num_train_timesteps:
            raise InputError(f"--t-star must be in [1, {cfg.diffusion.num_train_timesteps}], got {t_star}")
        cfg = dataclasses.replace(
            cfg,
            diffusion=dataclasses.replace(cfg.diffusion, t_star=t_star),
            reps=dataclasses.replace(cfg.reps, t_star=t_star),
            filt=dataclasses.replace(cfg.filt, t_star=t_star),
        )
    if reverse_steps is not None:
        if reverse_steps < 1:
            raise InputError(f"--reverse-steps must be >= 1, got {reverse_steps}")
        cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, reverse_steps=reverse_steps))
    if reps is not None:
        if reps < 1:
            raise InputError(f"--reps must be >= 1, got {reps}")
        cfg = dataclasses.replace(cfg, reps=dataclasses.replace(cfg.reps, reps=reps))
    if filter_frac is not None:
        if not 0.0 <= filter_frac <= 1.0:
            raise InputError(f"--filter-frac must be in [0, 1], got {filter_frac}")
        cfg = dataclasses.replace(cfg, filt=dataclasses.replace(cfg.filt, filter_frac=filter_frac))
    if energy_threshold is not None:
        cfg = dataclasses.replace(cfg, filt=dataclasses.replace(cfg.filt, energy_threshold=float(energy_threshold)))
    if jpeg_quality is not None:
        if not 1 <= jpeg_quality <= 100:
            raise InputError(f"JPEG quality must be in [1, 100], got {jpeg_quality}")
        cfg = dataclasses.replace(cfg, jpeg=JPEGConfig(quality=jpeg_quality))
    reverse = cfg.diffusion.reverse_steps
    if reverse is not None and cfg.needs_ddpm:
        stage_t_star = {"reps": cfg.reps.t_star, "filt": cfg.filt.t_star}.get(method, cfg.diffusion.t_star)
        if reverse > stage_t_star:
            raise InputError(f"--reverse-steps {reverse} is more than the {stage_t_star} timesteps of t*; "
                             f"it can run at most t* steps")
    return cfg
