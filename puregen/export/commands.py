"""`puregen export onnx|tensorrt`: export the purifiers' networks ahead of a run."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InputError

DEFAULT_SHIPPED_SHAPE = (1, 28, 28)  # the shipped Fashion-MNIST models


def parse_image_shape(text: str) -> tuple[int, int, int]:
    """`"1x28x28"` (channels x height x width)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--image-shape must be CxHxW, for example 3x32x32, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"--image-shape must be CxHxW with positive sides, got {text!r}")
    return shape


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise InputError(f"batch sizes must be >= 1, got {text!r}")
    return values


def _models(args) -> list[tuple[str, object, dict, tuple[int, int, int]]]:
    """(role, model, source, image shape) for each network to export."""
    from ..models.checkpoints import load_model
    from ..models.defaults import default_checkpoint

    if args.ebm is None and args.ddpm is None:
        asked = [("ebm", None), ("unet", None)]  # the shipped defaults
    else:
        asked = [(kind, path) for kind, path in (("ebm", args.ebm), ("unet", args.ddpm)) if path is not None]
    out = []
    for kind, path in asked:
        shipped = path is None
        loaded = load_model(default_checkpoint(kind) if shipped else path, expect=kind)
        if args.image_shape is not None:
            shape = parse_image_shape(args.image_shape)
        elif shipped:
            shape = DEFAULT_SHIPPED_SHAPE
        else:
            size = getattr(loaded.model.config, "sample_size", None) or 32
            shape = (loaded.model.config.in_channels, size, size)
        source = {"checkpoint": loaded.path, "weights_sha256": loaded.fingerprint, "shipped_default": shipped}
        out.append((kind, loaded.model, source, shape))
    return out


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export the networks to ONNX, or build TensorRT engines from them")
    esub = p.add_subparsers(dest="export_command", required=True, parser_class=type(p))

    onnx = esub.add_parser(
        "onnx",
        help="ONNX graphs of the EBM's input gradient and the DDPM's UNet, validated against torch",
        description="Writes <kind>-CxHxW.onnx, its .onnx.data weights and a .json sidecar per network into "
        "--out, after running the graph with ONNX Runtime at several batch sizes against the fp32 torch model. "
        "Without --ebm/--ddpm, exports the shipped default models. `puregen purify --backend onnxruntime "
        "--onnx-dir DIR` runs them.",
    )
    _common(onnx)
    onnx.add_argument("--tolerance", type=float, help="largest error allowed, relative to the largest output "
                      "(default 1e-4)")
    onnx.add_argument("--validate-batches", default="1,7,64", help="batch sizes of the validation (default 1,7,64)")
    onnx.set_defaults(func=_cmd_export_onnx)

    trt = esub.add_parser(
        "tensorrt",
        help="TensorRT engines from the ONNX graphs (experimental; needs TensorRT and an NVIDIA GPU)",
        description="Builds (or finds in the cache) an engine per network with a dynamic batch profile; "
        "engines are keyed by the ONNX file's hash, the precision flags, the profile, the TensorRT version and "
        "the GPU architecture. Not yet verified on hardware.",
    )
    _common(trt)
    trt.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16"))
    trt.add_argument("--batch-profile", default="1,16,64", help="MIN,OPT,MAX batch sizes (default 1,16,64)")
    trt.add_argument("--engine-dir", help="engine cache folder (default: ~/.cache/puregen/tensorrt)")
    trt.set_defaults(func=_cmd_export_tensorrt)


def _common(p) -> None:
    p.add_argument("--ebm", metavar="CKPT", help="EBM checkpoint folder")
    p.add_argument("--ddpm", metavar="CKPT", help="DDPM (UNet) checkpoint folder")
    p.add_argument("--image-shape", help="CxHxW of the images the graphs take (default: 1x28x28 for the shipped "
                   "models, else the model's channels at the UNet's sample_size, or 32x32 for an EBM)")
    p.add_argument("-o", "--out", required=True, help="folder for the ONNX files")
    p.add_argument("--overwrite", action="store_true", help="replace existing exports in --out")


def _cmd_export_onnx(args) -> int:
    from .onnx_export import DEFAULT_TOLERANCE, export_onnx

    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    batches = int_list(args.validate_batches)
    for kind, model, source, shape in _models(args):
        print(f"exporting the {'EBM input gradient' if kind == 'ebm' else 'UNet'} for {'x'.join(map(str, shape))} "
              f"images from {source['checkpoint']} ...", file=sys.stderr, flush=True)
        exported = export_onnx(model, shape, Path(args.out), source=source, tolerance=tolerance,
                               validation_batches=batches, overwrite=args.overwrite)
        v = exported.sidecar["validation"]
        print(f"wrote {exported.onnx_path} (+ .onnx.data, .json), opset {exported.sidecar['opset']}, "
              f"{exported.sidecar['export_seconds']} s")
        print(f"  validated against torch fp32: {v['summary']}; tolerance {v['tolerance']:.0e} of the largest output")
    return 0


def _cmd_export_tensorrt(args) -> int:
    import torch

    from .onnx_export import ensure_exported, export_onnx
    from .tensorrt_engines import BatchProfile, EngineCache, ensure_engine, import_tensorrt

    profile = BatchProfile.parse(args.batch_profile)
    import_tensorrt()  # a clear error before any export work when TensorRT is absent
    cache = EngineCache(args.engine_dir)
    for kind, model, source, shape in _models(args):
        if args.overwrite:
            exported = export_onnx(model, shape, Path(args.out), source=source, overwrite=True)
        else:
            exported = ensure_exported(model, shape, Path(args.out), source=source)
        ensure_engine(exported, args.precision, profile, cache, torch.device("cuda"))  # builds, or loads and checks
        print(f"engine ready for {exported.onnx_path} ({args.precision}, batch profile {args.batch_profile}) "
              f"in {cache.folder}")
    return 0
