"""Can the Triton kernels run here? Answered without importing triton at puregen import time.

The kernels (`triton_kernels`) need triton installed and either a CUDA device
or Triton's interpreter (``TRITON_INTERPRET=1``), which runs them on CPU
tensors with numpy, about 100x slower than torch: good for tests, not for work.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch


def interpreting() -> bool:
    """Whether triton is in interpreter mode (``TRITON_INTERPRET``, read the way triton reads it).

    `triton.jit` makes this choice once, when a function is decorated (Triton's
    own helpers: when triton is first imported), so the variable must be set
    before anything imports triton.
    """
    if "triton.language" in sys.modules:  # already decided, whatever the environment says now
        import triton.language as tl

        return type(tl.zeros).__name__ == "InterpretedFunction"
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        from triton import knobs  # imported here, never at puregen import time (triton >= 3.4)
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    return bool(knobs.runtime.interpret)


def unavailable_reason() -> str | None:
    """None if the Triton kernels can run here, else why not (one sentence)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'puregen[triton]')"
    if interpreting():
        return None
    if not torch.cuda.is_available():
        return ("no CUDA device (set TRITON_INTERPRET=1 before triton is first imported to run the kernels "
                "on CPU tensors in Triton's interpreter)")
    return None


def available() -> bool:
    return unavailable_reason() is None
