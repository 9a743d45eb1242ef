"""Pieces shared by the training loops: data, schedules, EMA, progress, resumption."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backends.precision import resolve_precision
from ..data import read_dataset, to_model_space
from ..engine.pipeline import dataset_fingerprint
from ..errors import InputError


@dataclass
class TrainingData:
    """Training images in model space (float32 NCHW in [-1, 1]) with labels and a fingerprint."""

    images: torch.Tensor
    labels: torch.Tensor | None
    fingerprint: str
    source: str

    def __len__(self) -> int:
        return self.images.shape[0]


def load_training_data(path, *, limit: int | None = None, channels: int | None = None) -> TrainingData:
    ds = read_dataset(path)
    images, labels = ds.images, ds.labels
    if limit is not None:
        images, labels = images[:limit], None if labels is None else labels[:limit]
    if channels is not None and images.shape[-1] != channels:
        raise InputError(f"{path}: images have {images.shape[-1]} channels, the model expects {channels}")
    if len(images) < 2:
        raise InputError(f"{path}: need at least 2 training images, got {len(images)}")
    return TrainingData(
        images=to_model_space(images, str(path)),
        labels=None if labels is None else torch.from_numpy(labels.astype(np.int64)),
        fingerprint=dataset_fingerprint(images, labels),
        source=str(path),
    )


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of `step`'s batch: epochs are seeded permutations, so any step can be recomputed."""
    per_epoch = max(n // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[k * batch_size : (k + 1) * batch_size]


def cosine_with_warmup(step: int, total: int, warmup: int, base_lr: float, final_frac: float = 0.0) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return base_lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


TRAINING_PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> None:
    if precision not in TRAINING_PRECISIONS:
        raise InputError(f"unknown training precision {precision!r}; choose {' or '.join(TRAINING_PRECISIONS)}")


def fastest_training_precision() -> str:
    """The purifiers' "auto" on the CPU, where training runs: bf16 where the CPU computes it natively
    (AVX512-BF16 or AMX: about 2.5x faster than fp32), else fp32; emulated bf16 trained 2.4x slower than
    fp32 (a 2-core Xeon, 2026-11-29)."""
    return resolve_precision("auto", torch.device("cpu"))


def concrete_precision(requested: str) -> str:
    """`requested` with "auto" replaced by this CPU's choice; an unknown name is an InputError."""
    if requested == "auto":
        return fastest_training_precision()
    if requested not in TRAINING_PRECISIONS:
        raise InputError(f"unknown training precision {requested!r}; choose auto, fp32 or bf16")
    return requested


def run_precision(run_dir: Path, requested: str, recorded: str | None) -> str:
    """The precision a run trains in: fixed when it starts, then kept for good.

    bf16 and fp32 steps give different weights, so a run that changed precision when resumed on another CPU
    would no longer equal an unbroken run. "auto" therefore resolves once, on the CPU that starts the run;
    the recipe records the result and a resumed run keeps it, saying so where this CPU would pick otherwise.
    """
    chosen = concrete_precision(requested)
    if recorded is None:
        return chosen
    if requested == "auto":
        if chosen != recorded:
            why = ("this CPU computes bf16 only by emulation, which is slower" if recorded == "bf16"
                   else "this CPU has native bf16")
            print(f"puregen: warning: {run_dir}: resuming in {recorded}, the precision the run started with, "
                  f"although auto would pick {chosen} here ({why}); a run keeps one precision so that it "
                  "resumes exactly", file=sys.stderr)
        return recorded
    if chosen != recorded:
        from .state import STATE_JSON

        raise InputError(f"{run_dir}: this run trains in {recorded} (recorded in {STATE_JSON} when it started); "
                         f"resume it with --precision {recorded} or auto, or start a new run for {chosen}")
    return chosen


def autocast(precision: str):
    """bf16 autocast of the network's forward (and so its backward); weights and optimizer stay fp32."""
    check_precision(precision)  # "auto" must be resolved first (concrete_precision), not run as fp32
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def ema_tensors(ema: nn.Module) -> dict[str, torch.Tensor]:
    """The average's weights as extra tensors of a training checkpoint (read back by `restore_ema`)."""
    return {f"ema.{k}": v for k, v in ema.state_dict().items()}


def restore_ema(ema: nn.Module, extra: dict[str, torch.Tensor]) -> None:
    ema.load_state_dict({k: extra[f"ema.{k}"] for k in ema.state_dict()})


class Progress:
    """A tqdm bar over training steps showing the loss and samples/s."""

    def __init__(self, total: int, start: int, desc: str, batch_size: int, enabled: bool = True):
        self.batch_size = batch_size
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
        self.t0, self.s0 = time.perf_counter(), start

    def update(self, step: int, **metrics: float) -> None:
        if self.bar is None:
            return
        rate = (step + 1 - self.s0) * self.batch_size / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in metrics.items()}, "samples/s": f"{rate:.1f}"})
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_resume(run_dir: Path, info: dict, recipe: dict, data: TrainingData) -> None:
    """A resumed run must use the same recipe and data as the one that wrote the checkpoint."""
    if info.get("recipe") != recipe:
        changed = sorted(k for k in set(recipe) | set(info.get("recipe", {}))
                         if recipe.get(k) != info.get("recipe", {}).get(k))
        raise InputError(f"{run_dir}: cannot resume with a different recipe (changed: {', '.join(changed)})")
    if info.get("data_fingerprint") != data.fingerprint:
        raise InputError(f"{run_dir}: cannot resume on different training data ({data.source})")


