"""Purifiers: EBM Langevin, DDPM diffuse-and-denoise, their combinations, JPEG.

A purifier maps a batch of uint8 NHWC images and their global indices to
purified uint8 images plus a per-sample audit. It knows nothing of files.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..config import MethodConfig
from ..data.convert import from_model_space, prepare_api_input, to_model_space
from ..errors import InputError
from ..models.defaults import check_default_fits
from .samplers import diffuse_denoise, langevin

ProgressFn = Callable[[float], None]


class _StepProgress:
    """Turns network steps into images on the progress bar, in whole updates that sum to exactly the
    batch size (fractions of n / steps summed over the steps overshoot it by float rounding)."""

    def __init__(self, progress: ProgressFn, n: int, steps: int):
        self.progress, self.n, self.steps = progress, n, max(steps, 1)
        self.done_steps = self.reported = 0

    def __call__(self, k: int) -> None:
        self.done_steps = min(self.done_steps + k, self.steps)
        position = self.n * self.done_steps // self.steps
        if position > self.reported:
            self.progress(position - self.reported)
            self.reported = position


@dataclass
class PurifyResult:
    images: torch.Tensor  # uint8 NHWC
    audit: dict[str, np.ndarray]  # per-sample columns
    state: torch.Tensor | None = None  # the fp32 model-space result before rounding, when asked for


@dataclass(frozen=True)
class FiltSelection:
    """Which images `filt` purifies: those ranked above (energy, index) of the boundary.

    Ranking is by energy, ties broken by global index, so the selection is a
    pure function of the data whatever the batching.
    """

    energy: float
    index: float  # the boundary's global index; +inf for a plain threshold

    def selects(self, energies: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return (energies > self.energy) | ((energies == self.energy) & (indices > self.index))

    @classmethod
    def from_threshold(cls, threshold: float) -> "FiltSelection":
        return cls(float(threshold), math.inf)

    @classmethod
    def from_quantile(cls, energies: np.ndarray, indices: np.ndarray, filter_frac: float) -> "FiltSelection":
        """Purify the top `filter_frac` share (rounded half up) of the ranked images."""
        n = len(energies)
        n_select = int(math.floor(filter_frac * n + 0.5))
        n_keep = n - n_select
        if n_keep == 0:
            return cls(-math.inf, -math.inf)
        order = np.lexsort((indices, energies))
        boundary = order[n_keep - 1]
        return cls(float(energies[boundary]), float(indices[boundary]))


def _checked_stage_output(state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An earlier stage's fp32 result for the batch `x`, laid out as `x`; an error if it cannot be.

    The networks no longer see a state's strides (the evaluator copies every micro-batch into one
    layout fixed by its shape: a 1-channel batch's strides once moved bf16 UNet outputs by 1e-3);
    the copy keeps the stage's result independent of the caller's tensor all the same."""
    if state.dtype != torch.float32 or tuple(state.shape) != tuple(x.shape):
        raise ValueError(f"the EBM stage's output must be float32 of shape {tuple(x.shape)}, "
                         f"got {state.dtype} {tuple(state.shape)}")
    return torch.empty_like(x).copy_(state)


def _change_audit(before: torch.Tensor, after: torch.Tensor) -> dict[str, np.ndarray]:
    diff = (after.to(torch.float32) - before.to(torch.float32)).flatten(1) / 255.0
    return {
        "l2_change": diff.norm(dim=1).cpu().numpy(),
        "linf_change": diff.abs().amax(dim=1).cpu().numpy(),
    }


