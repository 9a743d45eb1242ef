"""The bulk pipeline: reader -> batches -> purifier -> writer, resumable.

Output goes to numbered chunks in ``OUT.parts/`` next to a manifest (input
fingerprint, config fingerprint, finished chunks), each written to a temporary
file and renamed into place, so a job killed at any instant resumes where it
stopped and produces byte-identical output. When every chunk is done they are
merged atomically into ``OUT`` and the manifest (with the per-sample audit and
the run's provenance) is written beside it as ``OUT.manifest.json``.

The pipeline knows nothing of models: it drives a `Purifier`.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data import read_dataset, write_dataset
from ..data.writers import write_npz_atomic
from ..errors import InputError
from .provenance import run_provenance
from .purifiers import FiltSelection, Purifier

MANIFEST_VERSION = 1
DEFAULT_CHUNK_SIZE = 1024


@dataclass
class JobPaths:
    output: Path

    @property
    def parts(self) -> Path:
        return self.output.parent / (self.output.name + ".parts")

    @property
    def parts_manifest(self) -> Path:
        return self.parts / "manifest.json"

    @property
    def final_manifest(self) -> Path:
        return self.output.parent / (self.output.name + ".manifest.json")

    def chunk(self, k: int) -> Path:
        return self.parts / f"chunk-{k:05d}.npz"

    def energy_chunk(self, k: int) -> Path:
        return self.parts / f"energy-{k:05d}.npy"


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dataset_fingerprint(images: np.ndarray, labels: np.ndarray | None) -> str:
    h = hashlib.sha256()
    h.update(repr((images.shape, str(images.dtype))).encode())
    h.update(np.ascontiguousarray(images).data)
    if labels is not None:
        h.update(np.ascontiguousarray(labels.astype(np.int64)).data)
    return h.hexdigest()


def config_fingerprint(purifier: Purifier, seed: int, chunk_size: int) -> tuple[str, dict]:
    """Everything that can change the output bytes; batch size is not among them."""
    evaluator = purifier.evaluator.describe() if purifier.evaluator is not None else {}
    config = {
        "method": purifier.config.to_dict(),
        "seed": seed,
        "chunk_size": chunk_size,
        "evaluator": evaluator,
        "threads": purifier.provenance.get("threads"),
        "checkpoints": purifier.provenance.get("checkpoints", {}),
    }
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest(), config


class _Prefetcher:
    """Prepares the next chunks' tensors on a background thread."""

    def __init__(self, images: np.ndarray, chunks: list[tuple[int, int, int]], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, args=(images, chunks), daemon=True)
        self._thread.start()

    def _run(self, images, chunks):
        for k, start, stop in chunks:
            self._queue.put((k, start, stop, torch.from_numpy(np.ascontiguousarray(images[start:stop]))))
        self._queue.put(None)

    def __iter__(self):
        while (item := self._queue.get()) is not None:
            yield item


class _Writer:
    """Writes finished chunks and the manifest on a background thread, in order."""

    def __init__(self, paths: JobPaths, manifest: dict):
        self.paths, self.manifest = paths, manifest
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                k, arrays = item
                write_npz_atomic(self.paths.chunk(k), **arrays)
                self.manifest["finished_chunks"] = sorted(set(self.manifest["finished_chunks"]) | {k})
                write_json_atomic(self.paths.parts_manifest, self.manifest)
            except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                self._error = e

    def put(self, k: int, arrays: dict) -> None:
        self._raise_if_failed()
        self._queue.put((k, arrays))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self):
        if self._error is not None:
            raise self._error


def image_progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1,
                bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable manifest ({e}); use --overwrite to start again") from None


