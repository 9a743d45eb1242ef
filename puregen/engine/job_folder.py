"""A job's files on disk, and what a new, resumed or overwritten job may do with them.

A job writing ``OUT`` owns exactly these paths: ``OUT`` itself (and the IDX
labels file beside it), ``OUT.manifest.json``, the work folder
``OUT.parts/`` and hidden temporaries named after them. Nothing else is ever
removed or replaced. The work folder appears whole (it is built under a
temporary name with its manifest, then renamed), so a work folder without a
manifest is not ours. Every chunk carries the job's key and its row indices,
and the manifest records each chunk's sha256, so a chunk that belongs to
another job, or was changed, is found before it is used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.atomic import write_json_atomic
from ..data.output_target import OutputTarget, output_digest
from ..errors import InputError

MANIFEST_VERSION = 2


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

    def prepass_chunk(self, k: int) -> Path:
        """A prepass method's values for chunk k (each file renamed into place whole)."""
        return self.parts / f"prepass-{k:05d}.npy"

    @property
    def fit_dir(self) -> Path:
        """Where a fit method keeps its own checkpoints while fitting (part of the job's resumable state)."""
        return self.parts / "fit"

    @property
    def dataset_state(self) -> Path:
        """A fit method's fitted state (JSON, with its tensors in a safetensors file beside it)."""
        return self.parts / "dataset-state.json"


def read_manifest(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: unreadable manifest ({type(e).__name__}); use --overwrite to start again") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: unreadable manifest (not a JSON object); use --overwrite to start again")
    return data


