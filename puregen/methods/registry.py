"""The method registry: every purification method, built in or not, looked up by name.

The engine, the pipeline, the command line, the benchmarks and the evaluation
harness find a method here and read what it declares; none of them knows a
method by name. Built-in methods are registered on first lookup. A method in
a user's module registers with `register(MyMethod)`; an installed package
registers its methods through the entry-point group ``puregen.methods``
(each entry point names a `Method` subclass), loaded on first lookup too.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import threading
from importlib.metadata import entry_points

from ..errors import InputError
from ..kernels import philox
from .base import SCOPES, Method
from .options import MethodConfig, options_of

ENTRY_POINT_GROUP = "puregen.methods"
BUILT_IN_PACKAGE = f"{__package__}.builtin"  # every module in it is a method (or several)
# The order `--help` and `--method` list the built-in methods in: the PureGen paper's. A module this
# does not name comes after these, by name.
LISTING_ORDER = ("ebm", "ddpm", "naive", "reps", "filt", "jpeg")

# Keywords the purifier's loader and the job already take: a method option of one of these names would be
# shadowed on the command line and in the API.
RESERVED_OPTIONS = frozenset({
    "method", "checkpoint", "ebm", "ddpm", "preset", "device", "precision", "backend", "micro_batch", "threads",
    "channels_last", "onnx_dir", "seed", "indices", "offset", "batch_size", "chunk_size", "resume", "overwrite",
    "limit", "input_format", "split", "progress", "log", "purifier", "input", "output", "engine", "no_progress",
})

_methods: dict[str, type[Method]] = {}
_lock = threading.RLock()
_loaded = False


def register(method: type[Method], *, replace: bool = False) -> type[Method]:
    """Make `method` available to the API, the pipeline and `puregen purify --method NAME`.

    Usable as a class decorator. A second method of the same name is an error unless `replace`.
    """
    _check_declaration(method)
    _ensure_loaded()  # a user's method must not silently take a built-in's name
    with _lock:
        if method.name in _methods and _methods[method.name] is not method and not replace:
            raise ValueError(f"a method named {method.name!r} is already registered "
                             f"({_methods[method.name].__module__}); pass replace=True to override it")
        _methods[method.name] = method
    return method


def unregister(name: str) -> None:
    with _lock:
        _methods.pop(name, None)


def get(name: str) -> type[Method]:
    _ensure_loaded()
    try:
        return _methods[name]
    except KeyError:
        raise InputError(f"unknown method {name!r}; choose one of {', '.join(names())}") from None


def names() -> tuple[str, ...]:
    _ensure_loaded()
    return tuple(_methods)


def all_methods() -> tuple[type[Method], ...]:
    _ensure_loaded()
    return tuple(_methods.values())


def _ensure_loaded() -> None:
    global _loaded
    with _lock:
        if _loaded:
            return
        _loaded = True
        package = importlib.import_module(BUILT_IN_PACKAGE)
        modules = sorted((m.name for m in pkgutil.iter_modules(package.__path__)),
                         key=lambda name: (LISTING_ORDER.index(name) if name in LISTING_ORDER else len(LISTING_ORDER),
                                           name))
        for module in modules:
            importlib.import_module(f"{BUILT_IN_PACKAGE}.{module}")
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                method = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plug-in must not break the built-in methods
                raise RuntimeError(f"the {ENTRY_POINT_GROUP} entry point {ep.name!r} ({ep.value}) failed to load: "
                                   f"{type(e).__name__}: {e}") from e
            register(method)


def _check_declaration(method) -> None:
    """A method that declares something impossible fails when it registers, not mid-job."""
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise TypeError(f"register takes a subclass of puregen.methods.Method, got {method!r}")
    where = f"method {getattr(method, 'name', method.__name__)!r} ({method.__module__}.{method.__qualname__})"
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise ValueError(f"{where}: name must be lower-case letters, digits, - or _, got {name!r}")
    if not isinstance(getattr(method, "help", None), str) or not method.help:
        raise ValueError(f"{where}: needs a one-line help")
    if not (isinstance(getattr(method, "Config", None), type) and dataclasses.is_dataclass(method.Config)
            and issubclass(method.Config, MethodConfig)):
        raise ValueError(f"{where}: needs a Config dataclass derived from puregen.methods.MethodConfig")
    clash = sorted(set(options_of(method.Config)) & RESERVED_OPTIONS)
    if clash:
        raise ValueError(f"{where}: options {clash} are the loader's or the job's own keywords; rename them")
    if method.scope not in SCOPES:
        raise ValueError(f"{where}: scope must be one of {', '.join(SCOPES)}, got {method.scope!r}")
    for kind in method.networks:
        from .networks import NETWORKS

        if kind not in NETWORKS:
            raise ValueError(f"{where}: unknown network {kind!r}; known: {', '.join(NETWORKS)}")
    for stream in method.noise_streams:
        if not 0 <= stream <= philox.MAX_STREAM:
            raise ValueError(f"{where}: noise stream {stream} outside 0..{philox.MAX_STREAM}")


def configure(name: str, preset: str = "paper", **options) -> Method:
    """The method `name` with the preset's config and the given options (None = not given), all checked."""
    from .options import build_config

    method = get(name)
    return method(build_config(method.Config, method.presets, preset, name, options))
