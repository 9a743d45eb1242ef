"""Ray Data: actors purify blocks in any order, and the rows equal the single-process result byte for byte.

Sized for 2 CPUs: two actors of half a CPU each (Ray Data's own tasks need a share, or the job hangs),
one thread per actor, against a single process with one thread and the same micro-batch.
"""

from __future__ import annotations

import numpy as np
import pytest

from puregen.api import load_purifier
from puregen.errors import InputError

from .conftest import smooth_images

ray = pytest.importorskip("ray", reason="needs the ray extra (pip install 'puregen[ray]')")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _rows(images: np.ndarray, labels: np.ndarray):
    return ray.data.from_items([{"image": img, "index": i, "label": int(y)}
                                for i, (img, y) in enumerate(zip(images, labels))], override_num_blocks=5)


@pytest.mark.parametrize("method, options", [("ebm", {"steps": 2}), ("naive", {"steps": 1, "t_star": 2})])
def test_two_actors_give_the_single_process_bytes(local_ray, tiny_checkpoints, method, options):
    from puregen.distributed.ray_data import purify_ray_dataset

    ebm, ddpm = tiny_checkpoints
    load = {"ebm": ebm, "ddpm": ddpm, "preset": "tiny", "micro_batch": 8, **options}
    images, labels = smooth_images(37, seed=3), np.arange(37) % 10
    expected = load_purifier(method, threads=1, **load).purify(images, seed=5)
    # batches of 7 cut the 8-image micro-batches elsewhere than the single process does
    out = purify_ray_dataset(_rows(images, labels), method, seed=5, concurrency=2, num_cpus=0.5, threads=1,
                             batch_size=7, **load)
    rows = sorted(out.take_all(), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(37))
    got = np.stack([r["image"] for r in rows])
    assert got.shape == images.shape and np.array_equal(got, expected)  # exact: the bytes
    assert [r["label"] for r in rows] == labels.tolist()  # other columns carried through
    assert all("audit_l2_change" in r and "audit_energy_before" in r for r in rows)


def test_a_method_that_needs_the_whole_dataset_is_refused_before_any_actor_starts(local_ray, tiny_checkpoints):
    from puregen.distributed.ray_data import purify_ray_dataset

    ebm, ddpm = tiny_checkpoints
    ds = _rows(smooth_images(4, seed=1), np.zeros(4))
    with pytest.raises(InputError, match="Ray Data pipeline sees one batch at a time.*--energy-threshold"):
        purify_ray_dataset(ds, "filt", ebm=ebm, ddpm=ddpm, preset="tiny", num_cpus=0.5)
    with pytest.raises(InputError, match="--steps does not apply to --method ddpm"):
        purify_ray_dataset(ds, "ddpm", ddpm=ddpm, preset="tiny", steps=3, num_cpus=0.5)


class _DiesOnce:
    """A RayPurifier whose actor process dies on its first batch the first time (a marker file says it did)."""

    def __init__(self, marker: str, **kwargs):
        from puregen.distributed.ray_data import RayPurifier

        self.marker, self.inner = marker, RayPurifier(**kwargs)

    def __call__(self, batch):
        import os

        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return self.inner(batch)
        os.close(fd)
        os._exit(1)  # the actor's process is gone mid-run, as when a node is lost


def test_an_actor_that_dies_mid_run_is_restarted_and_its_batch_redone(local_ray, tiny_checkpoints, tmp_path):
    import cloudpickle

    cloudpickle.register_pickle_by_value(__import__(__name__))  # the actors need not import the tests package
    ebm, _ = tiny_checkpoints
    load = {"method": "ebm", "ebm": ebm, "preset": "tiny", "micro_batch": 8, "steps": 2, "seed": 5, "threads": 1}
    images, labels = smooth_images(30, seed=4), np.arange(30) % 10
    expected = load_purifier("ebm", ebm=ebm, preset="tiny", micro_batch=8, steps=2, threads=1).purify(images, seed=5)
    marker = tmp_path / "died"
    out = _rows(images, labels).map_batches(
        _DiesOnce, fn_constructor_kwargs={"marker": str(marker), **load}, concurrency=2, num_cpus=0.5,
        batch_size=6, batch_format="numpy")  # Ray Data's actor pools restart dead actors by default
    rows = sorted(out.take_all(), key=lambda r: r["index"])
    assert marker.exists(), "no actor died: the test would be vacuous"
    assert [r["index"] for r in rows] == list(range(30))  # nothing lost, nothing twice
    assert np.array_equal(np.stack([r["image"] for r in rows]), expected)