def _check_resumable(paths: JobPaths, manifest: dict, input_fp: str, config_fp: str) -> None:
    if manifest.get("input_fingerprint") != input_fp:
        raise InputError(
            f"{paths.parts_manifest}: the unfinished job was run on different input data; "
            "use --overwrite to start again"
        )
    if manifest.get("config_fingerprint") != config_fp:
        raise InputError(
            f"{paths.parts_manifest}: the unfinished job used a different configuration (method, seed, "
            "checkpoints, micro-batch, threads, backend or chunk size); use --overwrite to start again, "
            "or the same options to resume"
        )


def run_job(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    purifier: Purifier,
    *,
    seed: int = 0,
    batch_size: int = 64,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    resume: bool = False,
    overwrite: bool = False,
    limit: int | None = None,
    input_format: str | None = None,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> dict:
    """Purify the dataset at `input_path` into `output_path`; returns the final manifest."""
    if batch_size < 1 or chunk_size < 1:
        raise InputError("--batch-size and --chunk-size must be >= 1")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    paths = JobPaths(Path(output_path))
    if paths.output.resolve() == Path(input_path).resolve():
        raise InputError(f"{output_path}: the output would overwrite the input")
    paths.output.parent.mkdir(parents=True, exist_ok=True)

    dataset = read_dataset(input_path, format=input_format)
    images, labels = dataset.images, dataset.labels
    if limit is not None:
        images = images[:limit]
        labels = None if labels is None else labels[:limit]
    n = len(images)
    purifier.check_image_shape(*images.shape[1:], source=str(input_path))
    input_fp = dataset_fingerprint(images, labels)
    config_fp, config = config_fingerprint(purifier, seed, chunk_size)

    if paths.output.exists() or paths.final_manifest.exists():
        if resume and paths.final_manifest.exists() and paths.output.exists():
            done = _read_manifest(paths.final_manifest)
            if done.get("input_fingerprint") == input_fp and done.get("config_fingerprint") == config_fp:
                return done  # already complete, nothing to redo
        if not overwrite:
            raise InputError(f"{paths.output}: already exists; pass --overwrite to replace it")
    if paths.parts.exists():
        if resume:
            manifest = _read_manifest(paths.parts_manifest) if paths.parts_manifest.exists() else None
            if manifest is not None:
                _check_resumable(paths, manifest, input_fp, config_fp)
        elif overwrite:
            shutil.rmtree(paths.parts)
            manifest = None
        else:
            raise InputError(
                f"{paths.parts}: an unfinished job's parts are here; pass --resume to continue it "
                "or --overwrite to start again"
            )
    else:
        manifest = None
    paths.parts.mkdir(exist_ok=True)
    if manifest is None:
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "input": str(input_path),
            "input_fingerprint": input_fp,
            "config_fingerprint": config_fp,
            "config": config,
            "num_images": n,
            "chunk_size": chunk_size,
            "finished_chunks": [],
            "finished_energy_chunks": [],
        }
        write_json_atomic(paths.parts_manifest, manifest)

    chunks = [(k, s, min(s + chunk_size, n)) for k, s in enumerate(range(0, n, chunk_size))]
    started = time.perf_counter()

    global_pass = purifier.needs_global_pass
    if global_pass:
        _energy_pass(purifier, images, chunks, paths, manifest, batch_size, progress)
        energies = np.concatenate([np.load(paths.energy_chunk(k)) for k, _, _ in chunks])
        purifier.filt_selection = FiltSelection.from_quantile(
            energies, np.arange(n), purifier.config.filt.filter_frac
        )
        manifest["filt_threshold"] = {"energy": purifier.filt_selection.energy, "index": purifier.filt_selection.index}
    try:
        images_run = _purify_chunks(purifier, images, chunks, paths, manifest, seed, batch_size, progress, on_chunk)
    finally:
        if global_pass:  # the selection belongs to this dataset, not to the purifier
            purifier.filt_selection = None
    elapsed = time.perf_counter() - started
    runtime = getattr(purifier.evaluator, "compile_state", dict)()
    return _merge(paths, manifest, chunks, labels, elapsed, images_run, runtime)


