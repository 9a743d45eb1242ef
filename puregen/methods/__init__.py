"""Purification methods: one module per method (the built-in ones in `builtin/`), each registered by name.

`puregen.methods.base.Method` is the interface; `registry` looks methods up
(built-in ones, those registered with `register`, and those of installed
packages' ``puregen.methods`` entry points). `docs/adding-a-method.md` walks
through writing one.
"""

from .base import BatchContext, Method, MethodOutput
from .options import MethodConfig, option
from .registry import all_methods, configure, get, names, register, unregister
from .stages import DiffusionOptions, LangevinOptions

__all__ = ["BatchContext", "DiffusionOptions", "LangevinOptions", "Method", "MethodConfig", "MethodOutput",
           "all_methods", "configure", "get", "names", "option", "register", "unregister"]
