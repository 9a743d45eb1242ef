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

import dataclasses
import hashlib
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data import ImageDataset, read_dataset, write_dataset
from ..data.atomic import write_json_atomic, write_npz_atomic
from ..data.output_target import OutputTarget, output_digest, output_format, overlaps, plan_output, resolved
from ..data.idx import check_idx_dataset
from ..data.writers import check_shards_writable
from ..data.npz_io import stored_label_dtype
from ..errors import InputError
from .job_folder import (
    MANIFEST_VERSION, JobPaths, clear_for_new_job, create_parts, decide, file_sha256, job_key, key_array,
    load_chunk, locked, remove_orphans,
)
from ..methods.state_io import load_state, save_state
from .noise_key import NoiseKey, check_seed
from .progress import image_progress_bar, log_to_stderr
from .provenance import run_provenance
from .purifiers import Purifier

DEFAULT_CHUNK_SIZE = 1024


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
        "method_name": purifier.method,
        "method": purifier.config.to_dict(),
        "seed": seed,
        "chunk_size": chunk_size,
        "evaluator": evaluator,
        "threads": purifier.provenance.get("threads"),
        "checkpoints": purifier.provenance.get("checkpoints", {}),
        # The architecture each network was built with: the same weights under another config.json
        # (another norm_eps, attention head size, ...) give other bytes.
        "networks": network_configs(purifier),
    }
    if purifier.algorithm.own_networks:  # its own networks run in the purifier's precision and backend
        config["precision"] = purifier.provenance.get("precision", "fp32")
        config["own_networks_backend"] = purifier.provenance.get("backend", "torch")
    if purifier.algorithm.scope != "batch" and purifier.dataset_state is not None:
        # A dataset state given before the job (not one the job computes from its input) decides the bytes.
        config["given_dataset_state"] = state_digest(purifier.dataset_state)
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest(), config