def stop_step(start: int, total: int, max_steps_this_call: int | None) -> int:
    """The step this call ends at: the run's end, or sooner when the caller asked for fewer steps."""
    return total if max_steps_this_call is None else min(total, start + max_steps_this_call)


# The invocations ("segments") of each open run: a run trained in pieces (stopped, resumed, on other
# machines) records each piece's steps, wall time, threads, CPU and command, for its model card. `open_run`
# starts the current piece and `save_run` writes the list with the piece brought up to date; keyed by the
# run folder so the four training loops need not carry it between the two calls.
_SEGMENTS: dict[Path, tuple[list[dict], float]] = {}


def _start_segment(run_dir: Path, info: dict | None) -> None:
    from datetime import datetime, timezone

    from ..engine.provenance import cpu_features

    earlier = list(info.get("segments", [])) if info else []
    if info and not earlier and info.get("step", 0) > 0:  # a run from before segments were recorded
        earlier = [{"start_step": 0, "end_step": info["step"], "recorded": False}]
    start = info["step"] if info else 0
    current = {"start_step": start, "end_step": start, "seconds": 0.0,
               "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "threads": torch.get_num_threads(), "cpu": cpu_features()["model"],
               "command": " ".join(sys.argv)[:500]}
    _SEGMENTS[Path(run_dir).resolve()] = (earlier + [current], time.perf_counter())


def run_segments(run_dir: Path, step: int) -> list[dict]:
    """The run's segments with the current one ended at `step` (now); [] for a run not opened here."""
    entry = _SEGMENTS.get(Path(run_dir).resolve())
    if entry is None:
        return []
    segments, t0 = entry
    segments[-1].update(end_step=step, seconds=round(time.perf_counter() - t0, 1))
    return [dict(s) for s in segments]


def save_run(run_dir: Path, kind: str, recipe: dict, data: TrainingData, history: list, *, step: int,
             **state) -> None:
    """A resumable checkpoint with the run's description; `state` goes to `save_training_state`."""
    from .state import save_training_state

    info = {"kind": kind, "recipe": recipe, "data_fingerprint": data.fingerprint, "data_source": data.source,
            "history": history, "segments": run_segments(run_dir, step)}
    save_training_state(run_dir, step=step, info=info, **state)


