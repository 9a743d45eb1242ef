"""D-VAE (`--method dvae`, `puregen train dvae`): each test checks one defining property on a tiny problem."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from puregen.api import load_purifier, purify_dataset
from puregen.cli import main
from puregen.data import write_dataset
from puregen.engine.noise_key import NoiseKey
from puregen.errors import CheckpointError, InputError
from puregen.models.checkpoints import load_model
from puregen.models.dvae import DVAE, DVAEConfig
from puregen.models.dvae_purify import _forward
from puregen.training import dvae as dvae_training
from puregen.training.dvae import DVAERecipe, kl_divergence, kl_hinge, load_dvae_run, train_dvae, train_stage
from puregen.training.loop import TrainingData, load_training_data

from .conftest import smooth_images

SIDE, CLASSES = 16, 4


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convolutions on 2 threads of a busy 2-core machine spin far slower than on one.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _recipe(**changes) -> DVAERecipe:
    return dataclasses.replace(DVAERecipe.preset("tiny"), **changes)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("dvae") / "train.npz"
    write_dataset(path, smooth_images(40, SIDE, SIDE, seed=5), np.arange(40) % CLASSES)
    return path


@pytest.fixture(scope="module")
def fitted(data_path, tmp_path_factory):
    """A finished tiny run (`puregen train dvae`)."""
    run = tmp_path_factory.mktemp("dvae-run") / "run"
    torch.set_num_threads(1)
    train_dvae(load_training_data(data_path), run, _recipe(), progress=False)
    return run


def _weights(run):
    return {f"{stage}.{k}": v for stage in ("stage1", "stage2")
            for k, v in load_model(run / stage, expect="dvae").model.state_dict().items()}


# -- the network ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels, side, latent_side", [(1, 28, 14), (3, 32, 16)])
def test_model_shapes_follow_the_input(channels, side, latent_side):
    config = DVAEConfig(in_channels=channels, image_height=side, image_width=side, num_classes=10, width=8,
                        latent_channels=12)
    model = DVAE(config)
    x = torch.rand(2, channels, side, side)
    out = model(x, torch.tensor([0, 9]), torch.randn(2, *model.latent_shape()))
    assert out.x_hat.shape == out.p_hat.shape == x.shape
    assert out.mu.shape == out.logvar.shape == (2, 12, latent_side, latent_side)
    assert model.class_embedding.shape == (10, 16, latent_side, latent_side)  # one 2w x h x w map per class
    out = dataclasses.replace(out, x_hat=out.x_hat.detach(), p_hat=out.p_hat.detach())
    assert 0 <= float(out.x_hat.min()) and float(out.x_hat.max()) <= 1  # the image decoder ends in a sigmoid
    assert float(out.p_hat.min()) < 0  # the perturbation decoder has no sigmoid: signed
    published = DVAE(dataclasses.replace(config, width=64, latent_channels=256))
    assert published.mu_head.out_channels == 256 and published.post_conv.out_channels == 128
    with pytest.raises(ValueError, match="even image sides"):
        DVAEConfig(in_channels=1, image_height=15, image_width=16)


# -- the loss ------------------------------------------------------------------------------------------------


def test_kl_hinge_has_no_gradient_below_tau_and_the_kl_gradient_above():
    for scale, tau, below in ((0.1, 1.0, True), (3.0, 1.0, False)):
        mu = torch.full((2, 8, 3, 3), scale, requires_grad=True)
        logvar = torch.zeros(2, 8, 3, 3, requires_grad=True)
        kl = kl_divergence(mu, logvar)  # 0.5 * 8 * scale^2 per position: 0.04 or 36 nats
        assert (float(kl.detach()) < tau) == below
        (grad_hinge,) = torch.autograd.grad(kl_hinge(kl, tau), mu)
        if below:
            assert float(kl_hinge(kl, tau).detach()) == tau
            assert torch.count_nonzero(grad_hinge) == 0
        else:
            (grad_kl,) = torch.autograd.grad(kl_divergence(mu, logvar), mu)
            assert torch.equal(grad_hinge, grad_kl) and torch.count_nonzero(grad_kl) == grad_kl.numel()


# -- what it learns ------------------------------------------------------------------------------------------


def test_perturbation_decoder_learns_a_planted_class_wise_pattern(tmp_path):
    """Smooth random 16x16 images plus a fixed +-0.1 pattern per class (4 classes, 256 images): stage 1's
    p_hat correlates with the planted pattern and x - p_hat removes most of it. Measured (1 thread, seed 0):
    correlation 0.90, residual 0.45 of the planted pattern's norm."""
    n, amplitude = 256, 0.1
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.random((n, 1, 4, 4)).astype(np.float32))
    clean = torch.nn.functional.interpolate(coarse, size=(SIDE, SIDE), mode="bilinear", align_corners=True)
    clean = clean * 0.6 + 0.2
    pattern = torch.from_numpy(rng.choice([-amplitude, amplitude], size=(CLASSES, 1, SIDE, SIDE)).astype(np.float32))
    labels = torch.arange(n) % CLASSES
    poisoned = (clean + pattern[labels]).clamp(0, 1)
    data = TrainingData(poisoned * 2 - 1, labels, "toy", "toy")
    # The floor keeps p_hat's mean square from falling below it; raised with the pattern's amplitude (published:
    # 0.002 for 8/255 perturbations) so that, as there, it is a floor the pattern sits under and not a shrinkage.
    recipe = _recipe(epochs=35, batch_size=16, perturbation_floor=0.015)
    train_stage(data, CLASSES, tmp_path / "stage1", recipe, stage=1, tau=1.0, progress=False, checkpoint_every=10**6)
    model = load_model(tmp_path / "stage1", expect="dvae").model
    _, p_hat = _forward(model, poisoned, labels, NoiseKey.rows(0, 0, n), 0, "fp32")
    planted = poisoned - clean
    correlation = np.corrcoef(p_hat.flatten().numpy(), planted.flatten().numpy())[0, 1]
    residual = float(((poisoned - p_hat).clamp(0, 1) - clean).norm() / planted.norm())
    assert correlation > 0.5, correlation
    assert residual < 0.7, residual