def state_digest(state: dict) -> str:
    """sha256 of a dataset state's values and tensors (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        h.update(name.encode())
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous()
            h.update(repr((str(t.dtype), tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()


def network_configs(purifier: Purifier) -> dict:
    evaluator = purifier.evaluator
    out = {}
    for kind in ("ebm", "unet"):
        model = getattr(evaluator, kind, None)
        config = getattr(getattr(model, "_orig_mod", model), "config", None)
        if config is not None:
            out[kind] = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config)
    return out


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
                self.manifest["chunk_sha256"][str(k)] = file_sha256(self.paths.chunk(k))
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




def _check_job_options(seed, batch_size: int, chunk_size: int, limit: int | None, resume: bool, overwrite: bool):
    check_seed(seed)
    for name, value in (("--batch-size", batch_size), ("--chunk-size", chunk_size)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other: continue the job, or start it again")


def _check_apart(target: OutputTarget, paths: JobPaths, input_path, dataset: ImageDataset) -> None:
    """No file the job writes or may delete is, contains or lies inside the input."""
    inputs = [resolved(input_path, "input")] + [resolved(f, "input") for f in (dataset.files or ())]
    written = [*target.files, resolved(paths.final_manifest, "output"), resolved(paths.parts, "output")]
    for w in written:
        for i in inputs:
            if overlaps(w, i):
                relation = "is" if w == i else ("contains" if w in i.parents else "lies inside")
                raise InputError(f"{w}: the output {relation} the input {i}; choose an output path apart from it")


def _describe_read(dataset: ImageDataset, input_path, n: int) -> str:
    labelled = "labelled" if dataset.labels is not None else "unlabelled"
    shape = "x".join(str(d) for d in dataset.images.shape[1:])
    files = dataset.files or ()
    where = ", ".join(Path(f).name for f in files) if files else str(input_path)
    first = f" (purifying the first {n})" if n < len(dataset) else ""
    return f"puregen: read {len(dataset)} {labelled} {shape} images from {where}{first}"


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
    split: str | None = None,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
    chunk_runner: Callable | None = None,
) -> dict:
    """Purify the dataset at `input_path` into `output_path`; returns the final manifest.

    Every option, the input and the output location are checked before the first image is purified
    and before anything is written. `split` picks train or test in a CIFAR or IDX folder. `log`
    receives one line naming the files read (default: standard error when `progress` is on).
    `chunk_runner` purifies the chunks elsewhere (see `purify_chunks_here`; the Ray engine's is
    `puregen.distributed.ray_job.RayChunkRunner`): the job's files, resume and bytes are the same.
    """
    if log is None:
        log = log_to_stderr if progress else (lambda line: None)
    _check_job_options(seed, batch_size, chunk_size, limit, resume, overwrite)
    output_format(output_path)  # a name that means no format is refused before a long read
    paths = JobPaths(resolved(output_path, "output"))
    resolved(input_path, "input")

    dataset = read_dataset(input_path, format=input_format, split=split)
    images, labels = dataset.images, dataset.labels
    if limit is not None:
        images = images[:limit]
        labels = None if labels is None else labels[:limit]
    n = len(images)
    purifier.check_image_shape(*images.shape[1:], source=str(input_path))
    if purifier.algorithm.needs_labels and labels is None:
        raise InputError(f"{input_path}: method {purifier.method!r} needs labelled data, and these images have no labels")
    if purifier.algorithm.scope != "batch" and purifier.dataset_state is not None:
        try:
            purifier.algorithm.check_input(purifier.dataset_state, *images.shape[1:], labels)
        except InputError as e:
            raise InputError(f"{input_path}: {e}") from None
    target = plan_output(output_path, has_labels=labels is not None)
    _check_apart(target, paths, input_path, dataset)
    target.check_replaceable()
    out_data = ImageDataset(images, labels, str(target.path), dataset.num_classes,
                            dataset.class_names if target.format == "folder" else None,
                            names=dataset.names[:n] if dataset.names is not None and target.format == "folder" else None,
                            label_dtype=dataset.label_dtype, shards=_output_shards(dataset, target, n))
    check_writable(target, out_data)
    log(_describe_read(dataset, input_path, n))
    input_fp = dataset_fingerprint(images, labels)
    config_fp, config = config_fingerprint(purifier, seed, chunk_size)
    start = decide(paths, target, resume=resume, overwrite=overwrite, input_fp=input_fp, config_fp=config_fp)
    if start.finished is not None:
        remove_orphans(paths, target)
        return start.finished

    # Nothing has been written or removed up to here.
    manifest = start.manifest
    if manifest is None:
        clear_for_new_job(paths)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "input": str(input_path),
            "input_files": list(dataset.files or ()),
            "input_fingerprint": input_fp,
            "config_fingerprint": config_fp,
            "config": config,
            "num_images": n,
            "chunk_size": chunk_size,
            "finished_chunks": [],
            "chunk_sha256": {},
            "finished_prepass_chunks": [],
        }
        create_parts(paths, manifest)
    with locked(paths):
        remove_orphans(paths, target)
        return _run_locked(purifier, images, out_data, target, paths, manifest, seed, batch_size, chunk_size,
                           progress, on_chunk, dataset, chunk_runner)


def _run_locked(purifier, images, out_data, target, paths, manifest, seed, batch_size, chunk_size, progress,
                on_chunk, dataset, chunk_runner=None) -> dict:
    n = len(images)
    labels = out_data.labels
    key = job_key(manifest["input_fingerprint"], manifest["config_fingerprint"])
    chunks = [(k, s, min(s + chunk_size, n)) for k, s in enumerate(range(0, n, chunk_size))]
    started = time.perf_counter()
    images_run = 0
    if not manifest.get("merging"):
        dataset_pass = purifier.needs_dataset_pass
        if dataset_pass:
            purifier.dataset_state = _dataset_state(purifier, images, labels, chunks, paths, manifest, seed,
                                                    batch_size, progress)
            manifest["dataset_state"] = purifier.algorithm.describe_state(purifier.dataset_state)
        try:
            images_run = _purify_chunks(purifier, images, chunks, paths, manifest, key, seed, batch_size, progress,
                                        on_chunk, chunk_runner, labels)
        finally:
            if dataset_pass:  # the state belongs to this dataset, not to the purifier
                purifier.dataset_state = None
    elapsed = time.perf_counter() - started
    runtime = getattr(purifier.evaluator, "compile_state", dict)()
    return _merge(paths, target, manifest, chunks, key, out_data, elapsed, images_run, runtime, dataset)


def _output_shards(dataset: ImageDataset, target: OutputTarget, n: int):
    """The input's shard layout for a sharded output, cut to the ``n`` rows purified; None otherwise."""
    if target.format not in ("parquet", "webdataset") or dataset.shards is None:
        return None
    from ..data.parquet_io import head_rows
    from ..data.webdataset_io import head_samples

    return dataset.shards.head(n, head_rows if dataset.shards.format == "parquet" else head_samples)