class Purifier:
    """One purification method with its evaluator (networks) and configuration."""

    def __init__(
        self,
        config: MethodConfig,
        evaluator=None,
        *,
        device: str | torch.device = "cpu",
        provenance: dict | None = None,
    ):
        self.config = config
        self.evaluator = evaluator
        # Where the networks came from and how they run: part of a job's fingerprint.
        self.provenance = provenance or {}
        self.device = torch.device(device if evaluator is None else evaluator.device)
        self.filt_selection: FiltSelection | None = None
        if config.method == "filt" and config.filt.energy_threshold is not None:
            self.filt_selection = FiltSelection.from_threshold(config.filt.energy_threshold)
        if (config.needs_ebm or config.needs_ddpm) and evaluator is None:
            raise ValueError(f"method {config.method!r} needs an evaluator with its networks")

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def has_ebm(self) -> bool:
        return self.evaluator is not None and getattr(self.evaluator, "ebm", None) is not None

    @property
    def needs_global_pass(self) -> bool:
        """`filt` ranks all images by energy before purifying any."""
        return self.method == "filt" and self.filt_selection is None

    def check_image_shape(self, height: int, width: int, channels: int, source: str = "input") -> None:
        """A clear error when the images do not fit the loaded networks."""
        if self.evaluator is None:
            return
        for kind in self.provenance.get("defaults", []):
            check_default_fits(kind, height, width, channels, source)
        for what, model in (("EBM", getattr(self.evaluator, "ebm", None)), ("DDPM", getattr(self.evaluator, "unet", None))):
            if model is None:
                continue
            expected = model.config.in_channels
            if channels != expected:
                raise InputError(
                    f"{source}: images have {channels} channel(s), but the {what} checkpoint expects {expected}; "
                    f"use a checkpoint trained on {channels}-channel images"
                )
        if self.method != "jpeg" and min(height, width) < 4:
            raise InputError(f"{source}: images of {height}x{width} are too small to purify")

    def network_steps(self) -> int:
        """Network evaluations per image, for progress reporting."""
        c = self.config

        def reverse(t_star: int) -> int:
            return min(t_star, c.diffusion.reverse_steps or t_star)

        return {
            "ebm": c.langevin.steps,
            "ddpm": reverse(c.diffusion.t_star),
            "naive": c.langevin.steps + reverse(c.diffusion.t_star),
            "reps": c.reps.reps * (c.reps.ebm_steps + reverse(c.reps.t_star)),
            "filt": reverse(c.filt.t_star),
            "jpeg": 1,
        }[self.method]

    # -- batch level ---------------------------------------------------------------------------

    def energies(self, images_u8: torch.Tensor) -> np.ndarray:
        """EBM energy of each uint8 NHWC image (fp32)."""
        x = to_model_space(images_u8.to(self.device))
        return self.evaluator.energy(x).cpu().numpy().astype(np.float32)

    def purify_batch(
        self,
        images_u8: torch.Tensor,
        indices: torch.Tensor,
        seed: int,
        progress: ProgressFn | None = None,
        *,
        keep_state: bool = False,
        ebm_stage_output: torch.Tensor | None = None,
    ) -> PurifyResult:
        """Purify uint8 NHWC `images_u8` whose global row indices are `indices`.

        `keep_state` also returns the fp32 result before rounding (`PurifyResult.state`). For `naive`,
        `ebm_stage_output` is that state from an `ebm` purifier with the same EBM, Langevin settings,
        precision and micro-batch on the same rows and seed: the DDPM stage starts from it, which gives
        the bytes of running both stages without the Langevin steps' cost.
        """
        if ebm_stage_output is not None and self.method != "naive":
            raise ValueError(f"ebm_stage_output is for the naive method, not {self.method!r}")
        if self.method == "jpeg":
            out = _jpeg(images_u8.cpu(), self.config.jpeg.quality)
            if progress:
                progress(len(images_u8))
            return PurifyResult(out.to(images_u8.device), _change_audit(images_u8.cpu(), out))

        images_u8 = images_u8.to(self.device)
        indices = indices.to(torch.int64)
        n = images_u8.shape[0]
        per_step = _StepProgress(progress, n, self.network_steps()) if progress else None
        x = to_model_space(images_u8)
        audit: dict[str, np.ndarray] = {}
        energy_before = self.evaluator.energy(x).cpu().numpy() if self.has_ebm else None
        c = self.config

        if self.method == "ebm":
            x = langevin(x, self.evaluator, c.langevin, indices=indices, seed=seed, on_step=per_step)
        elif self.method == "ddpm":
            x = diffuse_denoise(x, self.evaluator, c.diffusion, indices=indices, seed=seed, on_step=per_step)
        elif self.method == "naive":
            if ebm_stage_output is None:
                x = langevin(x, self.evaluator, c.langevin, indices=indices, seed=seed, on_step=per_step)
            else:
                x = _checked_stage_output(ebm_stage_output, x)
                if per_step is not None:
                    per_step(c.langevin.steps)
            x = diffuse_denoise(x, self.evaluator, c.diffusion, indices=indices, seed=seed, on_step=per_step)
        elif self.method == "reps":
            for r in range(c.reps.reps):
                x = langevin(
                    x, self.evaluator, c.langevin, steps=c.reps.ebm_steps, indices=indices, seed=seed,
                    repetition=r, on_step=per_step,
                )
                x = diffuse_denoise(
                    x, self.evaluator, c.diffusion, t_star=c.reps.t_star, indices=indices, seed=seed,
                    repetition=r, on_step=per_step,
                )
        elif self.method == "filt":
            if self.filt_selection is None:
                raise RuntimeError("filt needs its energy selection (a global pass or --energy-threshold) first")
            chosen = self.filt_selection.selects(energy_before, indices.cpu().numpy())
            audit["filt_selected"] = chosen
            if chosen.any():
                sel = torch.from_numpy(np.flatnonzero(chosen)).to(self.device)
                purified = diffuse_denoise(
                    x[sel], self.evaluator, c.diffusion, t_star=c.filt.t_star, indices=indices[sel], seed=seed,
                )
                x = x.clone()
                x[sel] = purified
            if per_step is not None:
                per_step(self.network_steps())
        else:  # pragma: no cover - method names are validated by method_config
            raise InputError(f"unknown method {self.method!r}")

        out = from_model_space(x)
        if self.method == "filt":
            # Unselected images pass through byte for byte.
            keep = torch.from_numpy(~audit["filt_selected"]).to(out.device)
            out[keep] = images_u8[keep]
        if energy_before is not None:
            audit["energy_before"] = energy_before.astype(np.float32)
            audit["energy_after"] = self.energies(out)
        audit.update(_change_audit(images_u8, out))
        return PurifyResult(out, audit, x if keep_state else None)

    # -- Python API ----------------------------------------------------------------------------

    def purify(self, images, *, seed: int = 0, indices=None, offset: int = 0, batch_size: int = 64):
        """Purify an array or tensor of images; returns the same kind it was given.

        `indices` (the samples' global row indices) default to
        ``offset + arange(len(images))``; they key the noise, so the same image
        at the same index gets the same bytes however it is batched.
        """
        x_model, restore = prepare_api_input(images)
        u8 = from_model_space(x_model)
        n = u8.shape[0]
        self.check_image_shape(*u8.shape[1:])
        idx = _as_indices(indices, n, offset)
        if self.needs_global_pass:
            energies = np.concatenate([self.energies(u8[s : s + batch_size]) for s in range(0, n, batch_size)])
            self.filt_selection = FiltSelection.from_quantile(energies, idx.numpy(), self.config.filt.filter_frac)
            try:
                out = self._purify_all(u8, idx, seed, batch_size)
            finally:
                self.filt_selection = None
        else:
            out = self._purify_all(u8, idx, seed, batch_size)
        return restore(out)

    def _purify_all(self, u8: torch.Tensor, idx: torch.Tensor, seed: int, batch_size: int) -> torch.Tensor:
        parts = [self.purify_batch(u8[s : s + batch_size], idx[s : s + batch_size], seed).images
                 for s in range(0, u8.shape[0], batch_size)]
        return torch.cat(parts, dim=0)

    def purify_stream(self, batches: Iterable, *, seed: int = 0, offset: int = 0) -> Iterator:
        """Purify an iterable of batches (numpy arrays or torch tensors), yielding each result.

        Global indices keep counting across batches, so the output equals that
        of one big `purify` call. `filt` needs an explicit energy threshold here.
        """
        if self.needs_global_pass:
            raise InputError("filt on a stream needs an explicit energy threshold (--energy-threshold)")
        position = offset
        for batch in batches:
            source = f"stream batch at index {position}"
            x_model, restore = prepare_api_input(batch, source=source)
            u8 = from_model_space(x_model)
            self.check_image_shape(*u8.shape[1:], source=source)
            idx = torch.arange(position, position + u8.shape[0], dtype=torch.int64)
            position += u8.shape[0]
            yield restore(self.purify_batch(u8, idx, seed).images)


def _as_indices(indices, n: int, offset: int) -> torch.Tensor:
    if indices is None:
        return torch.arange(offset, offset + n, dtype=torch.int64)
    idx = torch.as_tensor(np.ascontiguousarray(indices), dtype=torch.int64).reshape(-1)
    if idx.numel() != n:
        raise InputError(f"indices has {idx.numel()} entries for {n} images")
    if idx.numel() and int(idx.min()) < 0:
        raise InputError("indices must be non-negative")
    if torch.unique(idx).numel() != n:
        raise InputError("indices must be distinct: each names one sample's noise")
    return idx


def _jpeg(images_u8: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG re-compression of each uint8 NHWC image at `quality` (PIL, 4:2:0 defaults)."""
    from PIL import Image

    arr = images_u8.numpy()
    out = np.empty_like(arr)
    for i, img in enumerate(arr):
        grey = img.shape[-1] == 1
        pil = Image.fromarray(img[..., 0] if grey else img, mode="L" if grey else "RGB")
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert("L" if grey else "RGB"))
        out[i] = dec[..., None] if grey else dec
    return torch.from_numpy(out)
