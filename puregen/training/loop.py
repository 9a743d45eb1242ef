"""Pieces shared by the training loops: data, schedules, EMA, progress, resumption."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import read_dataset, to_model_space
from ..engine.fastpath import resolve_precision
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


def autocast(precision: str):
    """bf16 autocast of the network's forward (and so its backward); weights and optimizer stay fp32."""
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


def save_run(run_dir: Path, kind: str, recipe: dict, data: TrainingData, history: list, *, step: int,
             **state) -> None:
    """A resumable checkpoint with the run's description; `state` goes to `save_training_state`."""
    from .state import save_training_state

    info = {"kind": kind, "recipe": recipe, "data_fingerprint": data.fingerprint, "data_source": data.source,
            "history": history}
    save_training_state(run_dir, step=step, info=info, **state)


def open_run(run_dir: Path, *, resume: bool, model: nn.Module, optimizer, recipe: dict, data: TrainingData):
    """Start or continue a run: returns (first step, loss history, extra saved tensors)."""
    from .state import load_training_state

    if resume and run_dir.exists():
        info, extra = load_training_state(run_dir, model=model, optimizer=optimizer)
        check_resume(run_dir, info, recipe, data)
        return info["step"], info.get("history", []), extra
    if run_dir.exists() and any(run_dir.iterdir()):
        raise InputError(f"{run_dir}: a run already exists here; pass --resume to continue it")
    return 0, [], {}