def prepare_run(run_dir: Path, recipe, *, resume: bool):
    """Check the run folder before anything is built, and fix the run's precision: returns the recipe to
    train with, "auto" replaced by the run's precision (the recorded one when resuming)."""
    from ..models.safetensors_io import read_json
    from .state import STATE_JSON

    recorded = None
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir}: exists and is not a run folder")
    if resume:
        # Starting afresh here would silently throw away the run the user meant (a typo in -o, say).
        if not run_dir.exists():
            raise InputError(f"{run_dir}: no run to resume (the folder does not exist); check the path, or start "
                             "a new run without --resume")
        if not (run_dir / STATE_JSON).is_file():
            raise InputError(f"{run_dir}: holds no training state ({STATE_JSON} is missing), so there is no run to "
                             "resume; a run folder is written at its first checkpoint")
        recorded = read_json(run_dir / STATE_JSON)
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise InputError(f"{run_dir}: a run already exists here; pass --resume to continue it")
    recorded_precision = None
    if recorded is not None:
        # A recorded recipe names a concrete precision ("auto" is resolved before the first save); should one
        # lack the field, it trained in the recipes' default, fp32.
        recorded_precision = recorded.get("recipe", {}).get("precision", "fp32")
    return dataclasses.replace(recipe, precision=run_precision(run_dir, recipe.precision, recorded_precision))


def open_run(run_dir: Path, *, resume: bool, model: nn.Module, optimizer, recipe: dict, data: TrainingData):
    """Start or continue a run (checked first by `prepare_run`): returns (first step, loss history, extra
    saved tensors)."""
    from .state import load_training_state

    if resume:
        info, extra = load_training_state(run_dir, model=model, optimizer=optimizer)
        check_resume(run_dir, info, recipe, data)
        _start_segment(run_dir, info)
        return info["step"], info.get("history", []), extra
    _start_segment(run_dir, None)
    return 0, [], {}


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM after writing a checkpoint at `step` (what --resume continues).

    A KeyboardInterrupt, so that code which stops on Ctrl-C still does; `exit_code` is the shell's 128 + N.
    """

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        super().__init__(f"{signal.Signals(signum).name} received: stopped after step {step} with a checkpoint "
                         f"in {run_dir}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """While training, SIGINT and SIGTERM ask the loop to stop at the end of the current step, once that
    step's checkpoint is written (`end_of_step`), instead of losing every step since the last checkpoint.

    The handler only sets a flag, so the checkpoint always holds whole steps. A second signal during a step
    is handled as before training began (for SIGINT: KeyboardInterrupt, at once): the way out of a long step,
    costing only the steps since the last checkpoint, which stays intact as it is written atomically. During
    a checkpoint write it is ignored, so a double Ctrl-C does not throw away the step being saved. The
    previous handlers come back on exit. Off the main thread, where Python cannot set handlers, it does
    nothing (signals reach only the main thread there).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._writing = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            # None: a handler set outside Python, which cannot be put back; the default is the closest.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            _say(f"\npuregen: {signal.Signals(signum).name} received: finishing this step and writing a "
                 "checkpoint (send it again to stop at once, without it)\n")
            return
        if self._writing:
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # SIG_DFL (or unknown): the default action, e.g. SIGTERM ends us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def end_of_step(self, step: int, stop: int, run_dir: Path, save: Callable[[], None], due: bool) -> None:
        """After step `step - 1` (of this call's `stop`): write the checkpoint if `due` or a signal came, then
        raise TrainingInterrupted for a signal, unless this was the call's last step (then the run is done)."""
        saved = False
        if due or self.signum is not None:
            self._write(save)
            saved = True
        if self.signum is not None and step < stop:
            if not saved:  # the signal came after the check above
                self._write(save)
            raise TrainingInterrupted(self.signum, step, run_dir)

    def _write(self, save: Callable[[], None]) -> None:
        self._writing = True
        try:
            save()
        finally:
            self._writing = False


def _say(text: str) -> None:
    """Write to stderr from a signal handler: straight to file descriptor 2, since the handler may interrupt
    a write to sys.stderr (the progress bar's), and re-entering a buffered stream raises."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode())
