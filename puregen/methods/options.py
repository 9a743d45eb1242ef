"""Method configurations: typed dataclasses whose option fields carry their flag, help and check.

A method's config is a frozen dataclass. A field declared with `option(...)`
is a user-facing option: `puregen purify` gets a flag for it (``--t-star``
for `t_star`, or the name given), the Python API takes it as a keyword of
the same name, and its check runs on every value, whether it came from a
preset, the command line or the API. Fields declared plainly are fixed by the
method and its presets.

Presets (`paper`, the published hyperparameters; `tiny`, for tests and CPU
demos) are per-method dicts of field values over the dataclass's defaults.
The same option name in two methods means the same thing (one flag serves
both), so it is declared once, in a shared options class that the methods'
configs inherit (see `puregen.methods.stages`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import InputError

PRESETS = ("paper", "tiny")

Check = Callable[[Any], "str | None"]  # returns what is wrong with a value, or None


@dataclass(frozen=True)
class Option:
    """What the command line and the API know of a config field."""

    help: str
    type: type  # what the flag parses: int, float or str
    check: Check | None = None
    name: str | None = None  # the API keyword / flag name when it is not the field's name

    def flag(self, field_name: str) -> str:
        return "--" + (self.name or field_name).replace("_", "-")


def option(default, help: str, *, type: type | None = None, check: Check | None = None, name: str | None = None):
    """A config field that users set (see the module docstring)."""
    kind = type if type is not None else builtin_type(default)
    return field(default=default, metadata={"option": Option(help, kind, check, name)})


def builtin_type(value) -> type:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"an option with default {value!r} needs an explicit type=")
    return type(value)


# -- checks --------------------------------------------------------------------------------------------


def at_least(low: int) -> Check:
    return lambda v: None if v >= low else f"must be >= {low}, got {v}"


def within(low: float, high: float) -> Check:
    return lambda v: None if low <= v <= high else f"must be in [{low:g}, {high:g}], got {v}"


def one_of(choices) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


def positive_number(v) -> str | None:
    return None if math.isfinite(v) and v > 0 else f"must be a positive number, got {v}"


def finite_number(v) -> str | None:
    return None if math.isfinite(v) else f"must be a finite number, got {v}"


# -- reading configs ------------------------------------------------------------------------------------


def options_of(config_cls) -> dict[str, tuple[str, Option]]:
    """API keyword -> (field name, Option) for every option field of a config class."""
    out = {}
    for f in dataclasses.fields(config_cls):
        opt = f.metadata.get("option")
        if opt is not None:
            out[opt.name or f.name] = (f.name, opt)
    return out


def build_config(config_cls, presets: Mapping[str, Mapping[str, Any]], preset: str, method: str,
                 overrides: Mapping[str, Any]):
    """`config_cls` with the preset's values and the given options (None = not given), every option checked.

    An option the method does not have is an error naming the options it has.
    """
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    known = options_of(config_cls)
    values = dict(presets.get(preset, {}))
    for keyword, value in overrides.items():
        if value is None:
            continue
        if keyword not in known:
            raise InputError(f"--{keyword.replace('_', '-')} does not apply to --method {method} "
                             f"(it reads {describe_flags(config_cls) or 'no such option'})")
        field_name, opt = known[keyword]
        values[field_name] = _coerce(value, opt, keyword)
    config = config_cls(**values)
    for keyword, (field_name, opt) in known.items():
        value = getattr(config, field_name)
        if opt.check is not None and value is not None:
            problem = opt.check(value)
            if problem:
                raise InputError(f"{opt.flag(field_name)} {problem}")
    config.validate()
    return config


def _coerce(value, opt: Option, keyword: str):
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if opt.type is float and numeric:
        return float(value)
    if opt.type is int and numeric and float(value).is_integer():
        return int(value)
    if opt.type is str and isinstance(value, str):
        return value
    raise InputError(f"--{keyword.replace('_', '-')} takes {'an integer' if opt.type is int else opt.type.__name__}, "
                     f"got {value!r}")


def describe_flags(config_cls) -> str:
    return ", ".join(sorted(opt.flag(field_name) for field_name, opt in options_of(config_cls).values()))


class MethodConfig:
    """The base of every method's config dataclass: cross-field checks and a stable dict."""

    def validate(self) -> None:
        """Checks that involve several fields (each field's own check has run)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
