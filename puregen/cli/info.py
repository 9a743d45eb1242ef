"""`puregen info`: versions, devices, backends and CPU features."""

from __future__ import annotations

import json

from . import EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, devices, backends and CPU features")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args) -> int:
    import torch

    from ..engine.provenance import run_provenance

    info = run_provenance()
    from ..backends import availability
    from ..backends.precision import cpu_has_native_bf16, resolve_precision
    from ..kernels import dispatch

    info["backends"] = availability()
    info["precision"] = {
        "auto on cpu": resolve_precision("auto", torch.device("cpu")),
        "cpu native bf16": cpu_has_native_bf16(),
    }
    if torch.cuda.is_available():
        info["precision"]["auto on cuda"] = resolve_precision("auto", torch.device("cuda"))
    info["kernels"] = dispatch.describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    for section, value in info.items():
        if isinstance(value, dict):
            print(f"{section}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{section}: {value}")
    return EXIT_OK
