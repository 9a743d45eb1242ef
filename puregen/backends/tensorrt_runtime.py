"""`--backend tensorrt` (experimental): the purifiers' network evaluations on TensorRT engines.

NOT YET VERIFIED ON HARDWARE (see `puregen.export.tensorrt_engines`, which
builds and caches the engines from the ONNX exports). This module imports
`tensorrt` only when a backend is made, and says so clearly when it is
missing. An engine runs through TensorRT's Python API (10.x): Runtime ->
execution context with `set_input_shape`, `set_tensor_address` and
`execute_async_v3` on torch's current CUDA stream.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..export.onnx_export import ExportedGraph
from ..export.tensorrt_engines import (BatchProfile, EngineCache, TensorRTUnavailable, ensure_engine,
                                       import_tensorrt, unavailable_reason)
from .base import DEFAULT_MICRO_BATCH, BackendEntry
from .exported import ExportedGraphBackend


class _Engine:
    """One deserialized engine and its execution context, run on torch CUDA tensors."""

    def __init__(self, blob: bytes, exported: ExportedGraph, device: torch.device, source: str):
        trt = import_tensorrt()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise InputError(f"{source}: TensorRT cannot deserialize this engine; delete it and its .json record "
                             "to rebuild it")
        self.context = self.engine.create_execution_context()
        self.exported, self.device = exported, device

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        inputs = [t.contiguous() for t in inputs]  # kept alive until the engine has run
        for name, t in zip(self.exported.input_names, inputs):
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = self.exported.output_buffers(inputs[0].shape[0], self.device)
        for name, out in zip(self.exported.output_names, outputs):
            self.context.set_tensor_address(name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the engine for {self.exported.onnx_path}")
        return outputs


class TensorRTBackend(ExportedGraphBackend):
    """The purifiers' evaluations on TensorRT engines (experimental, see the module's note)."""

    backend = "tensorrt"

    def __init__(
        self,
        ebm: nn.Module | None = None,
        unet: nn.Module | None = None,
        *,
        device: str | torch.device = "cuda",
        micro_batch: int = DEFAULT_MICRO_BATCH,
        precision: str = "fp16",
        onnx_dir: str | Path | None = None,
        engine_dir: str | Path | None = None,
        profile: BatchProfile | None = None,
        sources: dict | None = None,
    ):
        trt = import_tensorrt()
        if torch.device(device).type != "cuda":
            raise TensorRTUnavailable("--backend tensorrt needs --device cuda")
        super().__init__(ebm, unet, device=device, micro_batch=micro_batch, precision=precision, onnx_dir=onnx_dir,
                         sources=sources)
        self.profile = profile or BatchProfile.for_micro_batch(micro_batch)
        if not self.profile.min <= micro_batch <= self.profile.max:
            raise InputError(f"the micro-batch {micro_batch} is outside the engine's batch profile {self.profile}")
        self.cache = EngineCache(engine_dir)
        self.trt_version = trt.__version__

    def _make_runner(self, exported: ExportedGraph) -> _Engine:
        blob, engine_path = ensure_engine(exported, self.precision, self.profile, self.cache, self.device)
        return _Engine(blob, exported, self.device, str(engine_path))

    def describe(self) -> dict:
        info = super().describe()
        info.update(tensorrt=self.trt_version, batch_profile=asdict(self.profile))
        return info


def _precision_for(precision: str, device: torch.device) -> str:
    if device.type != "cuda":
        raise InputError("backend tensorrt needs --device cuda (TensorRT runs on NVIDIA GPUs only)")
    return "fp16" if precision == "auto" else precision


def _build(ebm, unet, *, device, micro_batch, precision, onnx_dir=None, sources=None,
           **_other_options) -> TensorRTBackend:
    # `_other_options` (threads, channels_last) do not apply to TensorRT engines.
    return TensorRTBackend(ebm, unet, device=device, micro_batch=micro_batch, precision=precision, onnx_dir=onnx_dir,
                           sources=sources)


def _availability() -> str:
    reason = unavailable_reason()
    return f"unavailable: {reason}" if reason else "available (experimental, not yet verified on hardware)"


TENSORRT = BackendEntry("tensorrt", build=_build, precision_for=_precision_for, availability=_availability)
