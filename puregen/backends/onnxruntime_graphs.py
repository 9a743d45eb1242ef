"""`--backend onnxruntime`: the purifiers' network evaluations on ONNX Runtime.

The graphs are the validated exports of `puregen.export.onnx_export` (made
on first use and cached per network's weights, or read from a folder the
user exported to). The providers are chosen from what the installed ONNX
Runtime offers: on a CUDA device TensorRT, then CUDA (with I/O binding, so
tensors stay on the GPU), else the CPU. The update steps and the noise stay
with the engine's kernels, and the networks run on fixed-shape micro-batches
as in every backend, so a sample's bytes do not depend on how the job is cut.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..export.onnx_export import ExportError, ExportedGraph, missing_onnx_packages, require_onnx
from .base import DEFAULT_MICRO_BATCH, BackendEntry
from .exported import ExportedGraphBackend

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def choose_providers(device: torch.device, available: list[str]) -> list:
    """The execution providers for `device`, best first, from the `available` ones."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    gpu = [p for p in GPU_PROVIDERS if p in available]
    if "CUDAExecutionProvider" not in gpu:
        raise InputError(
            "--backend onnxruntime on --device cuda needs the CUDA provider of ONNX Runtime, which this install "
            f"lacks (it has {', '.join(available)}): pip uninstall onnxruntime && pip install onnxruntime-gpu"
        )
    index = device.index or 0
    # Heuristic (not exhaustive) convolution search: the same algorithm on every run, so the same bytes.
    options = {"device_id": index, "cudnn_conv_algo_search": "DEFAULT"}
    return [(p, {"device_id": index} if p != "CUDAExecutionProvider" else options) for p in gpu] + [
        "CPUExecutionProvider"
    ]


def _session_options(threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # pinned like torch's: part of the job's fingerprint
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.use_deterministic_compute = True
    opts.log_severity_level = 3
    # Idle ORT threads spin by default and take the cores from the update kernels that run between graphs.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class _Graph:
    """One ONNX Runtime session over one export, run on torch tensors."""

    def __init__(self, exported: ExportedGraph, device: torch.device, threads: int):
        import onnxruntime as ort

        self.exported = exported
        self.device = device
        providers = choose_providers(device, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(exported.onnx_path), _session_options(threads),
                                                providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise ExportError(f"{exported.onnx_path}: ONNX Runtime cannot load it ({e})") from e
        self.providers = self.session.get_providers()
        self.input_names = exported.input_names
        self.output_names = exported.output_names

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        if self.device.type == "cuda":
            return self._run_bound(inputs)
        feed = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, inputs)}
        return [torch.from_numpy(np.ascontiguousarray(o)) for o in self.session.run(self.output_names, feed)]

    def _run_bound(self, inputs) -> list[torch.Tensor]:
        """I/O binding: ORT reads and writes torch's CUDA buffers in place."""
        binding = self.session.io_binding()
        index = self.device.index or 0
        inputs = [t.contiguous() for t in inputs]
        for name, t in zip(self.input_names, inputs):
            binding.bind_input(name, "cuda", index, _numpy_dtype(t.dtype), tuple(t.shape), t.data_ptr())
        outputs = self.exported.output_buffers(inputs[0].shape[0], self.device)
        for name, out in zip(self.output_names, outputs):
            binding.bind_output(name, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs


def _numpy_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.int64: np.int64}[dtype]


class OnnxRuntimeBackend(ExportedGraphBackend):
    """The purifiers' evaluations on ONNX Runtime; `ebm` / `unet` are the torch models the graphs come from."""

    backend = "onnxruntime"

    def __init__(
        self,
        ebm: nn.Module | None = None,
        unet: nn.Module | None = None,
        *,
        device: str | torch.device = "cpu",
        micro_batch: int = DEFAULT_MICRO_BATCH,
        onnx_dir: str | Path | None = None,
        threads: int | None = None,
        sources: dict | None = None,
    ):
        require_onnx()
        super().__init__(ebm, unet, device=device, micro_batch=micro_batch, precision="fp32", onnx_dir=onnx_dir,
                         sources=sources)
        self.threads = threads or torch.get_num_threads()

    def _make_runner(self, exported: ExportedGraph) -> _Graph:
        return _Graph(exported, self.device, self.threads)

    def compile_state(self) -> dict:
        return {
            f"{g.exported.kind} {'x'.join(map(str, shape))}": {
                "onnx": str(g.exported.onnx_path),
                "providers": g.providers,
                "validated_worst_relative_error": g.exported.sidecar["validation"]["worst_relative"],
            }
            for (_, shape), g in self._runners.items()
        }


def _precision_for(precision: str, device: torch.device) -> str:
    # The exported graphs are fp32; reduced precision is the compiled or TensorRT backend's job.
    if precision not in ("fp32", "auto"):
        raise InputError(
            f"backend onnxruntime runs the fp32 graphs; precision {precision!r} is for --backend compiled "
            "(bf16 on CPU and GPU) or tensorrt (fp16/bf16 on GPU)"
        )
    return "fp32"


def _build(ebm, unet, *, device, micro_batch, threads=None, onnx_dir=None, sources=None,
           **_other_options) -> OnnxRuntimeBackend:
    # `_other_options` (precision, always fp32 here; channels_last) are the torch backends'.
    return OnnxRuntimeBackend(ebm, unet, device=device, micro_batch=micro_batch, onnx_dir=onnx_dir, threads=threads,
                              sources=sources)


def _availability() -> str:
    missing = missing_onnx_packages()
    if missing:
        return f"unavailable: pip install 'puregen[onnx]' ({', '.join(missing)} missing)"
    return "available (exported graphs, fp32)"


ONNXRUNTIME = BackendEntry("onnxruntime", build=_build, precision_for=_precision_for, availability=_availability)
