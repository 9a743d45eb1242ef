"""TensorRT engines built from the ONNX exports (experimental), and their on-disk cache.

NOT YET VERIFIED ON HARDWARE: TensorRT cannot be installed on the machines
this was written on. The module imports `tensorrt` only when an engine is
built, and says so clearly when it is missing. The plain-Python parts (batch
profiles, cache keys, the cache's checks, error paths) are tested without
TensorRT; the calls into TensorRT follow its Python API (10.x): Builder ->
network from OnnxParser -> BuilderConfig with precision flags and one
optimization profile over the batch axis -> serialized engine. Running an
engine is the `tensorrt` backend's part (`puregen.backends.tensorrt_runtime`).

Engines are cached on disk under a key made of everything that makes an
engine valid: the ONNX file's sha256, the precision flags, the batch
profile, the TensorRT version and the GPU architecture. Each engine file has
a JSON record of those fields and of its own sha256; a record that does not
match, or an engine file that was changed or cut short, is an error that
names the file, never a silently wrong engine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import InputError
from .onnx_export import ExportedGraph, default_cache_dir

PRECISION_FLAGS = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",)}
ENGINE_RECORD_VERSION = 1


class TensorRTUnavailable(InputError):
    """TensorRT (or a CUDA device for it) is not present."""


def unavailable_reason() -> str | None:
    """Why the tensorrt backend cannot run here, or None if it can be tried."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (pip install tensorrt, on a machine with an NVIDIA GPU)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def import_tensorrt():
    reason = unavailable_reason()
    if reason is not None:
        raise TensorRTUnavailable(f"--backend tensorrt is unavailable: {reason}. Use --backend onnxruntime or "
                                  "compiled instead.")
    import tensorrt

    return tensorrt


@dataclass(frozen=True)
class BatchProfile:
    """TensorRT's optimization profile over the batch axis: the engine runs any batch in [min, max], best at opt."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not (isinstance(self.min, int) and isinstance(self.opt, int) and isinstance(self.max, int)):
            raise InputError(f"batch profile values must be integers, got {self}")
        if not 1 <= self.min <= self.opt <= self.max:
            raise InputError(f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    @classmethod
    def for_micro_batch(cls, micro_batch: int) -> BatchProfile:
        """The engine's profile when the backend runs every network call at `micro_batch` (the engine's opt)."""
        return cls(1, micro_batch, max(micro_batch, 1))

    @classmethod
    def parse(cls, text: str) -> BatchProfile:
        """`"1,64,256"` (min, opt, max) as given on the command line."""
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise InputError(f"--batch-profile must be MIN,OPT,MAX integers, got {text!r}") from None
        if len(values) != 3:
            raise InputError(f"--batch-profile must be MIN,OPT,MAX, got {text!r}")
        return cls(*values)

    def shapes(self, input_spec: dict) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """min/opt/max shapes of one input from the sidecar's spec (its batch axis named "batch")."""
        dims = input_spec["shape"]
        if dims.count("batch") != 1 or dims[0] != "batch":
            raise InputError(f"input {input_spec['name']!r} has no leading batch axis: {dims}")
        rest = tuple(int(d) for d in dims[1:])
        return (self.min, *rest), (self.opt, *rest), (self.max, *rest)


def engine_cache_key(onnx_sha256: str, precision: str, profile: BatchProfile, trt_version: str, gpu_arch: str) -> str:
    """The engine's identity: the same key means an engine built from the same graph, flags, profile, TensorRT and GPU."""
    if precision not in PRECISION_FLAGS:
        raise InputError(f"TensorRT precision must be one of {', '.join(PRECISION_FLAGS)}, got {precision!r}")
    fields = {"onnx_sha256": onnx_sha256, "precision_flags": list(PRECISION_FLAGS[precision]),
              "profile": asdict(profile), "tensorrt": trt_version, "gpu_arch": gpu_arch}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def gpu_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


@dataclass(frozen=True)
class EngineRecord:
    """What the cache stores beside each engine file, and checks before it is used."""

    key: str
    onnx_sha256: str
    precision: str
    profile: dict
    tensorrt: str
    gpu_arch: str
    engine_sha256: str
    record_version: int = ENGINE_RECORD_VERSION


class EngineCache:
    """Engine files and their records in one folder, named by the cache key."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else default_cache_dir() / "tensorrt"

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.folder / f"{key}.engine", self.folder / f"{key}.json"

    def load(self, key: str, expected: dict) -> bytes | None:
        """The cached engine for `key`, or None if there is none; an error if it is stale or damaged."""
        engine_path, record_path = self.paths(key)
        if not record_path.exists() and not engine_path.exists():
            return None
        if not record_path.exists() or not engine_path.exists():
            missing = record_path if not record_path.exists() else engine_path
            raise InputError(f"{missing}: missing half of a cached TensorRT engine; {self._rebuild_hint(key)}")
        try:
            record = json.loads(record_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{record_path}: unreadable engine record ({e}); {self._rebuild_hint(key)}") from None
        for field, value in expected.items():
            if record.get(field) != value:
                raise InputError(
                    f"{record_path}: stale TensorRT engine: it was built for {field} = {record.get(field)!r}, this "
                    f"run needs {value!r}; {self._rebuild_hint(key)}"
                )
        blob = engine_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != record.get("engine_sha256"):
            raise InputError(f"{engine_path}: corrupt or truncated TensorRT engine (sha256 differs from its record); "
                             f"{self._rebuild_hint(key)}")
        return blob

    def _rebuild_hint(self, key: str) -> str:
        engine_path, record_path = self.paths(key)
        return f"delete {engine_path.name} and {record_path.name} in {self.folder} to rebuild it"

    def store(self, key: str, blob: bytes, record_fields: dict) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        engine_path, record_path = self.paths(key)
        record = EngineRecord(key=key, engine_sha256=hashlib.sha256(blob).hexdigest(), **record_fields)
        for path, data in ((engine_path, blob), (record_path, (json.dumps(asdict(record), indent=2) + "\n").encode())):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # the record last: an engine without one is not used
        return engine_path


def build_engine(exported: ExportedGraph, precision: str, profile: BatchProfile, workspace_bytes: int = 1 << 30):
    """Serialize a TensorRT engine for `exported` (TensorRT's Python API; needs a GPU)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(exported.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"{exported.onnx_path}: TensorRT's ONNX parser refused it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for flag in PRECISION_FLAGS[precision]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    trt_profile = builder.create_optimization_profile()
    for spec in exported.sidecar["inputs"]:
        trt_profile.set_shape(spec["name"], *profile.shapes(spec))
    config.add_optimization_profile(trt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InputError(f"{exported.onnx_path}: TensorRT could not build an engine ({precision}, batch {profile})")
    return bytes(serialized)


def ensure_engine(exported: ExportedGraph, precision: str, profile: BatchProfile, cache: EngineCache,
                  device: torch.device) -> tuple[bytes, Path]:
    """The serialized engine for `exported` and its file: from `cache` if it holds one, else built and stored."""
    trt_version = import_tensorrt().__version__
    onnx_sha = exported.sidecar["onnx_sha256"]  # checked against the file when the export was loaded
    fields = {"onnx_sha256": onnx_sha, "precision": precision, "profile": asdict(profile),
              "tensorrt": trt_version, "gpu_arch": gpu_arch(device)}
    key = engine_cache_key(onnx_sha, precision, profile, trt_version, fields["gpu_arch"])
    blob = cache.load(key, fields)
    if blob is None:
        blob = build_engine(exported, precision, profile)
        cache.store(key, blob, fields)
    return blob, cache.paths(key)[0]