def check_writable(target: OutputTarget, data: ImageDataset) -> None:
    """What the writer would refuse at the end (the writers' own checks), refused now."""
    if target.format in ("parquet", "webdataset"):
        check_shards_writable(target.path, target.format, data.shards)
    if target.format == "idx":
        check_idx_dataset(data.images.shape, data.labels, str(target.path))
    if target.format == "npz" and data.labels is not None:
        stored_label_dtype(data.labels, data.label_dtype, str(target.path))


def purify_chunks_here(purifier, images, todo, seed: int, batch_size: int, bar, labels=None):
    """The chunks (k, start, stop) of `todo` purified in this process, in order: yields (k, images, audit).

    `labels` (the whole input's) are passed only for a method that needs them per batch.

    Another chunk runner (`puregen.distributed.ray_job.RayChunkRunner`) takes the same arguments and
    yields the same triples, in any order; the job writes each chunk as it comes.
    """
    for k, start, stop, chunk in _Prefetcher(images, todo):
        outs, audits = [], []
        for s in range(start, stop, batch_size):
            e = min(s + batch_size, stop)
            res = purifier.purify_batch(chunk[s - start : e - start], NoiseKey.rows(seed, s, e),
                                        progress=bar.update if bar is not None else None,
                                        labels=None if labels is None else np.asarray(labels[s:e], np.int64))
            outs.append(res.images.cpu().numpy())
            audits.append(res.audit)
        yield k, np.concatenate(outs), {name: np.concatenate([a[name] for a in audits]) for name in audits[0]}


def _purify_chunks(purifier, images, chunks, paths, manifest, key, seed, batch_size, progress, on_chunk,
                   chunk_runner=None, labels=None) -> int:
    """The main pass over the chunks not yet finished; returns how many images it purified."""
    n = len(images)
    # A chunk file is renamed into place whole and carries the job's key and its rows, so a chunk on
    # disk that passes `load_chunk` is finished even when the kill came between its rename and the
    # manifest's update (its sha256 is then recorded now).
    recorded = manifest.setdefault("chunk_sha256", {})
    finished = set()
    for k, start, stop in chunks:
        if paths.chunk(k).exists():
            load_chunk(paths.chunk(k), key, start, stop, recorded.get(str(k)))
            recorded.setdefault(str(k), file_sha256(paths.chunk(k)))
            finished.add(k)
    manifest["finished_chunks"] = sorted(finished)
    todo = [c for c in chunks if c[0] not in finished]
    images_todo = sum(stop - start for _, start, stop in todo)
    bar = image_progress_bar(n, f"purify[{purifier.method}]", progress)
    if bar is not None:
        bar.update(n - images_todo)
    writer = _Writer(paths, manifest)
    runner = chunk_runner or purify_chunks_here
    # Only a method that reads labels per batch gets them (another chunk runner need not take them).
    with_labels = {"labels": labels} if purifier.algorithm.needs_labels else {}
    try:
        for k, purified, audit in runner(purifier, images, todo, seed, batch_size, bar, **with_labels):
            _, start, stop = chunks[k]
            arrays = {"x": purified, "index": np.arange(start, stop, dtype=np.int64), "job": key_array(key)}
            arrays.update({f"audit_{name}": values for name, values in audit.items()})
            writer.put(k, arrays)
            if on_chunk is not None:
                on_chunk(k)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    return images_todo


