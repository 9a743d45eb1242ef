"""What the onnxruntime and tensorrt backends share: evaluations run by a graph made from an ONNX export."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..export.onnx_export import ExportedGraph, cache_folder_for, ensure_exported, weights_fingerprint
from .base import NetworkBackend


class ExportedGraphBackend(NetworkBackend):
    """A backend whose networks run as exported graphs, one runner per (network, image shape).

    The exports come from `onnx_dir` when given (checked against the loaded
    weights), else from the per-weights cache, made and validated on first use.
    Subclasses build a runner for an export in `_make_runner`; a runner takes
    torch tensors and returns the graph's outputs as fp32 torch tensors on the
    backend's device.
    """

    def __init__(self, ebm: nn.Module | None, unet: nn.Module | None, *, device, micro_batch: int, precision: str,
                 onnx_dir: str | Path | None = None, sources: dict | None = None):
        # The torch models stay on the CPU in fp32: they are what the graphs are exported from.
        prepared = {k: m.to("cpu", torch.float32).eval().requires_grad_(False) if m is not None else None
                    for k, m in (("ebm", ebm), ("unet", unet))}
        super().__init__(prepared["ebm"], prepared["unet"], device=device, micro_batch=micro_batch,
                         precision=precision)
        self.onnx_dir = Path(onnx_dir) if onnx_dir is not None else None
        self.sources = sources or {}
        self._fingerprints = {k: weights_fingerprint(m) for k, m in prepared.items() if m is not None}
        self._runners: dict[tuple, object] = {}
        self._energy_fn = lambda b: self._runner("ebm", b)(b)[1]
        self._grad_fn = lambda b: self._runner("ebm", b)(b)[0]
        self._eps_fn = lambda b, t: self._runner("unet", b)(b, t)[0]

    def exported(self, model_key: str, image_shape: tuple[int, ...]) -> ExportedGraph:
        model = self.ebm if model_key == "ebm" else self.unet
        fingerprint = self._fingerprints[model_key]
        folder = self.onnx_dir if self.onnx_dir is not None else cache_folder_for(fingerprint)
        return ensure_exported(model, image_shape, folder, fingerprint=fingerprint, source=self.sources.get(model_key))

    def _runner(self, model_key: str, b: torch.Tensor):
        key = (model_key, tuple(b.shape[1:]))
        runner = self._runners.get(key)
        if runner is None:
            runner = self._runners[key] = self._make_runner(self.exported(*key))
        return runner

    def _make_runner(self, exported: ExportedGraph):
        raise NotImplementedError
