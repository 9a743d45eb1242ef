"""ONNX export of the two networks the purifiers evaluate, checked against the torch oracle.

An export is three files in one folder, named by what they hold and the
image shape they take (the batch axis is dynamic):

* `<kind>-<C>x<H>x<W>.onnx`: the graph;
* `<kind>-<C>x<H>x<W>.onnx.data`: its weights (ONNX external data);
* `<kind>-<C>x<H>x<W>.json`: the sidecar: model config, opset, input and
  output names, the fingerprint of the weights it was exported from, the
  sha256 of both files and the validation it passed.

`kind` is `ebm-grad` (images -> grad_x G, G; without 1/temp) or `unet-eps`
(images, timesteps -> epsilon). An export is validated before it is kept:
ONNX Runtime runs it on random inputs at several batch sizes and its output
is compared with the fp32 eager torch model; over the tolerance, the export
fails and nothing is written. Loading checks the sidecar and both hashes, so
a corrupt, truncated or mismatched file is an error, never a silent wrong
answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..models.checkpoints import file_sha256
from .gradient_graph import EnergyGradient, trace_batch

SIDECAR_FORMAT = "puregen-onnx"
SIDECAR_VERSION = 1
KINDS = ("ebm-grad", "unet-eps")
# Largest |onnx - torch| allowed, relative to the largest |torch| output. ONNX
# Runtime fuses and reorders fp32 arithmetic, which moves results by ~1e-6 of
# their scale; a wrong graph is off by orders of magnitude more.
DEFAULT_TOLERANCE = 1e-4
DEFAULT_VALIDATION_BATCHES = (1, 7, 64)
MAX_BATCH = 1 << 16

log = logging.getLogger(__name__)


class ExportError(InputError):
    """An export failed its validation, or an exported file is missing, corrupt or does not match."""


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's configuration and fp32 weights: which network an export was made from."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def missing_onnx_packages() -> list[str]:
    """The packages of the `onnx` extra that are not installed."""
    import importlib.util

    return [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]


def require_onnx() -> None:
    """A clear error when the export's dependencies are missing."""
    missing = missing_onnx_packages()
    if missing:
        raise InputError(
            f"ONNX export and the onnxruntime backend need {', '.join(missing)}: "
            "pip install 'puregen[onnx]' (or onnxruntime-gpu instead of onnxruntime on a CUDA machine; never both)"
        )


