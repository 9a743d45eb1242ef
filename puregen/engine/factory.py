"""Build a ready purifier from a method name, checkpoints and run options."""

from __future__ import annotations

import os

import torch

from ..backends import DEFAULT_MICRO_BATCH, build_backend, check_backend
from ..errors import InputError
from ..methods.base import Method
from ..methods.networks import NETWORKS
from ..methods.registry import configure
from ..models.checkpoints import LoadedModel, load_model
from ..models.defaults import default_checkpoint
from .purifiers import Purifier

# A method's own networks (D-VAE's, fitted on the data) are plain modules: eager, or under torch.compile.
OWN_NETWORK_BACKENDS = ("torch", "compiled")

CHECKPOINT_HELP = (
    "No default model is shipped for it. Pass a local checkpoint folder: --ebm DIR for the EBM (our layout, "
    "or the published PureGen EBM in the Hugging Face hub layout: config.json + model.safetensors, downloaded "
    "by you), --ddpm DIR for the DDPM (our layout or a diffusers UNet2DModel folder: config.json + "
    "diffusion_pytorch_model.safetensors), or train one: `puregen train ebm|ddpm DATA -o DIR`. "
    "Random weights for timing only: `puregen checkpoint init ebm|ddpm --preset paper -o DIR`."
)


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"unknown device {device!r}; use cpu or cuda")
    return torch.device(device)


def pin_threads(threads: int | None) -> int:
    """Pin torch's intra-op thread count (part of the job's fingerprint) and return it."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def _load(path, kind: str, what: str, method: Method, preset: str) -> tuple[LoadedModel, bool]:
    """The checkpoint at `path`, else the shipped default; the flag says a default was used."""
    if path is None:
        shipped = default_checkpoint(kind)
        if shipped is None:
            raise InputError(
                f"method {method.name!r} with preset {preset!r} needs a {what} checkpoint. {CHECKPOINT_HELP}"
            )
        return load_model(shipped, expect=kind), True
    return load_model(path, expect=kind), False


def load_purifier(
    method: str,
    checkpoint=None,
    *,
    ebm=None,
    ddpm=None,
    preset: str = "paper",
    device: str = "cpu",
    precision: str = "fp32",
    backend: str = "torch",
    micro_batch: int = DEFAULT_MICRO_BATCH,
    threads: int | None = None,
    channels_last: bool | None = None,
    onnx_dir=None,
    **overrides,
) -> Purifier:
    """A ready purifier for `method`.

    `ebm` / `ddpm` are checkpoint folders or loaded nn.Modules; `checkpoint`
    is a shorthand for the one network of the `ebm` and `ddpm` methods.
    `precision` (fp32, bf16, fp16, auto) and `backend` (torch = eager,
    compiled = torch.compile) choose the fast path; `channels_last` defaults
    to on for the compiled backend. `onnxruntime` and `tensorrt` run exported graphs: those in
    `onnx_dir`, else exports made on first use and cached per network (see `puregen.export`).
    `overrides`: the method's options (`puregen purify --help` lists them per method: steps, t_star,
    reps, ...); an option the method does not read is an error.
    """
    algorithm = configure(method, preset, **overrides)
    given = {"ebm": ebm, "unet": ddpm}
    if checkpoint is not None:
        if len(algorithm.networks) != 1:
            raise TypeError(f"method {method!r} takes one checkpoint per network "
                            f"({', '.join(NETWORKS[k].flag + '=' for k in algorithm.networks) or 'none'}), "
                            f"not one checkpoint")
        given[algorithm.networks[0]] = checkpoint
    dev = resolve_device(device)
    precision = check_backend(backend, precision, dev)
    pinned = pin_threads(threads)
    if not algorithm.networks:
        provenance = {"threads": pinned, "checkpoints": {}}
        if algorithm.own_networks:  # e.g. D-VAE's fitted networks: run in this precision, part of the fingerprint
            if backend not in OWN_NETWORK_BACKENDS:
                raise InputError(f"method {method!r} runs networks of its own, which no exported backend holds; "
                                 f"choose --backend {' or '.join(OWN_NETWORK_BACKENDS)}, not {backend}")
            provenance["precision"], provenance["backend"] = precision, backend
        return Purifier(algorithm, None, device=dev, provenance=provenance)
    models, fingerprints, sources, defaults = {}, {}, {}, []
    for kind in algorithm.networks:
        source = given[kind]
        if isinstance(source, torch.nn.Module):
            models[kind], fingerprints[kind] = source, f"in-memory:{type(source).__name__}"
        else:
            loaded, is_default = _load(source, kind, NETWORKS[kind].what, algorithm, preset)
            models[kind], fingerprints[kind] = loaded.model, loaded.fingerprint
            sources[kind] = {"checkpoint": loaded.path, "weights_sha256": loaded.fingerprint}
            if is_default:
                defaults.append(kind)
    evaluator = build_backend(backend, models.get("ebm"), models.get("unet"), device=dev, micro_batch=micro_batch,
                              precision=precision, channels_last=channels_last, threads=pinned, onnx_dir=onnx_dir,
                              sources=sources)
    return Purifier(algorithm, evaluator, provenance={"threads": pinned, "checkpoints": fingerprints, "defaults": defaults},
                    models=models)

