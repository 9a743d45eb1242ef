"""`puregen purify`'s method flags, built from the registered methods' configs.

Each option field becomes one flag (an option of the same name in several
methods is one flag, its help written once where the option is declared),
and the help's epilog lists every method with its one-line help and the
flags it reads. A flag a method does not read is refused by `build_config`.
"""

from __future__ import annotations

import argparse

from .networks import NETWORKS
from .options import options_of
from .registry import all_methods


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    """--method, the checkpoint flags of every network a method may need, and every method's options."""
    methods = all_methods()
    parser.add_argument("--method", required=True, choices=[m.name for m in methods],
                        help="the purification method (listed below)")
    group = parser.add_argument_group("networks (each method loads those it needs; default: the shipped models)")
    for kind in NETWORKS.values():
        group.add_argument(f"--{kind.flag}", metavar="CKPT", help=f"{kind.what} checkpoint folder")
    group = parser.add_argument_group("method options (None given: the preset's values)")
    seen: dict[str, str] = {}
    for method in methods:
        for keyword, (field_name, opt) in options_of(method.Config).items():
            if keyword in seen:
                continue
            seen[keyword] = method.name
            readers = [m.name for m in methods if keyword in options_of(m.Config)]
            group.add_argument(opt.flag(field_name), dest=keyword, type=opt.type, default=None,
                               metavar={int: "N", float: "X"}.get(opt.type, "VALUE"),
                               help=f"{opt.help} [{', '.join(readers)}]")
    parser.epilog = methods_epilog()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def methods_epilog() -> str:
    """Each method's help line, networks, and options with their values in the paper preset."""
    from .options import build_config

    lines = ["methods (options with their paper-preset values):"]
    for method in all_methods():
        paper = build_config(method.Config, method.presets, "paper", method.name, {})
        flags = sorted(f"{opt.flag(f)}={getattr(paper, f)}" for f, opt in options_of(method.Config).values())
        networks = ", ".join(NETWORKS[k].flag for k in method.networks) or "none"
        lines.append(f"  {method.name:<7} {method.help}")
        lines.append(f"  {'':<7} networks: {networks}; options: {' '.join(flags) or 'none'}")
    return "\n".join(lines)


def method_options(args: argparse.Namespace) -> dict:
    """The method options given on the command line (keyword -> value), for `load_purifier`."""
    out = {}
    for method in all_methods():
        for keyword in options_of(method.Config):
            value = getattr(args, keyword, None)
            if value is not None:
                out[keyword] = value
    return out


def network_checkpoints(args: argparse.Namespace) -> dict:
    """The checkpoint flags given (API keyword -> folder)."""
    return {kind.flag: getattr(args, kind.flag) for kind in NETWORKS.values()}