# -- fitting resumes exactly ---------------------------------------------------------------------------------


@pytest.mark.parametrize("first_call_steps", [3, 6])  # stopped in stage 1, then in stage 2 (4 steps a stage)
def test_fit_resumed_after_a_stop_equals_an_unbroken_fit(data_path, tmp_path, first_call_steps):
    data = load_training_data(data_path)
    recipe = _recipe()
    whole = train_dvae(data, tmp_path / "whole", recipe, progress=False, checkpoint_every=2)
    part = train_dvae(data, tmp_path / "split", recipe, progress=False, checkpoint_every=2,
                      max_steps_this_call=first_call_steps)
    assert whole["complete"] and not part["complete"] and part["step"] == first_call_steps
    with pytest.raises(CheckpointError, match="not a finished D-VAE run"):
        load_dvae_run(tmp_path / "split")
    with pytest.raises(InputError, match="--resume"):
        train_dvae(data, tmp_path / "split", recipe, progress=False)
    done = train_dvae(data, tmp_path / "split", recipe, progress=False, checkpoint_every=2, resume=True)
    assert done["complete"] and done["step"] == whole["step"] == 2 * recipe.steps_per_stage(len(data))
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "dvae.json").read_bytes() == (tmp_path / "split" / "dvae.json").read_bytes()


