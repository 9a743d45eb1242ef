"""The `puregen` command: exit codes (0 ok, 2 bad input/usage, 1 internal) and clear messages."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from puregen.api import load_purifier
from puregen.data import read_dataset, write_dataset
from puregen.errors import CheckpointError, InputError

from .conftest import FASHION_MNIST, REPO, smooth_images


def cli(*args):
    return subprocess.run([sys.executable, "-m", "puregen.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def assert_input_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for f in fragments:
        assert f in result.stderr, (f, result.stderr)


@pytest.fixture
def good_npz(tmp_path):
    path = tmp_path / "good.npz"
    write_dataset(path, smooth_images(6), np.arange(6))
    return path


def test_help_and_info():
    r = cli("--help")
    assert r.returncode == 0 and "purify" in r.stdout
    r = cli("purify", "--help")
    assert r.returncode == 0 and "--energy-threshold" in r.stdout
    r = cli("info", "--json")
    assert r.returncode == 0
    info = json.loads(r.stdout)
    assert info["versions"]["torch"] == torch.__version__ and "flags" in info["cpu"]


def test_jpeg_on_real_fashion_mnist(tmp_path):
    images = FASHION_MNIST / "t10k-images-idx3-ubyte.gz"
    if not images.exists():
        pytest.skip(f"Fashion-MNIST not found at {FASHION_MNIST} (set PUREGEN_FASHION_MNIST)")
    out = tmp_path / "fm.npz"
    r = cli("purify", images, "-o", out, "--method", "jpeg", "--limit", 300, "--no-progress")
    assert r.returncode == 0, r.stderr
    ds = read_dataset(out)
    src = read_dataset(images)
    assert ds.images.shape == (300, 28, 28, 1) and np.array_equal(ds.labels, src.labels[:300])
    diff = np.abs(ds.images.astype(int) - src.images[:300].astype(int))
    assert 0 < diff.mean() < 20  # JPEG q75 changes pixels, but only a little


def test_bad_inputs_exit_2_naming_the_file(tmp_path, good_npz):
    out = tmp_path / "o.npz"
    wrong_shape = tmp_path / "shape.npz"
    np.savez(wrong_shape, x=np.zeros((4, 8, 8, 5), np.uint8) + 3)
    assert_input_error(cli("purify", wrong_shape, "-o", out, "--method", "jpeg"), "shape.npz")

    floats = tmp_path / "float.npz"
    np.savez(floats, x=np.random.rand(4, 8, 8, 1).astype(np.float32))
    assert_input_error(cli("purify", floats, "-o", out, "--method", "jpeg"), "float.npz", "uint8")

    truncated = tmp_path / "trunc.npz"
    data = good_npz.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert_input_error(cli("purify", truncated, "-o", out, "--method", "jpeg"), "trunc.npz")

    negative = tmp_path / "labels.npz"
    np.savez(negative, x=smooth_images(3), y=np.array([0, -4, 1]))
    assert_input_error(cli("purify", negative, "-o", out, "--method", "jpeg"), "labels.npz")

    folder = tmp_path / "folder"
    write_dataset(str(folder) + "/", smooth_images(4), np.array([0, 0, 1, 1]))
    victim = sorted((folder).rglob("*.png"))[1]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert_input_error(cli("purify", folder, "-o", out, "--method", "jpeg"), victim.name)

    idx = tmp_path / "t-images-idx3-ubyte.gz"
    with gzip.open(idx, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (100).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x01" * 500)
    assert_input_error(cli("purify", idx, "-o", out, "--method", "jpeg"), "t-images-idx3-ubyte.gz")

    assert_input_error(cli("purify", tmp_path / "missing.npz", "-o", out, "--method", "jpeg"), "missing.npz")
    assert not out.exists()


def test_bad_usage_exit_2(good_npz, tmp_path):
    r = cli("purify", good_npz, "-o", tmp_path / "o.npz", "--method", "nonsense")
    assert_input_error(r, "nonsense")
    r = cli("purify", good_npz, "-o", tmp_path / "o.npz", "--method", "ebm", "--backend", "tensorrt",
            "--ebm", tmp_path)
    assert_input_error(r, "tensorrt needs --device cuda")


def test_paper_preset_without_checkpoints_says_where_to_get_them(tmp_path):
    cifar_like = tmp_path / "rgb.npz"  # no shipped default fits 32x32x3
    write_dataset(cifar_like, smooth_images(4, 32, 32, 3), np.arange(4))
    for method, flag in (("ebm", "--ebm"), ("ddpm", "--ddpm"), ("naive", "--ebm")):
        r = cli("purify", cifar_like, "-o", tmp_path / "o.npz", "--method", method, "--preset", "paper")
        assert_input_error(r, flag, "checkpoint", "puregen train")


def test_existing_output_not_overwritten(good_npz, tmp_path):
    out = tmp_path / "keep.npz"
    out.write_bytes(b"old")
    assert_input_error(cli("purify", good_npz, "-o", out, "--method", "jpeg"), "already exists")
    assert out.read_bytes() == b"old"


def test_checkpoint_init_and_purify_roundtrip(tmp_path, good_npz):
    r = cli("checkpoint", "init", "ebm", "--preset", "tiny", "-o", tmp_path / "ebm")
    assert r.returncode == 0, r.stderr
    r = cli("purify", good_npz, "-o", tmp_path / "o.npz", "--method", "ebm", "--preset", "tiny", "--ebm",
            tmp_path / "ebm", "--steps", 2, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert read_dataset(tmp_path / "o.npz").images.shape == (6, 28, 28, 1)
    # a checkpoint for the wrong role
    r = cli("purify", good_npz, "-o", tmp_path / "p.npz", "--method", "ddpm", "--preset", "tiny", "--ddpm",
            tmp_path / "ebm")
    assert_input_error(r, "ebm", "ddpm")


def test_api_rejects_bad_float_input(tiny_models):
    p = load_purifier("ebm", ebm=tiny_models[0], preset="tiny", steps=1)
    x = np.random.default_rng(0).random((2, 28, 28, 1)).astype(np.float32)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        p.purify(bad)
    with pytest.raises(InputError):
        p.purify(x * 2)  # outside [0, 1]
    out = p.purify(torch.from_numpy(x))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, torch.from_numpy(p.purify((x * 255).round().astype(np.uint8))).float() / 255)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path, tiny_models):
    from puregen.models.checkpoints import load_model, save_model
    from puregen.models.ebm import EBM, EBMConfig

    folder = save_model(tiny_models[0], tmp_path / "ebm")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["config"]["nf"] = 32
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(folder)
    save_model(tiny_models[0], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nowhere")
    # the published hub layout: config.json of its own + model.safetensors with the EBM's keys
    hub = tmp_path / "hub"
    hub.mkdir()
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = EBM(EBMConfig(in_channels=3, nf=8))
    save_file(ref.state_dict(), str(hub / "model.safetensors"))
    (hub / "config.json").write_text(json.dumps({"architectures": ["EBM"], "nf": 8}))
    loaded = load_model(hub, expect="ebm")
    assert loaded.layout == "hub-ebm" and loaded.model.config == EBMConfig(3, 8)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.model(x), ref(x))


def test_images_that_do_not_fit_the_checkpoint(tmp_path, tiny_checkpoints):
    rgb = tmp_path / "rgb.npz"
    write_dataset(rgb, smooth_images(3, c=3), None)
    r = cli("purify", rgb, "-o", tmp_path / "o.npz", "--method", "ebm", "--preset", "tiny", "--ebm",
            tiny_checkpoints[0])
    assert_input_error(r, "rgb.npz", "3 channel", "expects 1")


def test_shipped_defaults_are_used_only_for_their_shape(tmp_path, tiny_checkpoints, monkeypatch):
    import puregen.models.defaults as defaults
    import shutil

    assets = tmp_path / "assets"
    shutil.copytree(tiny_checkpoints[0], assets / "fashion-mnist-ebm")
    monkeypatch.setattr(defaults, "ASSETS", assets)
    p = load_purifier("ebm", preset="tiny", steps=1, threads=2)  # no checkpoint: the shipped default
    assert p.provenance["defaults"] == ["ebm"]
    assert p.purify(smooth_images(2), seed=0).shape == (2, 28, 28, 1)
    with pytest.raises(InputError, match="28x28x1"):
        p.purify(smooth_images(2, h=32, w=32))
    with pytest.raises(InputError, match="--ddpm"):  # no DDPM default in this fake asset folder
        load_purifier("ddpm", preset="tiny")


def test_the_shipped_defaults_load_and_purify_fashion_mnist_shaped_images(tmp_path):
    from puregen.models.defaults import default_checkpoint

    assert default_checkpoint("ebm") is not None and default_checkpoint("unet") is not None
    src = tmp_path / "fm.npz"
    write_dataset(src, smooth_images(4), np.arange(4))
    r = cli("purify", src, "-o", tmp_path / "o.npz", "--method", "naive", "--steps", 2, "--t-star", 2,
            "--no-progress")  # no --ebm/--ddpm: the shipped models
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "o.npz.manifest.json").read_text())
    assert set(manifest["config"]["checkpoints"]) == {"ebm", "unet"}


def test_purify_with_a_langevin_temperature_and_a_bad_one(good_npz, tmp_path):
    out = tmp_path / "o.npz"
    r = cli("purify", good_npz, "-o", out, "--method", "ebm", "--steps", 2, "--temp", "0", "--no-progress")
    assert_input_error(r, "--temp must be a positive number")
    assert not out.exists()
    r = cli("purify", good_npz, "-o", out, "--method", "ebm", "--steps", 2, "--temp", "5e-5", "--no-progress")
    assert r.returncode == 0, r.stderr
    manifest = json.loads(out.with_name("o.npz.manifest.json").read_text())
    assert manifest["config"]["method"]["temp"] == 5e-5


def test_train_ebm_with_a_weight_average_and_its_options(good_npz, tmp_path):
    r = cli("train", "ebm", good_npz, "-o", tmp_path / "ebm", "--preset", "tiny", "--steps", 2, "--batch-size", 4,
            "--ema-decay", 0.5, "--keep-every", 1, "--no-progress", "--threads", 1)
    assert r.returncode == 0, r.stderr
    kept = sorted(p.name for p in (tmp_path / "ebm.snapshots").iterdir())
    assert kept == ["step-000001", "step-000001-raw", "step-000002", "step-000002-raw"]
    saved = json.loads((tmp_path / "ebm" / "training_state.json").read_text())
    assert saved["step"] == 2 and saved["recipe"]["ema_decay"] == 0.5
    assert load_purifier("ebm", ebm=tmp_path / "ebm", preset="tiny", steps=1)
    r = cli("train", "ddpm", good_npz, "-o", tmp_path / "ddpm", "--preset", "tiny", "--ema-decay", 0.9)
    assert_input_error(r, "--ema-decay", "ddpm")
    r = cli("train", "ddpm", good_npz, "-o", tmp_path / "ddpm", "--preset", "tiny", "--keep-every", 1)
    assert_input_error(r, "--keep-every", "ddpm")
    r = cli("train", "ddpm", good_npz, "-o", tmp_path / "ddpm", "--preset", "tiny", "--checkpoint-every", 0)
    assert_input_error(r, "--checkpoint-every", "positive")  # was a ZeroDivisionError after the first step
    assert not (tmp_path / "ddpm").exists()
