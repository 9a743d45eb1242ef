"""The bulk pipeline: chunks, manifest, resume after SIGKILL, limits, overwrite protection."""

import json

import numpy as np
import pytest

from benchmarks.kill_resume import kill_and_resume
from puregen.api import load_purifier, purify_dataset
from puregen.data import read_dataset, write_dataset
from puregen.errors import InputError

from .conftest import smooth_images


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "in.npz"
    write_dataset(path, smooth_images(40, seed=3), np.arange(40) % 10)
    return path


# Two Langevin steps and t* = 2 where the method has those options (an option it does not read is an error).
SHORT = {"naive": dict(steps=2, t_star=2), "ebm": dict(steps=2), "filt": dict(t_star=2), "jpeg": {}}


def _purifier(tiny_models, method="naive"):
    ebm, unet = tiny_models
    return load_purifier(method, ebm=ebm, ddpm=unet, preset="tiny", micro_batch=8, threads=2, **SHORT[method])


def test_output_equals_api_and_manifest_is_complete(tmp_path, dataset_file, tiny_models):
    p = _purifier(tiny_models)
    out = tmp_path / "out.npz"
    manifest = purify_dataset(dataset_file, out, purifier=p, seed=4, chunk_size=16, batch_size=5, progress=False)
    ds = read_dataset(out)
    src = read_dataset(dataset_file)
    assert np.array_equal(ds.images, p.purify(src.images, seed=4))
    assert np.array_equal(ds.labels, src.labels)
    assert not (tmp_path / "out.npz.parts").exists()
    on_disk = json.loads((tmp_path / "out.npz.manifest.json").read_text())
    assert on_disk["complete"] and on_disk["num_images"] == 40 == manifest["num_images"]
    assert on_disk["finished_chunks"] == [0, 1, 2]
    for key in ("energy_before", "energy_after", "l2_change", "linf_change"):
        assert len(on_disk["audit"][key]) == 40
    assert on_disk["config"]["threads"] == 2 and on_disk["config"]["evaluator"]["micro_batch"] == 8
    assert "torch" in on_disk["provenance"]["versions"]


def test_limit_purifies_first_n(tmp_path, dataset_file, tiny_models):
    p = _purifier(tiny_models, "ebm")
    purify_dataset(dataset_file, tmp_path / "o.npz", purifier=p, limit=7, progress=False)
    full = p.purify(read_dataset(dataset_file).images[:7], seed=0)
    assert np.array_equal(read_dataset(tmp_path / "o.npz").images, full)


def test_existing_output_is_protected(tmp_path, dataset_file, tiny_models):
    p = _purifier(tiny_models, "jpeg")
    out = tmp_path / "o.npz"
    out.write_bytes(b"precious")
    with pytest.raises(InputError, match="already exists"):
        purify_dataset(dataset_file, out, purifier=p, progress=False)
    assert out.read_bytes() == b"precious"
    purify_dataset(dataset_file, out, purifier=p, overwrite=True, progress=False)
    assert len(read_dataset(out)) == 40


def _interrupt_after_first_chunk(dataset_file, out, purifier):
    from puregen.engine.pipeline import run_job

    def stop_after_first(_k):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(dataset_file, out, purifier, chunk_size=16, progress=False, on_chunk=stop_after_first)


def test_resume_refuses_a_different_configuration(tmp_path, dataset_file, tiny_models):
    out = tmp_path / "o.npz"
    p = _purifier(tiny_models, "ebm")
    _interrupt_after_first_chunk(dataset_file, out, p)
    assert (tmp_path / "o.npz.parts" / "manifest.json").exists()
    with pytest.raises(InputError, match="unfinished job's parts"):
        purify_dataset(dataset_file, out, purifier=p, chunk_size=16, progress=False)
    with pytest.raises(InputError, match="different configuration"):
        purify_dataset(dataset_file, out, purifier=p, chunk_size=16, seed=9, resume=True, progress=False)
    manifest = purify_dataset(dataset_file, out, purifier=p, chunk_size=16, resume=True, progress=False)
    assert manifest["timing"]["images_this_run"] == 24  # the first chunk was not redone
    assert np.array_equal(read_dataset(out).images, p.purify(read_dataset(dataset_file).images))


def test_resume_keeps_a_chunk_written_just_before_the_kill(tmp_path, dataset_file, tiny_models):
    # A kill between a chunk's rename and the manifest's update leaves the chunk on disk
    # but not in the manifest; resuming must keep it, not redo it.
    out = tmp_path / "o.npz"
    p = _purifier(tiny_models, "ebm")
    _interrupt_after_first_chunk(dataset_file, out, p)
    manifest_path = tmp_path / "o.npz.parts" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["finished_chunks"] == [0]
    manifest_path.write_text(json.dumps(dict(manifest, finished_chunks=[])))
    resumed = purify_dataset(dataset_file, out, purifier=p, chunk_size=16, resume=True, progress=False)
    assert resumed["timing"]["images_this_run"] == 24
    assert np.array_equal(read_dataset(out).images, p.purify(read_dataset(dataset_file).images))


def test_filt_pipeline_matches_api(tmp_path, dataset_file, tiny_models):
    p = _purifier(tiny_models, "filt")
    manifest = purify_dataset(dataset_file, tmp_path / "f.npz", purifier=p, chunk_size=16, progress=False)
    api = _purifier(tiny_models, "filt").purify(read_dataset(dataset_file).images)
    assert np.array_equal(read_dataset(tmp_path / "f.npz").images, api)
    assert sum(manifest["audit"]["filt_selected"]) == 20  # k = 0.5 of 40
    assert set(manifest["dataset_state"]) == {"energy", "index"}  # the quantile boundary it selected by


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_bytes(tmp_path, dataset_file, tiny_checkpoints):
    ebm, ddpm = tiny_checkpoints
    extra = ["--method", "naive", "--preset", "tiny", "--ebm", ebm, "--ddpm", ddpm, "--steps", 3, "--t-star", 3,
             "--threads", 2, "--micro-batch", 8]
    result = kill_and_resume(dataset_file, tmp_path, extra, chunk_size=4, num_chunks=10)
    assert result["byte_identical"], result
    assert 0 < result["images_resumed"] < 40, result  # finished chunks were not redone


def test_filt_purifier_can_run_two_jobs(tmp_path, dataset_file, tiny_models):
    p = _purifier(tiny_models, "filt")
    first = purify_dataset(dataset_file, tmp_path / "a.npz", purifier=p, progress=False)
    assert p.needs_dataset_pass  # the first dataset's selection did not stick to the purifier
    second = purify_dataset(dataset_file, tmp_path / "b.npz", purifier=p, limit=10, progress=False)
    assert sum(first["audit"]["filt_selected"]) == 20 and sum(second["audit"]["filt_selected"]) == 5


def test_corrupt_parts_manifest_is_a_clear_error(tmp_path, dataset_file, tiny_models):
    parts = tmp_path / "o.npz.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text('{"input_fingerprint": ')
    with pytest.raises(InputError, match="manifest"):
        purify_dataset(dataset_file, tmp_path / "o.npz", purifier=_purifier(tiny_models, "jpeg"), resume=True,
                       progress=False)
