"""What a run ran on: versions, devices, CPU features. Recorded in every manifest."""

from __future__ import annotations

import platform
import sys
from functools import lru_cache

import torch

CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma")


@lru_cache(maxsize=1)
def cpu_features() -> dict:
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"model": model, "machine": platform.machine(), "flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags]}


def library_versions() -> dict:
    import numpy

    from .. import __version__

    versions = {"puregen": __version__, "python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("safetensors", "PIL", "triton", "onnxruntime", "diffusers"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "unknown")
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            continue
    return versions


def devices() -> dict:
    info = {"cuda_available": torch.cuda.is_available(), "gpus": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)})
    return info


def run_provenance() -> dict:
    return {
        "versions": library_versions(),
        "cpu": cpu_features(),
        "devices": devices(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
