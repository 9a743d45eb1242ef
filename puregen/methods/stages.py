"""The options of the two building blocks every built-in method is made of, declared once.

A method built from Langevin and diffusion stages inherits these option
classes in its config, so `--steps`, `--temp`, `--t-star` and
`--reverse-steps` mean the same in every method that reads them, and each
is written (help, type, check) in one place. A method with other defaults
sets them in its presets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..engine.samplers import DiffusionConfig, LangevinConfig
from ..errors import InputError
from .options import MethodConfig, at_least, option, positive_number


@dataclass(frozen=True)
class LangevinOptions(MethodConfig):
    steps: int = option(150, "Langevin steps of the EBM stage (reps: of each repetition's stage)", check=at_least(1))
    temp: float = option(1e-4, "Langevin temperature (published 1e-4; lower pulls harder toward the EBM's modes "
                         "at the same noise)", check=positive_number)
    eps: float = 1.25e-2

    def langevin(self) -> LangevinConfig:
        return LangevinConfig(steps=self.steps, eps=self.eps, temp=self.temp)


@dataclass(frozen=True)
class DiffusionOptions(MethodConfig):
    t_star: int = option(75, "DDPM diffusion depth t* (reps, filt: of their DDPM pass)", type=int)
    reverse_steps: int | None = option(None, "DDPM reverse steps actually run, spread evenly over the t* trained "
                                       "timesteps (respacing; default: all t*)", type=int, check=at_least(1))
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000
    clip_x0: bool = True

    def diffusion(self) -> DiffusionConfig:
        return DiffusionConfig(t_star=self.t_star, beta_start=self.beta_start, beta_end=self.beta_end,
                               num_train_timesteps=self.num_train_timesteps, clip_x0=self.clip_x0,
                               reverse_steps=self.reverse_steps)

    @staticmethod
    def t_star_default(value: int):
        """The `t_star` field for a method whose published depth differs (`diffpure`, `guided`): the same
        option, its help written once here, with another default."""
        return dataclasses.field(default=value, metadata=DiffusionOptions.__dataclass_fields__["t_star"].metadata)

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.t_star <= self.num_train_timesteps:
            raise InputError(f"--t-star must be in [1, {self.num_train_timesteps}], got {self.t_star}")
        if self.reverse_steps is not None and self.reverse_steps > self.t_star:
            raise InputError(f"--reverse-steps {self.reverse_steps} is more than the {self.t_star} timesteps of t*; "
                             f"it can run at most t* steps")