@dataclass(frozen=True)
class ExportedGraph:
    """One validated export on disk."""

    onnx_path: Path
    sidecar: dict

    @property
    def kind(self) -> str:
        return self.sidecar["kind"]

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.sidecar["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.sidecar["outputs"]]

    def output_buffers(self, batch: int, device: torch.device) -> list[torch.Tensor]:
        """Empty fp32 tensors of the outputs' shapes at `batch`, for a runtime to write into."""
        return [torch.empty([batch if d == "batch" else int(d) for d in o["shape"]], dtype=torch.float32,
                            device=device) for o in self.sidecar["outputs"]]


def stem(kind: str, image_shape: tuple[int, int, int]) -> str:
    c, h, w = image_shape
    return f"{kind}-{c}x{h}x{w}"


def _kind_of(model: nn.Module) -> str:
    from ..models.checkpoints import model_type_of

    kind = {"ebm": "ebm-grad", "unet": "unet-eps"}.get(model_type_of(model))
    if kind is None:
        raise InputError(f"only the EBM and the DDPM UNet are exported, not a {type(model).__name__}")
    return kind


def _io_spec(kind: str, image_shape) -> tuple[list[dict], list[dict]]:
    images = {"name": "images", "shape": ["batch", *image_shape], "dtype": "float32"}
    if kind == "ebm-grad":
        return [images], [
            {"name": "grad", "shape": ["batch", *image_shape], "dtype": "float32"},
            {"name": "energy", "shape": ["batch"], "dtype": "float32"},
        ]
    return [images, {"name": "timesteps", "shape": ["batch"], "dtype": "int64"}], [
        {"name": "epsilon", "shape": ["batch", *image_shape], "dtype": "float32"}
    ]


def _example_inputs(kind: str, model: nn.Module, image_shape, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random model-space inputs (never zeros): images in [-1, 1], timesteps over the trained range."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, *image_shape, generator=g) * 2 - 1
    if kind == "ebm-grad":
        return (images,)
    t_max = int(getattr(model.config, "num_train_timesteps", 1000) or 1000)
    return images, torch.randint(0, t_max, (batch,), generator=g, dtype=torch.int64)


def torch_reference(kind: str, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """The fp32 eager oracle for an export's outputs."""
    if kind == "ebm-grad":
        x = inputs[0].clone().requires_grad_(True)
        with torch.enable_grad():
            energy = model(x).reshape(-1)
            (grad,) = torch.autograd.grad(energy.sum(), x)
        return [grad.numpy(), energy.detach().numpy()]
    with torch.no_grad():
        return [model(*inputs).numpy()]


def _traceable(kind: str, model: nn.Module, example: tuple[torch.Tensor, ...]) -> nn.Module:
    if kind == "ebm-grad":
        return EnergyGradient(model, tuple(example[0].shape[1:])).eval()
    return model


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress lines and warnings a user of `puregen export` cannot act on."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def export_onnx(
    model: nn.Module,
    image_shape: tuple[int, int, int],
    folder: str | os.PathLike,
    *,
    source: dict | None = None,
    fingerprint: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    validation_batches: tuple[int, ...] = DEFAULT_VALIDATION_BATCHES,
    overwrite: bool = False,
) -> ExportedGraph:
    """Export `model` (an EBM: its input gradient; a UNet: epsilon) for images of `image_shape` (C, H, W).

    Writes the three files into `folder` after validating the graph with ONNX
    Runtime; `source` (for example the checkpoint's path and sha256) is kept in
    the sidecar, with `fingerprint` (`weights_fingerprint(model)`, computed if
    not given). Returns the export; raises ExportError if it fails.
    """
    require_onnx()
    kind = _kind_of(model)
    image_shape = tuple(int(v) for v in image_shape)
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise InputError(f"image shape must be (channels, height, width), got {image_shape}")
    if image_shape[0] != model.config.in_channels:
        raise InputError(f"the {kind} model takes {model.config.in_channels} channel(s), not {image_shape[0]}")
    if len(validation_batches) < 2:
        raise InputError("validate at two batch sizes at least: the batch axis is dynamic")
    folder = Path(folder)
    name = stem(kind, image_shape)
    final = folder / f"{name}.onnx"
    if not overwrite and (final.exists() or (folder / f"{name}.json").exists()):
        raise InputError(f"{final}: already exists; pass --overwrite to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", torch.float32).eval().requires_grad_(False)
    inputs_spec, outputs_spec = _io_spec(kind, image_shape)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{name}.") as tmp:
        tmp_onnx = Path(tmp) / final.name
        example = _example_inputs(kind, model, image_shape, batch=trace_batch(image_shape), seed=0)
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        dynamic = tuple({0: batch} for _ in example)
        with _quiet_exporter():
            try:
                torch.onnx.export(
                    _traceable(kind, model, example), example, str(tmp_onnx), dynamo=True, external_data=True,
                    input_names=[i["name"] for i in inputs_spec], output_names=[o["name"] for o in outputs_spec],
                    dynamic_shapes=dynamic,
                )
            except Exception as e:  # noqa: BLE001 - the exporter raises many types; name the model and shape
                raise ExportError(f"{final}: torch.onnx.export failed for the {kind} graph: {e}") from e
        data = Path(str(tmp_onnx) + ".data")
        if not data.exists():
            raise ExportError(f"{final}: the exporter wrote no weights file {data.name}")
        validation = validate(tmp_onnx, kind, model, image_shape, outputs_spec, tolerance, validation_batches)
        sidecar = {
            "format": SIDECAR_FORMAT,
            "format_version": SIDECAR_VERSION,
            "kind": kind,
            "image_shape": list(image_shape),
            "model_type": "ebm" if kind == "ebm-grad" else "unet",
            "model_config": model.config.to_dict(),
            "weights_fingerprint": fingerprint or weights_fingerprint(model),
            "source": source or {},
            "opset": _opset(tmp_onnx),
            "inputs": inputs_spec,
            "outputs": outputs_spec,
            "onnx_file": final.name,
            "onnx_sha256": file_sha256(tmp_onnx),
            "data_file": data.name,
            "data_sha256": file_sha256(data),
            "validation": validation,
            "export_seconds": round(time.perf_counter() - started, 2),
            "versions": _versions(),
        }
        # The sidecar goes last: a folder with a graph but no sidecar is an unfinished export.
        (folder / f"{name}.json").unlink(missing_ok=True)
        os.replace(data, folder / data.name)
        os.replace(tmp_onnx, final)
        tmp_json = Path(tmp) / f"{name}.json"
        tmp_json.write_text(json.dumps(sidecar, indent=2) + "\n")
        os.replace(tmp_json, folder / f"{name}.json")
    return ExportedGraph(final, sidecar)


def _opset(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return int(next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")))


def _versions() -> dict:
    import onnx
    import onnxruntime

    from .. import __version__

    return {"puregen": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def validate(onnx_path, kind, model, image_shape, outputs_spec, tolerance, batches) -> dict:
    """Run the graph with ONNX Runtime (CPU) at each batch size against the torch oracle.

    Returns the errors per batch size; raises ExportError if any is over `tolerance`.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    report, worst = {}, 0.0
    for n, batch in enumerate(batches):
        inputs = _example_inputs(kind, model, image_shape, batch, seed=1000 + n)
        expected = torch_reference(kind, model, inputs)
        got = session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})
        errors = {}
        for spec, e, g in zip(outputs_spec, expected, got):
            if g.shape != e.shape:
                raise ExportError(f"{onnx_path}: output {spec['name']} has shape {g.shape} at batch {batch}, "
                                  f"expected {e.shape}")
            max_abs = float(np.abs(g - e).max())
            scale = float(np.abs(e).max())
            rel = max_abs / scale if scale > 0 else max_abs
            errors[spec["name"]] = {"max_abs": max_abs, "max_rel": rel, "max_ref": scale}
            worst = max(worst, rel)
        report[str(batch)] = errors
    summary = "; ".join(
        f"batch {b}: " + ", ".join(f"{k} max abs {v['max_abs']:.2e} (rel {v['max_rel']:.2e})" for k, v in e.items())
        for b, e in report.items()
    )
    log.info("validated %s against torch: %s; tolerance %.0e", Path(onnx_path).name, summary, tolerance)
    if not worst <= tolerance:  # also catches NaN
        raise ExportError(
            f"{onnx_path}: the exported {kind} graph disagrees with the torch model: {summary}; the tolerance is "
            f"{tolerance:.0e} of the largest output. Nothing was written."
        )
    return {"tolerance": tolerance, "relative_to": "largest |torch output|", "batches": report,
            "worst_relative": worst, "summary": summary}


def load_exported(
    folder: str | os.PathLike,
    kind: str,
    image_shape: tuple[int, int, int],
    *,
    expect_fingerprint: str | None = None,
    verify_hashes: bool = True,
) -> ExportedGraph:
    """The export of `kind` for `image_shape` in `folder`, after checking that it is whole and matches."""
    folder = Path(folder)
    name = stem(kind, tuple(image_shape))
    sidecar_path, onnx_path = folder / f"{name}.json", folder / f"{name}.onnx"
    if not sidecar_path.exists():
        raise ExportError(f"{sidecar_path}: no export of the {kind} graph for images of "
                          f"{'x'.join(map(str, image_shape))} here; run `puregen export onnx` first")
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{sidecar_path}: unreadable export sidecar ({e}); export again with --overwrite") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise ExportError(f"{sidecar_path}: not a puregen ONNX export sidecar")
    if sidecar.get("format_version") != SIDECAR_VERSION:
        raise ExportError(f"{sidecar_path}: sidecar version {sidecar.get('format_version')!r} is not supported "
                          f"(this version reads {SIDECAR_VERSION}); export again")
    if sidecar.get("kind") != kind or list(sidecar.get("image_shape", [])) != list(image_shape):
        raise ExportError(f"{sidecar_path}: holds {sidecar.get('kind')} for {sidecar.get('image_shape')}, "
                          f"not {kind} for {list(image_shape)}")
    if expect_fingerprint is not None and sidecar.get("weights_fingerprint") != expect_fingerprint:
        raise ExportError(
            f"{sidecar_path}: this export was made from other weights than the checkpoint loaded "
            f"(fingerprint {str(sidecar.get('weights_fingerprint'))[:12]}..., the model's is "
            f"{expect_fingerprint[:12]}...); export again from this checkpoint or use another folder"
        )
    for file_key, hash_key in (("onnx_file", "onnx_sha256"), ("data_file", "data_sha256")):
        path = folder / str(sidecar.get(file_key, ""))
        if not path.is_file():
            raise ExportError(f"{path}: missing (named by {sidecar_path.name}); export again")
        if verify_hashes and file_sha256(path) != sidecar.get(hash_key):
            raise ExportError(f"{path}: corrupt or changed since export (sha256 differs from {sidecar_path.name}); "
                              "export again with --overwrite")
    return ExportedGraph(onnx_path, sidecar)


def ensure_exported(model: nn.Module, image_shape, folder, *, fingerprint: str | None = None,
                    source: dict | None = None) -> ExportedGraph:
    """The export for `model` in `folder`, made now (and validated) if the folder has none yet."""
    kind = _kind_of(model)
    fingerprint = fingerprint or weights_fingerprint(model)
    name = stem(kind, tuple(image_shape))
    # Worker processes that start together must not export into one folder at once.
    with _folder_lock(Path(folder)):
        if (Path(folder) / f"{name}.json").exists():
            return load_exported(folder, kind, image_shape, expect_fingerprint=fingerprint)
        log.info("exporting the %s graph for %s to %s", kind, image_shape, folder)
        return export_onnx(model, image_shape, folder, source=source, fingerprint=fingerprint, overwrite=True)


@contextlib.contextmanager
def _folder_lock(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (one process per cache folder there)
        yield
        return
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def default_cache_dir() -> Path:
    """Where the onnxruntime and tensorrt backends keep their exports: $PUREGEN_CACHE_DIR or ~/.cache/puregen."""
    root = os.environ.get("PUREGEN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "puregen"
    )
    return Path(root)


def cache_folder_for(fingerprint: str) -> Path:
    """One folder per network's weights, so a cached export can never belong to another model."""
    return default_cache_dir() / "onnx" / fingerprint[:24]