def _dataset_state(purifier, images, labels, chunks, paths, manifest, seed, batch_size, progress) -> dict:
    """The dataset state of a method that needs the whole input first: a prepass or a fit, both resumable."""
    if purifier.algorithm.scope == "prepass":
        _prepass(purifier, images, chunks, paths, manifest, seed, batch_size, progress)
        values = np.concatenate([np.load(paths.prepass_chunk(k)) for k, _, _ in chunks])
        return purifier.state_from_prepass(values, np.arange(len(images)))
    # A fit's result is part of the job's state: a resumed job reads it instead of fitting again. A fit that
    # checkpoints (D-VAE's training runs) does so in the work folder's fit/, so a job killed mid-fit resumes it.
    if paths.dataset_state.exists():
        return load_state(paths.dataset_state)
    state = purifier.fit(torch.from_numpy(np.ascontiguousarray(images)),
                         None if labels is None else torch.from_numpy(np.asarray(labels, np.int64)),
                         NoiseKey.rows(seed, 0, len(images)), work_dir=paths.fit_dir, progress=progress)
    save_state(paths.dataset_state, state)
    return state


def _prepass(purifier, images, chunks, paths, manifest, seed, batch_size, progress) -> None:
    """A prepass method's first pass (filt: every image's energy), chunked and resumable like the main pass."""
    done = {k for k, _, _ in chunks if paths.prepass_chunk(k).exists()}  # renamed into place whole
    todo = [c for c in chunks if c[0] not in done]
    bar = image_progress_bar(len(images), f"prepass[{purifier.method}]", progress)
    if bar is not None:
        bar.update(len(images) - sum(stop - start for _, start, stop in todo))
    for k, start, stop, chunk in _Prefetcher(images, todo):
        values = np.concatenate(
            [purifier.prepass_values(chunk[s : s + batch_size],
                                     NoiseKey.rows(seed, start + s, min(start + s + batch_size, stop)))
             for s in range(0, stop - start, batch_size)]
        )
        tmp = paths.parts / f".prepass-{k:05d}.tmp.npy"
        np.save(tmp, values)
        os.replace(tmp, paths.prepass_chunk(k))
        manifest["finished_prepass_chunks"] = sorted(done | {k})
        done.add(k)
        write_json_atomic(paths.parts_manifest, manifest)
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()


def _merge(paths: JobPaths, target: OutputTarget, manifest: dict, chunks, key: str, out_data: ImageDataset,
           elapsed: float, images_run: int, runtime: dict, dataset: ImageDataset) -> dict:
    """Join the chunks into the output. Resumable: the work folder says it is merging before the output
    is replaced, and the final manifest is written only once the output is in place."""
    parts, audit = [], {}
    recorded = manifest.get("chunk_sha256", {})
    for k, start, stop in chunks:
        arrays = load_chunk(paths.chunk(k), key, start, stop, recorded.get(str(k)))
        parts.append(arrays["x"])
        for name, value in arrays.items():
            if name.startswith("audit_"):
                audit.setdefault(name[len("audit_"):], []).append(value)
    images = np.concatenate(parts)
    if not manifest.get("merging"):
        manifest["merging"] = True
        write_json_atomic(paths.parts_manifest, manifest)
    out_data.images = images
    write_dataset(target.path, out_data)
    final = {k: v for k, v in manifest.items() if k not in ("merging", "finished_prepass_chunks")}
    final.update(
        {
            "complete": True,
            "output": str(target.path),
            "output_files": [str(p) for p in target.files],
            "output_fingerprint": dataset_fingerprint(images, out_data.labels),
            "output_digest": output_digest(target),
            "audit": {k: np.concatenate(v).astype(float).round(7).tolist() for k, v in audit.items()},
            "provenance": {**run_provenance(), "compile_state": runtime},
            "timing": {
                "seconds_this_run": round(elapsed, 3),
                "images_this_run": images_run,
                "images_per_second_this_run": round(images_run / elapsed, 3) if elapsed > 0 else None,
            },
        }
    )
    if dataset.names is not None:
        final["sources"] = list(dataset.names[: len(images)])
    write_json_atomic(paths.final_manifest, final)
    clear_for_new_job(paths)
    remove_orphans(paths, target)
    return final