def test_a_job_killed_while_fitting_resumes_to_the_same_bytes(data_path, tmp_path, monkeypatch):
    kw = dict(method="dvae", preset="tiny", seed=3, batch_size=16, progress=False, threads=1)
    purify_dataset(data_path, tmp_path / "whole.npz", **kw)
    real = dvae_training.train_stage

    def killed_in_stage_2(*args, stage, **kwargs):
        if stage == 2:  # stage 1 done, two steps of stage 2 checkpointed, then the job dies
            real(*args, stage=stage, **{**kwargs, "checkpoint_every": 1, "max_steps_this_call": 2})
            raise KeyboardInterrupt
        return real(*args, stage=stage, **kwargs)

    monkeypatch.setattr(dvae_training, "train_stage", killed_in_stage_2)
    with pytest.raises(KeyboardInterrupt):
        purify_dataset(data_path, tmp_path / "split.npz", **kw)
    with pytest.raises(InputError, match="--resume"):  # the work folder, fit/ included, is a job's
        purify_dataset(data_path, tmp_path / "split.npz", **kw)
    with pytest.raises(KeyboardInterrupt):  # and --overwrite may clear it
        purify_dataset(data_path, tmp_path / "split.npz", overwrite=True, **kw)
    monkeypatch.undo()
    fit = tmp_path / "split.npz.parts" / "fit"
    assert json.loads((fit / "stage2" / "training_state.json").read_text())["step"] == 2
    assert not (tmp_path / "split.npz").exists()
    manifest = purify_dataset(data_path, tmp_path / "split.npz", resume=True, **kw)
    assert (tmp_path / "split.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()
    state = manifest["dataset_state"]  # the fitted networks, recorded by their digests
    assert set(state) >= {"config", "recipe", "stage1_weights_sha256", "stage2_weights_sha256"}
    whole = json.loads((tmp_path / "whole.npz.manifest.json").read_text())["dataset_state"]
    assert state == whole


# -- the application -----------------------------------------------------------------------------------------


def test_application_is_byte_identical_across_batch_sizes(fitted, data_path):
    images = smooth_images(21, SIDE, SIDE, seed=9)
    labels = np.arange(21) % CLASSES
    purifier = load_purifier("dvae", dvae=str(fitted), threads=1)
    outs = [purifier.purify(images, labels=labels, seed=1, batch_size=b) for b in (1, 5, 21)]
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    assert not np.array_equal(outs[0], images)
    other_seed = purifier.purify(images, labels=labels, seed=2)
    assert not np.array_equal(outs[0], other_seed)  # the latent samples come from the noise key
    bf16 = load_purifier("dvae", dvae=str(fitted), threads=1, precision="bf16").purify(images, labels=labels, seed=1)
    assert np.abs(bf16.astype(int) - outs[0].astype(int)).mean() < 8  # the same purification, at bf16


def test_the_compiled_backend_matches_the_eager_oracle(fitted):
    images = smooth_images(9, SIDE, SIDE, seed=4)
    labels = np.arange(9) % CLASSES
    eager = load_purifier("dvae", dvae=str(fitted), threads=1).purify(images, labels=labels, seed=3)
    compiled = load_purifier("dvae", dvae=str(fitted), threads=1, backend="compiled")
    out = compiled.purify(images, labels=labels, seed=3, batch_size=4)
    diff = np.abs(out.astype(int) - eager.astype(int))
    # fp32 both ways: a compiled graph may fuse and reorder float ops, which can flip a rounding to uint8.
    assert diff.max() <= 1 and diff.mean() < 0.02
    assert np.array_equal(out, compiled.purify(images, labels=labels, seed=3, batch_size=9))  # batch-invariant
    with pytest.raises(InputError, match="choose --backend torch or compiled"):
        load_purifier("dvae", dvae=str(fitted), backend="onnxruntime")


def test_a_jobs_fit_equals_puregen_train_dvae(data_path, tmp_path):
    """`puregen train dvae --seed S` fits what a job with --seed S fits: --dvae RUN gives the job's bytes."""
    kw = dict(method="dvae", progress=False, threads=1, seed=7)
    run = tmp_path / "run"
    assert main(["train", "dvae", str(data_path), "-o", str(run), "--preset", "tiny", "--seed", "7", "--threads", "1",
                 "--no-progress"]) == 0
    purify_dataset(data_path, tmp_path / "fit.npz", preset="tiny", **kw)
    purify_dataset(data_path, tmp_path / "given.npz", dvae=str(run), **kw)
    assert np.array_equal(np.load(tmp_path / "fit.npz")["x"], np.load(tmp_path / "given.npz")["x"])


# -- refusals ------------------------------------------------------------------------------------------------


def test_purify_without_labels_exits_2_and_writes_nothing(tmp_path, capsys):
    write_dataset(tmp_path / "nolabels.npz", smooth_images(8, SIDE, SIDE), None)
    before = set(tmp_path.iterdir())
    code = main(["purify", str(tmp_path / "nolabels.npz"), "-o", str(tmp_path / "out.npz"), "--method", "dvae",
                 "--preset", "tiny", "--no-progress", "--threads", "1"])
    assert code == 2
    assert "needs labelled data" in capsys.readouterr().err
    assert set(tmp_path.iterdir()) == before


def test_a_corrupt_or_mismatched_dvae_folder_is_a_clear_error(fitted, tmp_path, capsys):
    import shutil

    data = tmp_path / "d.npz"
    write_dataset(data, smooth_images(8, SIDE, SIDE), np.arange(8) % CLASSES)

    def purify(run, source=data):
        code = main(["purify", str(source), "-o", str(tmp_path / "out.npz"), "--method", "dvae", "--dvae", str(run),
                     "--no-progress", "--threads", "1"])
        return code, capsys.readouterr().err

    unfinished = tmp_path / "unfinished"
    shutil.copytree(fitted, unfinished)
    (unfinished / "dvae.json").unlink()
    code, err = purify(unfinished)
    assert code == 2 and "not a finished D-VAE run" in err
    corrupt = tmp_path / "corrupt"
    shutil.copytree(fitted, corrupt)
    (corrupt / "stage2" / "model.safetensors").write_bytes(b"not safetensors")
    code, err = purify(corrupt)
    assert code == 2 and "stage2" in err
    assert purify(tmp_path / "missing")[0] == 2
    bigger = tmp_path / "28.npz"
    write_dataset(bigger, smooth_images(8), np.arange(8) % CLASSES)
    code, err = purify(fitted, bigger)
    assert code == 2 and "fitted on 16x16x1 images" in err
    many = tmp_path / "classes.npz"
    write_dataset(many, smooth_images(8, SIDE, SIDE), np.arange(8))
    code, err = purify(fitted, many)
    assert code == 2 and "labels must be in [0, 4)" in err
    assert not (tmp_path / "out.npz").exists()


def test_puregen_train_dvae_writes_a_run_that_dvae_accepts(data_path, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "dvae", str(data_path), "-o", str(run), "--preset", "tiny", "--threads", "1", "--no-progress"]
    assert main(args) == 0
    assert "trained dvae" in capsys.readouterr().out
    stage1, stage2, description = load_dvae_run(run)
    assert stage1.config == stage2.config and description["stages"]["stage2"]["tau"] == 3.0
    assert main([*args, "--steps", "3"]) == 2  # epochs, not steps, size a D-VAE fit
    assert "--steps does not apply to dvae training" in capsys.readouterr().err


def test_bench_times_dvae_against_its_fp32_reference(tmp_path, capsys):
    from puregen.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--method", "dvae", "--preset", "small", "--backend", "torch", "--precision", "bf16",
               "--batch", "4", "--repeats", "1", "--threads", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "images/s" in text and "of the ceiling" in text and "fp32 eager reference" in text
    summary = json.loads(out.read_text())
    assert summary["method"] == "dvae" and summary["image_shape"] == [28, 28, 1]
    assert set(summary["modes"]) == {"reference", "fast"} and summary["modes"]["fast"]["precision"] == "bf16"
    for mode in summary["modes"].values():
        assert mode["images_per_second"] > 0 and mode["achieved_flop_per_second"] > 0
    assert summary["ceiling_flop_per_second"] > 0 and summary["ratio_to_reference"] > 0
    # Refusals: options that do not apply, and a preset that has no D-VAE.
    assert main(["bench", "--method", "dvae", "--micro-batch", "8"]) == 2
    assert "--micro-batch does not apply" in capsys.readouterr().err
    assert main(["bench", "--method", "dvae", "--preset", "shipped"]) == 2
    assert "no D-VAE is shipped" in capsys.readouterr().err
    assert main(["bench", "--method", "dvae", "--backend", "onnxruntime"]) == 2
    assert "choose torch or compiled" in capsys.readouterr().err
