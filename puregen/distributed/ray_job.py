"""`puregen purify --engine ray`: a pipeline job whose chunks are purified by Ray actors.

The job is the single-process pipeline's (`puregen.engine.pipeline.run_job`): the same checks before
any work, the same work folder of chunk files and manifest, the same merge, manifest and audit.
Only the purification of the chunks not yet finished moves to a Ray cluster: their rows become a
Ray Dataset, `RayPurifier` actors purify them with the driver's purifier (its thread count pinned in
every actor), and each chunk is written as soon as all its rows are back, in whatever order the
blocks finish. A killed driver resumes with `--resume` at chunk granularity; an actor that dies is
restarted by Ray and its batch redone; the bytes equal the single-process job's.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ..errors import InputError
from .ray_data import RayPurifier


class RayChunkRunner:
    """A chunk runner for `run_job`: `num_workers` actors on the cluster at `address` (None: a local one)."""

    def __init__(self, *, address: str | None = None, num_workers: int = 2, cpus_per_worker: float | None = None):
        if num_workers < 1:
            raise InputError(f"--num-workers must be >= 1, got {num_workers}")
        try:
            import ray  # noqa: F401
        except ImportError:
            raise InputError("--engine ray needs Ray Data: pip install 'puregen[ray]'") from None
        self.address, self.num_workers, self.cpus_per_worker = address, num_workers, cpus_per_worker

    def _start(self):
        import ray

        if not ray.is_initialized():
            if self.address is None:
                ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # the job's own progress bar says how it goes
        return ray

    def _cpus(self, ray, threads: int) -> float:
        if self.cpus_per_worker is not None:
            return self.cpus_per_worker
        # Actors that take every CPU leave none for Ray Data's own tasks, and the job hangs: leave a tenth.
        total = ray.cluster_resources().get("CPU", os.cpu_count() or 1)
        return min(float(threads), 0.9 * total / self.num_workers)

    def __call__(self, purifier, images: np.ndarray, todo, seed: int, batch_size: int, bar):
        if not todo:
            return
        ray = self._start()
        threads = purifier.provenance.get("threads", 1)
        rows = [{"image": images[i], "index": i} for _, start, stop in todo for i in range(start, stop)]
        out = ray.data.from_items(rows).map_batches(
            RayPurifier, fn_constructor_kwargs={"purifier": purifier, "seed": seed}, concurrency=self.num_workers,
            num_cpus=self._cpus(ray, threads), num_gpus=1 if purifier.device.type == "cuda" else 0,
            batch_size=batch_size, batch_format="numpy")
        bounds = np.array([start for _, start, _ in todo])
        pending = {k: {"start": start, "left": stop - start, "x": np.empty((stop - start, *images.shape[1:]), np.uint8),
                       "audit": {}} for k, start, stop in todo}
        keys = [k for k, _, _ in todo]
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            index = np.asarray(batch["index"])
            owner = np.searchsorted(bounds, index, side="right") - 1  # the position in `todo` of each row's chunk
            for position in np.unique(owner):
                k = keys[position]
                entry, mine = pending[k], owner == position
                at = index[mine] - entry["start"]
                entry["x"][at] = np.asarray(batch["image"])[mine]
                for name, values in batch.items():
                    if name.startswith("audit_"):
                        values = np.asarray(values)
                        column = entry["audit"].setdefault(name[len("audit_"):],
                                                           np.empty(len(entry["x"]), values.dtype))
                        column[at] = values[mine]
                entry["left"] -= int(mine.sum())
                if bar is not None:
                    bar.update(int(mine.sum()))
                if entry["left"] == 0:
                    done = pending.pop(k)
                    yield k, done["x"], done["audit"]
        if pending:
            raise RuntimeError(f"the Ray job returned no rows for chunks {sorted(pending)}")
