"""What a purification job must never do: lose work, drop names, mix jobs, or touch files not its own.

Each test reproduces a way a user lost work or data (wrong output names found after the work, bad seeds,
kills during the merge, edited checkpoints, replaced chunks, an --overwrite onto the input) and checks
the job's answer: one clear error (exit 2) before anything is written, or a resume that finishes the job.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from puregen.cli import main
from puregen.data import read_dataset, write_dataset
from puregen.engine import pipeline
from puregen.engine.purifiers import Purifier, _StepProgress

from .conftest import smooth_images


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "in.npz"
    np.savez(path, x=smooth_images(24, seed=2), y=(np.arange(24) % 5).astype(np.uint8))
    return path


def run(capsys, *args):
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def written(folder, *, besides=()):
    """Everything under `folder` except the named inputs."""
    return sorted(p.name for p in folder.iterdir() if p.name not in besides)


@pytest.fixture
def no_purification(monkeypatch):
    """Fails the test if any image is purified."""
    def refuse(*a, **k):
        raise AssertionError("an image was purified before the options were checked")

    monkeypatch.setattr(Purifier, "purify_batch", refuse)


# -- found after the work, or after the job's folder exists ---------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["-o", "{d}/out.feather"], "cannot tell the output format"),
    (["-o", "{d}/out.parquet"], "rebuilds the shards of a parquet input"),
    (["-o", "{d}/out.npz", "--seed", "-1"], "--seed must be in"),
    (["-o", "{d}/out.npz", "--seed", str(1 << 64)], "--seed must be in"),
    (["-o", "{d}/out.npy"], "cannot hold labels"),
    (["-o", "{d}/out-images-idx3-ubyte", "--limit", "0"], "--limit must be"),
    (["-o", "{d}/out.npz", "--resume", "--overwrite"], "exclude each other"),
    (["-o", "{d}/in.npz/x.npz"], "is a file, not a directory"),
    (["-o", "."], "contains the input"),
])
def test_bad_options_and_outputs_are_refused_before_anything_is_written(tmp_path, data, capsys, no_purification,
                                                                       monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    args = [a.format(d=tmp_path) for a in args]
    rc, err = run(capsys, "purify", data, *args, "--method", "jpeg", "--no-progress")
    assert rc == 2 and message in err
    assert written(tmp_path) == ["in.npz"]  # no OUT.parts/, no manifest, nothing


@pytest.mark.parametrize("args, message", [
    (["--method", "ddpm", "--steps", "5"], "--steps does not apply to --method ddpm"),
    (["--method", "ebm", "--t-star", "5"], "--t-star does not apply to --method ebm"),
    (["--method", "jpeg", "--temp", "1e-4"], "--temp does not apply to --method jpeg"),
    (["--method", "ebm", "--jpeg-quality", "50"], "--jpeg-quality does not apply"),
    (["--method", "ddpm", "--t-star", "5", "--reverse-steps", "6"], "--reverse-steps 6 is more than the 5"),
])
def test_options_the_method_does_not_read_are_refused(tmp_path, data, capsys, args, message):
    rc, err = run(capsys, "purify", data, "-o", tmp_path / "o.npz", *args, "--no-progress")
    assert rc == 2 and message in err
    assert written(tmp_path) == ["in.npz"]


def test_a_symlink_loop_as_input_or_output_is_one_clear_error(tmp_path, data, capsys):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for args in (["purify", tmp_path / "loop", "-o", tmp_path / "o.npz"],
                 ["purify", data, "-o", tmp_path / "loop" / "o.npz"]):
        rc, err = run(capsys, *args, "--method", "jpeg", "--no-progress")
        assert rc == 2 and "loop" in err
    assert written(tmp_path) == ["in.npz", "loop"]


def test_a_read_only_output_folder_is_refused_before_work(tmp_path, data, capsys, no_purification, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root may write anyway; the check asks access(2), so deny it as a user's mode would
        import puregen.data.output_target as target

        real = os.access
        monkeypatch.setattr(target.os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    try:
        rc, err = run(capsys, "purify", data, "-o", ro / "o.npz", "--method", "jpeg", "--no-progress")
    finally:
        ro.chmod(0o755)
    assert rc == 2 and f"cannot write to {ro}: permission denied" in err and written(ro) == []


def test_disk_full_at_the_end_names_the_path_and_the_job_resumes(tmp_path, data, capsys, monkeypatch):
    real, calls = np.savez, []

    def full(f, **arrays):  # the chunk is written first, the output second: the disk fills up there
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(f, **arrays)

    monkeypatch.setattr(np, "savez", full)
    rc, err = run(capsys, "purify", data, "-o", tmp_path / "o.npz", "--method", "jpeg", "--no-progress")
    assert rc == 2 and f"{tmp_path / 'o.npz'}: cannot write: No space left on device" in err
    monkeypatch.undo()
    rc, _ = run(capsys, "purify", data, "-o", tmp_path / "o.npz", "--method", "jpeg", "--no-progress", "--resume")
    assert rc == 0 and read_dataset(tmp_path / "o.npz").images.shape == (24, 28, 28, 1)


# -- names, dtypes and splits kept ---------------------------------------------------------------------


def test_an_image_folder_keeps_its_class_and_file_names(tmp_path, capsys):
    src = tmp_path / "png_in"
    images = smooth_images(6, c=3, seed=4)
    names = ["bag/img_0018.png", "bag/img_0020.jpg", "coat/a.png", "coat/a.jpg", "coat/b.jpeg", "shirt/z.png"]
    for name, img in zip(names, images):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(src / name, quality=95)
    out = tmp_path / "png_out"
    rc, _ = run(capsys, "purify", src, "-o", str(out) + "/", "--method", "jpeg", "--no-progress")
    assert rc == 0
    got = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    # A PNG keeps its name; a JPEG becomes a PNG of the same stem (its own name + .png where taken).
    assert got == ["bag/img_0018.png", "bag/img_0020.png", "coat/a.jpg.png", "coat/a.png", "coat/b.png",
                   "shirt/z.png"]
    manifest = json.loads((tmp_path / "png_out.manifest.json").read_text())
    assert manifest["sources"] == sorted(names, key=lambda n: (n.split("/")[0], n.split("/")[1]))
    again = read_dataset(out)
    assert again.class_names == ("bag", "coat", "shirt")


def test_npz_labels_keep_their_dtype(tmp_path, data, capsys):
    rc, _ = run(capsys, "purify", data, "-o", tmp_path / "o.npz", "--method", "jpeg", "--no-progress")
    assert rc == 0
    with np.load(tmp_path / "o.npz") as z:
        assert z["y"].dtype == np.uint8 and np.array_equal(z["y"], np.arange(24) % 5)
        assert z["x"].shape == (24, 28, 28, 1)  # a (N, H, W) input comes back NHWC, as the data contract says


def test_idx_and_cifar_folders_read_the_split_asked_for_and_say_which_files(tmp_path, capsys):
    from puregen.data.idx import write_idx_dataset

    idx_dir = tmp_path / "fm"
    idx_dir.mkdir()
    write_idx_dataset(idx_dir / "train-images-idx3-ubyte", smooth_images(8, seed=1), np.arange(8) % 3)
    write_idx_dataset(idx_dir / "t10k-images-idx3-ubyte", smooth_images(5, seed=2), np.arange(5) % 3)
    cifar_dir = tmp_path / "cifar-10-batches-py"
    cifar_dir.mkdir()
    for name, n in (("data_batch_1", 4), ("test_batch", 3)):
        batch = {b"data": smooth_images(n, 32, 32, 3, seed=n).transpose(0, 3, 1, 2).reshape(n, -1),
                 b"labels": list(range(n))}
        (cifar_dir / name).write_bytes(pickle.dumps(batch, protocol=2))
    for folder, split, n, files in ((idx_dir, "test", 5, "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"),
                                    (idx_dir, None, 8, "train-images-idx3-ubyte, train-labels-idx1-ubyte"),
                                    (cifar_dir, "test", 3, "test_batch"),
                                    (cifar_dir, "train", 4, "data_batch_1")):
        out = tmp_path / f"o-{folder.name}-{split}.npz"
        rc = main(["purify", str(folder), "-o", str(out), "--method", "jpeg"]
                  + (["--split", split] if split else []))
        err = capsys.readouterr().err
        assert rc == 0 and f"read {n} labelled" in err and files in err
        assert len(read_dataset(out)) == n
        assert [os.path.basename(f) for f in json.loads(out.with_name(out.name + ".manifest.json").read_text())
                ["input_files"]] == files.split(", ")


# -- results that move: the progress bar --------------------------------------------------------------


def test_step_progress_sums_to_the_batch_exactly():
    for n, steps in ((64, 150), (37, 60), (1, 225), (100, 75)):
        got = []
        p = _StepProgress(got.append, n, steps)
        for _ in range(steps):
            p(1)
        assert sum(got) == n and all(isinstance(g, int) and g > 0 for g in got)
        # Summing n / steps per step, as before, overshoots n by float rounding (tqdm clamps and warns).
        assert sum([n / steps] * steps) != n or n == 1


def test_an_ebm_run_ends_its_progress_bar_at_100_percent(tmp_path, data, tiny_checkpoints, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm's "clamping frac to range [0, 1]" is a warning
        rc = main(["purify", str(data), "-o", str(tmp_path / "o.npz"), "--method", "ebm", "--ebm",
                   str(tiny_checkpoints[0]), "--preset", "tiny", "--steps", "150", "--batch-size", "24"])
    err = capsys.readouterr().err
    assert rc == 0 and "24/24" in err and "<-" not in err


# -- a resume that mixes jobs -------------------------------------------------------------------------


def _interrupted(tmp_path, data, *extra):
    """A CLI job on `data` killed after its first chunk (of 8 rows); returns its output path."""
    out = tmp_path / "o.npz"

    def stop(_k):
        raise KeyboardInterrupt

    real = pipeline.run_job

    def run_job(*a, **k):
        return real(*a, **{**k, "on_chunk": stop})

    pipeline_run = pytest.MonkeyPatch()
    import puregen.api as api

    pipeline_run.setattr(api, "run_job", run_job)
    try:
        assert main(["purify", str(data), "-o", str(out), "--chunk-size", "8", "--no-progress", *extra]) == 130
    finally:
        pipeline_run.undo()
    return out


def test_a_resume_with_an_edited_checkpoint_config_is_refused(tmp_path, data, tiny_checkpoints, capsys):
    ddpm = tmp_path / "ddpm"
    shutil.copytree(tiny_checkpoints[1], ddpm)
    args = ["--method", "ddpm", "--ddpm", str(ddpm), "--preset", "tiny", "--t-star", "2"]
    out = _interrupted(tmp_path, data, *args)
    cfg = json.loads((ddpm / "config.json").read_text())
    cfg["config"]["norm_eps"] = 1e-3  # same weights, another architecture
    (ddpm / "config.json").write_text(json.dumps(cfg))
    rc, err = run(capsys, "purify", data, "-o", out, "--chunk-size", "8", "--no-progress", "--resume", *args)
    assert rc == 2 and "different configuration" in err and not out.exists()


def test_a_work_folder_without_its_manifest_is_not_adopted(tmp_path, data, capsys):
    out = _interrupted(tmp_path, data, "--method", "jpeg")
    (tmp_path / "o.npz.parts" / "manifest.json").unlink()
    rc, err = run(capsys, "purify", data, "-o", out, "--method", "jpeg", "--chunk-size", "8", "--resume")
    assert rc == 2 and "no job manifest" in err and not out.exists()


def test_a_replaced_chunk_is_found(tmp_path, data, capsys):
    out = _interrupted(tmp_path, data, "--method", "jpeg")
    chunk = tmp_path / "o.npz.parts" / "chunk-00000.npz"
    np.savez(chunk, x=smooth_images(8, seed=9), index=np.arange(8))  # another valid .npz
    rc, err = run(capsys, "purify", data, "-o", out, "--method", "jpeg", "--chunk-size", "8", "--resume")
    assert rc == 2 and f"{chunk}: changed since this job wrote it" in err and not out.exists()
    # Not recorded in the manifest (a kill between its rename and the manifest's update): still checked.
    manifest = tmp_path / "o.npz.parts" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["chunk_sha256"] = {}
    manifest.write_text(json.dumps(m))
    rc, err = run(capsys, "purify", data, "-o", out, "--method", "jpeg", "--chunk-size", "8", "--resume")
    assert rc == 2 and f"{chunk}: it is not a puregen chunk" in err


def test_a_corrupt_chunk_at_merge_is_named(tmp_path, data, capsys):
    out = _interrupted(tmp_path, data, "--method", "jpeg")
    chunk = tmp_path / "o.npz.parts" / "chunk-00000.npz"
    chunk.write_bytes(chunk.read_bytes()[:100])
    rc, err = run(capsys, "purify", data, "-o", out, "--method", "jpeg", "--chunk-size", "8", "--resume")
    assert rc == 2 and str(chunk) in err and not out.exists()


def test_resume_on_a_finished_job_checks_its_output(tmp_path, data, capsys):
    out = tmp_path / "o.npz"
    args = ["purify", data, "-o", out, "--method", "jpeg", "--no-progress"]
    assert run(capsys, *args)[0] == 0
    before = out.read_bytes()
    assert run(capsys, *args, "--resume")[0] == 0 and out.read_bytes() == before
    np.savez(out, x=smooth_images(24, seed=8), y=np.zeros(24, np.uint8))
    rc, err = run(capsys, *args, "--resume")
    assert rc == 2 and "does not match its manifest" in err


def test_a_kill_during_the_merge_resumes_to_the_same_bytes(tmp_path, data, capsys, monkeypatch):
    ref = tmp_path / "ref.npz"
    assert run(capsys, "purify", data, "-o", ref, "--method", "jpeg", "--chunk-size", "8")[0] == 0
    out = tmp_path / "o.npz"
    real = pipeline.write_json_atomic

    def killed_after_the_output(path, manifest):
        if path.name == "o.npz.manifest.json":
            raise KeyboardInterrupt  # the output is in place, its manifest not yet
        return real(path, manifest)

    monkeypatch.setattr(pipeline, "write_json_atomic", killed_after_the_output)
    assert main(["purify", str(data), "-o", str(out), "--method", "jpeg", "--chunk-size", "8"]) == 130
    monkeypatch.undo()
    assert out.exists() and not (tmp_path / "o.npz.manifest.json").exists()
    orphan = tmp_path / ".o.npz.x1y2z3.tmp"  # what a kill inside an atomic write leaves
    orphan.write_bytes(b"half")
    rc, _ = run(capsys, "purify", data, "-o", out, "--method", "jpeg", "--chunk-size", "8", "--resume")
    assert rc == 0 and out.read_bytes() == ref.read_bytes()
    assert (tmp_path / "o.npz.manifest.json").exists() and not orphan.exists()
    assert not (tmp_path / "o.npz.parts").exists()


# -- nothing outside the output's own files -----------------------------------------------------------


def test_overwrite_onto_a_folder_that_contains_the_input_keeps_the_input(tmp_path, capsys):
    d = tmp_path / "d"
    src = d / "bag"  # d looks like an image folder, so --overwrite would have replaced it, input and all
    src.mkdir(parents=True)
    for i, img in enumerate(smooth_images(3, seed=5)):
        Image.fromarray(img[:, :, 0]).save(src / f"{i}.png")
    before = sorted(p.read_bytes() for p in src.iterdir())
    rc, err = run(capsys, "purify", src, "-o", d, "--method", "jpeg", "--overwrite")
    assert rc == 2 and "contains the input" in err
    assert sorted(p.read_bytes() for p in src.iterdir()) == before


def test_an_idx_output_does_not_replace_a_labels_file_it_was_not_asked_to(tmp_path, data, capsys):
    labels = tmp_path / "o-labels-idx1-ubyte"
    labels.write_bytes(b"someone else's labels")
    rc, err = run(capsys, "purify", data, "-o", tmp_path / "o-images-idx3-ubyte", "--method", "jpeg")
    assert rc == 2 and f"{labels}: already exists" in err and labels.read_bytes() == b"someone else's labels"
    # Nor when that labels file is the input's (found beside a gzipped images file).
    import gzip

    write_dataset(tmp_path / "in-images-idx3-ubyte", smooth_images(4, seed=1), np.arange(4))
    images = tmp_path / "in-images-idx3-ubyte"
    (tmp_path / "in-images-idx3-ubyte.gz").write_bytes(gzip.compress(images.read_bytes()))
    images.unlink()
    rc, err = run(capsys, "purify", tmp_path / "in-images-idx3-ubyte.gz", "-o", images, "--method", "jpeg",
                  "--overwrite")
    assert rc == 2 and "is the input" in err and "in-labels-idx1-ubyte" in err