def _purify_chunks(purifier, images, chunks, paths, manifest, seed, batch_size, progress, on_chunk) -> int:
    """The main pass over the chunks not yet finished; returns how many images it purified."""
    n = len(images)
    # A chunk file is renamed into place whole, and the parts folder belongs to this job
    # (its manifest's fingerprints were checked), so a chunk on disk is finished even when
    # the kill came between its rename and the manifest's update.
    finished = {k for k, _, _ in chunks if paths.chunk(k).exists()}
    manifest["finished_chunks"] = sorted(finished)
    todo = [c for c in chunks if c[0] not in finished]
    images_todo = sum(stop - start for _, start, stop in todo)
    bar = image_progress_bar(n, f"purify[{purifier.method}]", progress)
    if bar is not None:
        bar.update(n - images_todo)
    writer = _Writer(paths, manifest)
    try:
        for k, start, stop, chunk in _Prefetcher(images, todo):
            outs, audits = [], []
            for s in range(start, stop, batch_size):
                e = min(s + batch_size, stop)
                res = purifier.purify_batch(
                    chunk[s - start : e - start], torch.arange(s, e, dtype=torch.int64), seed,
                    progress=bar.update if bar is not None else None,
                )
                outs.append(res.images.cpu().numpy())
                audits.append(res.audit)
            arrays = {"x": np.concatenate(outs), "index": np.arange(start, stop, dtype=np.int64)}
            for key in audits[0]:
                arrays[f"audit_{key}"] = np.concatenate([a[key] for a in audits])
            writer.put(k, arrays)
            if on_chunk is not None:
                on_chunk(k)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    return images_todo


def _energy_pass(purifier, images, chunks, paths, manifest, batch_size, progress) -> None:
    """filt's first pass: the energy of every image, chunked and resumable like the main pass."""
    done = {k for k, _, _ in chunks if paths.energy_chunk(k).exists()}  # renamed into place whole
    todo = [c for c in chunks if c[0] not in done]
    bar = image_progress_bar(len(images), "energy", progress)
    if bar is not None:
        bar.update(len(images) - sum(stop - start for _, start, stop in todo))
    for k, start, stop, chunk in _Prefetcher(images, todo):
        energies = np.concatenate(
            [purifier.energies(chunk[s : s + batch_size]) for s in range(0, stop - start, batch_size)]
        )
        tmp = paths.parts / f".energy-{k:05d}.tmp.npy"
        np.save(tmp, energies)
        os.replace(tmp, paths.energy_chunk(k))
        manifest["finished_energy_chunks"] = sorted(done | {k})
        done.add(k)
        write_json_atomic(paths.parts_manifest, manifest)
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()


def _merge(paths: JobPaths, manifest: dict, chunks, labels, elapsed: float, images_run: int, runtime: dict) -> dict:
    parts, audit = [], {}
    for k, _, _ in chunks:
        with np.load(paths.chunk(k), allow_pickle=False) as z:
            parts.append(z["x"])
            for key in z.files:
                if key.startswith("audit_"):
                    audit.setdefault(key[len("audit_"):], []).append(z[key])
    images = np.concatenate(parts)
    write_dataset(paths.output, images, labels)
    final = dict(manifest)
    final.update(
        {
            "complete": True,
            "output": str(paths.output),
            "output_fingerprint": dataset_fingerprint(images, labels),
            "audit": {k: np.concatenate(v).astype(float).round(7).tolist() for k, v in audit.items()},
            "provenance": {**run_provenance(), "compile_state": runtime},
            "timing": {
                "seconds_this_run": round(elapsed, 3),
                "images_this_run": images_run,
                "images_per_second_this_run": round(images_run / elapsed, 3) if elapsed > 0 else None,
            },
        }
    )
    write_json_atomic(paths.final_manifest, final)
    shutil.rmtree(paths.parts, ignore_errors=True)
    return final
