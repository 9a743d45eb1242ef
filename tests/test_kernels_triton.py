"""The Triton kernels, tested on CPU in Triton's interpreter (the cases: `tests/kernels_triton_cases.py`).

The cases run in a fresh pytest process with TRITON_INTERPRET=1, not in this
one: the interpreter must be chosen before triton is first imported (it fixes
compiled-or-interpreted for Triton's own ``@triton.jit`` helpers too), and in
this session other tests may already have imported triton (diffusers and
torch.compile do); setting the variable here instead would also switch every
later torch.compile in this session to interpreted Triton on a GPU machine.

Without triton this fails, unless PUREGEN_ALLOW_NO_TRITON=1 (then it skips).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / "kernels_triton_cases.py"


def test_triton_kernels_in_interpreter():
    if importlib.util.find_spec("triton") is None:
        reason = "triton is not installed (pip install triton)"
        if os.environ.get("PUREGEN_ALLOW_NO_TRITON") == "1":
            pytest.skip(reason + "; skipped because PUREGEN_ALLOW_NO_TRITON=1")
        pytest.fail(reason + "; set PUREGEN_ALLOW_NO_TRITON=1 to skip the Triton kernel tests instead")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider", "-rfE"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0, f"{' '.join(cmd)} -> {summary}\n{res.stdout[-8000:]}\n{res.stderr[-2000:]}"
    assert " passed" in summary and "skipped" not in summary, summary
    print(summary)