def job_key(input_fp: str, config_fp: str) -> str:
    """What a chunk carries to say which job made it."""
    return hashlib.sha256(f"{input_fp}:{config_fp}".encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def key_array(key: str) -> np.ndarray:
    return np.frombuffer(key.encode(), dtype=np.uint8)


def load_chunk(path: Path, key: str, start: int, stop: int, recorded_sha: str | None) -> dict:
    """The arrays of a finished chunk, after checking that it is this job's chunk of rows start..stop."""
    if recorded_sha is not None and file_sha256(path) != recorded_sha:
        raise InputError(f"{path}: changed since this job wrote it (sha256 differs from the manifest's); "
                         "delete it to purify its rows again, or use --overwrite")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except Exception as e:  # noqa: BLE001 - zip, npy header or pickle refusals: all mean "not a chunk"
        raise InputError(f"{path}: corrupt chunk ({type(e).__name__}: {e}); delete it to purify its rows again, "
                         "or use --overwrite") from None
    problem = None
    if "x" not in arrays or "index" not in arrays or "job" not in arrays:
        problem = "it is not a puregen chunk"
    elif arrays["job"].tobytes().decode(errors="replace") != key:
        problem = "it was written by another job (other input or configuration)"
    elif not np.array_equal(arrays["index"], np.arange(start, stop)):
        problem = f"it does not hold rows {start}..{stop - 1}"
    elif arrays["x"].dtype != np.uint8 or len(arrays["x"]) != stop - start:
        problem = "its images are not the chunk's uint8 rows"
    if problem:
        raise InputError(f"{path}: {problem}; delete it to purify its rows again, or use --overwrite")
    return arrays


# energy-NNNNN.npy: the prepass files of work folders written before the method registry, still ours to remove.
# fit: the folder a fit method checkpoints in (D-VAE's training runs), the one folder a work folder holds.
_OUR_PARTS_FILE = re.compile(
    r"(manifest\.json|chunk-\d{5}\.npz|(prepass|energy)-\d{5}\.npy|dataset-state\.(json|safetensors)|fit"
    r"|\..*tmp.*|\.lock)")


def _ours(parts: Path) -> bool:
    """A work folder is ours to delete only when it holds nothing but a job's files."""
    try:
        return parts.is_dir() and not parts.is_symlink() and all(
            _OUR_PARTS_FILE.fullmatch(p.name) and (p.is_file() or (p.name == "fit" and p.is_dir()))
            for p in parts.iterdir())
    except OSError:
        return False


def remove_orphans(paths: JobPaths, target: OutputTarget) -> None:
    """Delete the hidden temporaries that killed runs of this job left beside its files."""
    names = [p.name for p in target.files] + [paths.final_manifest.name, paths.parts.name]
    parent = paths.output.parent
    if parent.is_dir():
        for p in parent.iterdir():
            if p.name.startswith(".") and any(p.name.startswith(f".{n}.") for n in names) and (
                    p.name.endswith((".tmp", ".old")) or ".tmp-" in p.name or ".tmp." in p.name):
                _remove(p)
    if paths.parts.is_dir():
        for p in paths.parts.iterdir():
            if p.name.startswith(".") and "tmp" in p.name:
                _remove(p)


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


@contextlib.contextmanager
def locked(paths: JobPaths):
    """Hold the job's lock: two runs writing one output at once would undo each other's work."""
    fd = os.open(paths.parts, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(f"{paths.output}: another puregen job is writing this output now") from None
        yield
    finally:
        os.close(fd)


def create_parts(paths: JobPaths, manifest: dict) -> None:
    """Make the work folder with its manifest in one rename, so it never exists without one."""
    try:
        tmp = Path(tempfile.mkdtemp(dir=paths.output.parent, prefix=f".{paths.parts.name}.", suffix=".tmp"))
    except OSError as e:
        raise InputError(f"{paths.output}: cannot write to {paths.output.parent}: {e.strerror or e}") from None
    try:
        write_json_atomic(tmp / "manifest.json", manifest)
        os.replace(tmp, paths.parts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class JobStart:
    """What `decide` found: the manifest to continue (None: start afresh) or a finished job's manifest."""

    manifest: dict | None = None
    finished: dict | None = None


def decide(paths: JobPaths, target: OutputTarget, *, resume: bool, overwrite: bool,
           input_fp: str, config_fp: str) -> JobStart:
    """Check the existing files against the options, before anything is written or removed."""
    existing = target.existing()
    has_final = paths.final_manifest.exists()
    has_parts = os.path.lexists(paths.parts)
    parts_manifest = None
    if has_parts:
        if not paths.parts.is_dir() or paths.parts.is_symlink():
            raise InputError(f"{paths.parts}: is in the way of this job's work folder and is not one; move it")
        if paths.parts_manifest.exists():
            parts_manifest = read_manifest(paths.parts_manifest)
        elif not _ours(paths.parts) or any(p.name.startswith(("chunk-", "prepass-", "energy-", "dataset-state", "fit"))
                                           for p in paths.parts.iterdir()):
            raise InputError(f"{paths.parts}: holds files but no job manifest, so nothing in it can be trusted; "
                             "move it away, or use --overwrite if it is an old puregen work folder")

    def same_job(m: dict) -> bool:
        return m.get("input_fingerprint") == input_fp and m.get("config_fingerprint") == config_fp

    if overwrite:
        if has_parts and not _ours(paths.parts):
            raise InputError(f"{paths.parts}: holds files that are not a puregen job's; refusing to delete it")
        return JobStart()
    if resume and parts_manifest is not None:
        if not same_job(parts_manifest):
            what = "input data" if parts_manifest.get("input_fingerprint") != input_fp else (
                "configuration (method, options, seed, checkpoints and their configs, micro-batch, threads, "
                "backend or chunk size)")
            raise InputError(f"{paths.parts_manifest}: the unfinished job used different {what}; "
                             "use --overwrite to start again, or the same input and options to resume")
        if parts_manifest.get("merging"):
            return JobStart(parts_manifest)  # killed while merging: the output is this job's to write again
        if existing or has_final:
            raise InputError(f"{existing[0] if existing else paths.final_manifest}: already exists beside an "
                             "unfinished job; pass --overwrite to replace it")
        return JobStart(parts_manifest)
    if resume and has_final:
        done = read_manifest(paths.final_manifest)
        if not same_job(done):
            raise InputError(f"{paths.output}: already exists, from a job with other input or options; "
                             "pass --overwrite to replace it")
        missing = [p for p in target.files if not os.path.lexists(p)]
        if missing:
            raise InputError(f"{missing[0]}: is missing, though {paths.final_manifest} says the job finished; "
                             "pass --overwrite to purify again")
        if done.get("output_digest") != output_digest(target):
            raise InputError(f"{paths.output}: does not match its manifest {paths.final_manifest} (changed since "
                             "the job finished); pass --overwrite to purify again")
        return JobStart(finished=done)
    if existing or has_final:
        raise InputError(f"{existing[0] if existing else paths.final_manifest}: already exists; "
                         "pass --overwrite to replace it" + ("" if resume else " or --resume to check a finished job"))
    if has_parts:
        if parts_manifest is None:  # an empty work folder of an older version, killed at its start
            return JobStart()
        raise InputError(f"{paths.parts}: an unfinished job's parts are here; pass --resume to continue it "
                         "or --overwrite to start again")
    return JobStart()


def clear_for_new_job(paths: JobPaths) -> None:
    """Remove an old work folder (checked to be ours by `decide`) before a new job takes its place."""
    if os.path.lexists(paths.parts):
        shutil.rmtree(paths.parts)