def test_engine_ray_job_equals_the_local_job_and_resumes_after_the_driver_stops(local_ray, tiny_checkpoints,
                                                                               tmp_path):
    from puregen.api import purify_dataset
    from puregen.data import read_dataset, write_dataset
    from puregen.distributed.ray_job import RayChunkRunner

    ebm, ddpm = tiny_checkpoints
    load = {"ebm": ebm, "ddpm": ddpm, "preset": "tiny", "micro_batch": 8, "steps": 1, "t_star": 2, "threads": 1}
    images, labels = smooth_images(40, seed=6), np.arange(40) % 10
    write_dataset(tmp_path / "in.npz", images, labels)
    job = dict(seed=3, chunk_size=16, batch_size=6, progress=False)
    local = purify_dataset(tmp_path / "in.npz", tmp_path / "local.npz", "naive", **job, **load)

    def stop_after_the_first_chunk(k):
        raise KeyboardInterrupt  # the driver stops with one chunk written

    with pytest.raises(KeyboardInterrupt):
        purify_dataset(tmp_path / "in.npz", tmp_path / "ray.npz", "naive", **job, **load,
                       chunk_runner=RayChunkRunner(num_workers=2), on_chunk=stop_after_the_first_chunk)
    assert len(list((tmp_path / "ray.npz.parts").glob("chunk-*.npz"))) == 1
    resumed = purify_dataset(tmp_path / "in.npz", tmp_path / "ray.npz", "naive", **job, **load, resume=True,
                             chunk_runner=RayChunkRunner(num_workers=2))
    out, ref = read_dataset(tmp_path / "ray.npz"), read_dataset(tmp_path / "local.npz")
    assert np.array_equal(out.images, ref.images) and np.array_equal(out.labels, ref.labels)  # exact: the bytes
    assert resumed["config_fingerprint"] == local["config_fingerprint"]  # the same job, run elsewhere
    assert resumed["audit"] == local["audit"]
    assert resumed["timing"]["images_this_run"] == 40 - 16  # the resume redid only the unfinished chunks


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
def test_engine_ray_with_shards_in_and_out_equals_the_single_process_npz_run(local_ray, tiny_checkpoints, tmp_path,
                                                                            fmt):
    from puregen.api import purify_dataset
    from puregen.data import read_dataset, write_dataset
    from puregen.distributed.ray_job import RayChunkRunner

    from .test_data_shards import _parquet_shards, _tar_shards

    ebm, _ = tiny_checkpoints
    load = {"ebm": ebm, "preset": "tiny", "micro_batch": 8, "steps": 2, "threads": 1}
    images, labels = smooth_images(14, seed=5), np.arange(14) % 4  # the shard tests' 3 uneven shards, 14 rows
    shards = (_parquet_shards if fmt == "parquet" else _tar_shards)(tmp_path / "in", images, labels)
    write_dataset(tmp_path / "in.npz", images, labels)
    purify_dataset(tmp_path / "in.npz", tmp_path / "ref.npz", "ebm", seed=2, progress=False, **load)
    out = tmp_path / f"out.{fmt}"
    purify_dataset(shards, out, "ebm", seed=2, chunk_size=4, batch_size=3, progress=False, **load,
                   chunk_runner=RayChunkRunner(num_workers=2))
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in shards.iterdir())  # the input's shards
    got = read_dataset(out)
    assert np.array_equal(got.images, read_dataset(tmp_path / "ref.npz").images)  # exact: the bytes
    assert np.array_equal(got.labels, labels)


def test_engine_ray_driver_killed_then_resumed_gives_identical_bytes(tmp_path, tiny_checkpoints):
    """SIGKILL of `puregen purify --engine ray` (its local Ray cluster dies with it) after a chunk, then --resume."""
    from benchmarks.kill_resume import kill_and_resume
    from puregen.data import write_dataset

    ebm, _ = tiny_checkpoints
    write_dataset(tmp_path / "in.npz", smooth_images(40, seed=8))
    extra = ["--method", "ebm", "--preset", "tiny", "--ebm", ebm, "--steps", 3, "--threads", 1, "--micro-batch", 8,
             "--engine", "ray", "--num-workers", 2]
    result = kill_and_resume(tmp_path / "in.npz", tmp_path / "run", extra, chunk_size=4, num_chunks=10, rng_seed=1)
    assert result["byte_identical"], result
    assert 0 < result["images_resumed"] < 40, result  # finished chunks were not redone


def test_without_ray_the_ray_routes_give_one_clear_error(monkeypatch, tmp_path):
    import sys

    from puregen.cli import main
    from puregen.distributed.ray_data import purify_ray_dataset
    from puregen.distributed.ray_job import RayChunkRunner

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where the extra is not installed
    with pytest.raises(InputError, match=r"pip install 'puregen\[ray\]'"):
        RayChunkRunner()
    with pytest.raises(InputError, match=r"pip install 'puregen\[ray\]'"):
        purify_ray_dataset(None, "jpeg")
    np.savez(tmp_path / "in.npz", x=smooth_images(2))
    assert main(["purify", str(tmp_path / "in.npz"), "-o", str(tmp_path / "o.npz"), "--method", "jpeg",
                 "--engine", "ray", "--no-progress"]) == 2
    assert not (tmp_path / "o.npz").exists()
