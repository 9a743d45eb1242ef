"""Training loops: exact resumption, recipe checks, checkpoints that load for purification."""

import dataclasses
import re

import numpy as np
import pytest
import torch

from puregen.data import write_dataset
from puregen.errors import CheckpointError, InputError
from puregen.models.checkpoints import load_model
from puregen.training.classifier import (
    ClassifierRecipe,
    accuracy,
    augment,
    train_classifier,
    train_classifier_run,
)
from puregen.training.ddpm import DDPMRecipe, train_ddpm
from puregen.training.ebm import EBMRecipe, train_ebm
from puregen.training.loop import load_training_data

from .conftest import smooth_images


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "train.npz"
    write_dataset(path, smooth_images(48, seed=7), np.arange(48) % 4)
    return path


@pytest.fixture(scope="module")
def data(data_path):
    return load_training_data(data_path)


def _weights(folder):
    return load_model(folder).model.state_dict()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["ebm", "ddpm"])
def test_resumed_run_equals_unbroken_run(kind, precision, data, tmp_path):
    recipe = EBMRecipe.preset("tiny") if kind == "ebm" else DDPMRecipe.preset("tiny")
    recipe = dataclasses.replace(recipe, steps=6, precision=precision)
    train = train_ebm if kind == "ebm" else train_ddpm
    train(data, tmp_path / "whole", recipe, progress=False, checkpoint_every=2)
    train(data, tmp_path / "split", recipe, progress=False, checkpoint_every=2, max_steps_this_call=3)
    info = train(data, tmp_path / "split", recipe, progress=False, checkpoint_every=2, resume=True)
    assert info["step"] == 6
    whole, split = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert whole.keys() == split.keys()
    for k in whole:
        assert torch.equal(whole[k], split[k]), k
    fresh = load_model(tmp_path / "whole").model
    init = type(fresh)(fresh.config)
    assert any(not torch.equal(fresh.state_dict()[k], init.state_dict()[k]) for k in whole)  # it trained
    assert load_model(tmp_path / "whole", expect="ebm" if kind == "ebm" else "unet")


def test_each_piece_of_a_run_is_recorded_for_its_model_card(data, tmp_path):
    import json

    from puregen.training.state import STATE_JSON

    recipe = dataclasses.replace(EBMRecipe.preset("tiny"), steps=6)
    run = tmp_path / "run"
    train_ebm(data, run, recipe, progress=False, checkpoint_every=2, max_steps_this_call=2)
    train_ebm(data, run, recipe, progress=False, checkpoint_every=2, max_steps_this_call=2, resume=True)
    segments = json.loads((run / STATE_JSON).read_text())["segments"]
    assert [(s["start_step"], s["end_step"]) for s in segments] == [(0, 2), (2, 4)]
    for s in segments:
        assert s["seconds"] >= 0 and s["threads"] >= 1 and s["cpu"] and s["started"].endswith("Z")
        assert "command" in s
    # A run folder written before the pieces were recorded: its steps so far become one unrecorded piece.
    meta = json.loads((run / STATE_JSON).read_text())
    del meta["segments"]
    (run / STATE_JSON).write_text(json.dumps(meta))
    train_ebm(data, run, recipe, progress=False, checkpoint_every=2, resume=True)
    segments = json.loads((run / STATE_JSON).read_text())["segments"]
    assert segments[0] == {"start_step": 0, "end_step": 4, "recorded": False}
    assert (segments[1]["start_step"], segments[1]["end_step"]) == (4, 6)


def test_resume_with_another_recipe_or_data_is_refused(data, tmp_path):
    recipe = dataclasses.replace(DDPMRecipe.preset("tiny"), steps=2)
    train_ddpm(data, tmp_path / "run", recipe, progress=False)
    with pytest.raises(InputError, match="lr"):
        train_ddpm(data, tmp_path / "run", dataclasses.replace(recipe, lr=1.0), resume=True, progress=False)
    with pytest.raises(InputError, match="already exists"):
        train_ddpm(data, tmp_path / "run", recipe, progress=False)
    other = dataclasses.replace(data, fingerprint="0" * 64)
    with pytest.raises(InputError, match="different training data"):
        train_ddpm(other, tmp_path / "run", recipe, resume=True, progress=False)


def test_ebm_training_lowers_data_energy_relative_to_samples(data, tmp_path):
    recipe = dataclasses.replace(EBMRecipe.preset("tiny"), steps=30, langevin_steps=5, lr=1e-3, lr_decay_at=())
    info = train_ebm(data, tmp_path / "ebm", recipe, progress=False, checkpoint_every=30)
    gaps = [h["energy_gap"] for h in info["history"]]
    assert len(gaps) == 1 and np.isfinite(gaps[0])


def test_augment_is_a_shift_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    y = augment(x, padding=0, flip=True, g=g)
    assert all(torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(2)) for i in range(2))
    z = augment(x, padding=2, flip=False, g=g)
    assert z.shape == x.shape
    centre = augment(x, padding=0, flip=False, g=g)
    assert torch.equal(centre, x)


@pytest.mark.parametrize("arch", ["small-cnn", "fast-cnn"])
def test_classifier_learns_a_separable_problem(arch):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    images = torch.randn(200, 1, 12, 12, generator=g) * 0.3
    images[labels == 1, :, :6] += 1.0  # class 1 is bright on top
    images = images.clamp(-1, 1)
    model = train_classifier(images, labels, 2, dataclasses.replace(ClassifierRecipe.preset("tiny"), epochs=5,
                             batch_size=20, flip=False, arch=arch), progress=False)
    assert accuracy(model, images, labels) > 0.9


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_classifier_run_resumes_exactly_and_loads_as_a_checkpoint(precision, data, tmp_path):
    recipe = ClassifierRecipe(epochs=2, batch_size=8, precision=precision)  # 48 images: 12 steps
    whole = train_classifier_run(data, tmp_path / "whole", recipe, progress=False, checkpoint_every=4)
    assert whole["step"] == 12
    train_classifier_run(data, tmp_path / "split", recipe, progress=False, checkpoint_every=4, max_steps_this_call=5)
    train_classifier_run(data, tmp_path / "split", recipe, progress=False, resume=True)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    loaded = load_model(tmp_path / "whole", expect="classifier")
    assert loaded.model.config.num_classes == 4
    with pytest.raises(CheckpointError, match="classifier"):
        load_model(tmp_path / "whole", expect="ebm")
    with pytest.raises(InputError, match="epochs"):
        train_classifier_run(data, tmp_path / "whole", dataclasses.replace(recipe, epochs=3), resume=True,
                             progress=False)


def test_classifier_run_needs_labels(tmp_path):
    path = tmp_path / "unlabelled.npy"
    np.save(path, smooth_images(8))
    with pytest.raises(InputError, match="needs labels"):
        train_classifier_run(load_training_data(path), tmp_path / "run", ClassifierRecipe.preset("tiny"),
                             progress=False)


def test_bf16_training_losses_follow_fp32(data):
    """One DDPM loss and one EBM short run in bf16 against the fp32 oracle, same noise."""
    from puregen.engine.schedule import DDPMSchedule
    from puregen.models.ebm import EBM, EBMConfig
    from puregen.models.unet import UNet2D
    from puregen.models.unet_config import UNetConfig
    from puregen.training.ddpm import ddpm_loss
    from puregen.training.ebm import short_run
    from puregen.training.state import step_generator

    torch.manual_seed(0)
    unet = UNet2D(UNetConfig.tiny(in_channels=1, sample_size=28))
    x0 = data.images[:8]
    losses = [ddpm_loss(unet, x0, DDPMSchedule(), 250, step_generator(0, 0), p).item() for p in ("fp32", "bf16")]
    assert losses[1] == pytest.approx(losses[0], rel=0.02)  # bf16 activations: ~3 significant digits
    ebm = EBM(EBMConfig(in_channels=1, nf=8))
    runs = [short_run(ebm, x0, 5, drift=0.78, eps=1.25e-2, g=step_generator(0, 1), precision=p) for p in ("fp32", "bf16")]
    # The same noise; only the drift term differs, by bf16 rounding of the gradient.
    assert (runs[0] - runs[1]).abs().max() <= 0.02
    with pytest.raises(InputError, match="precision"):
        train_ddpm(data, "unused", dataclasses.replace(DDPMRecipe.preset("tiny"), precision="fp16"), progress=False)


def test_ebm_weight_average_is_exported_and_resumes_exactly(data, tmp_path):
    from puregen.models.safetensors_io import read_safetensors

    recipe = dataclasses.replace(EBMRecipe.preset("tiny"), steps=6, ema_decay=0.5)
    train_ebm(data, tmp_path / "whole", recipe, progress=False, checkpoint_every=2)
    train_ebm(data, tmp_path / "split", recipe, progress=False, max_steps_this_call=4)
    train_ebm(data, tmp_path / "split", recipe, progress=False, resume=True)
    exported, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    state = read_safetensors(tmp_path / "whole" / "training_state.safetensors")
    raw = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    for k in exported:
        assert torch.equal(exported[k], resumed[k]), k
        assert torch.equal(exported[k], state[f"extra.ema.{k}"]), k
    # decay 0.5 over 6 steps leaves the average visibly behind the raw weights
    assert any(not torch.allclose(exported[k], raw[k]) for k in exported)
    with pytest.raises(InputError, match="ema_decay"):  # another decay is another recipe
        train_ebm(data, tmp_path / "whole", dataclasses.replace(recipe, ema_decay=0.9), resume=True,
                  progress=False)
    with pytest.raises(InputError, match="EMA decay"):
        train_ebm(data, tmp_path / "bad", dataclasses.replace(recipe, ema_decay=1.0), progress=False)


def test_ebm_snapshots_are_kept_beside_the_run_and_load(data, tmp_path):
    recipe = dataclasses.replace(EBMRecipe.preset("tiny"), steps=6, ema_decay=0.5)
    train_ebm(data, tmp_path / "run", recipe, progress=False, checkpoint_every=100, max_steps_this_call=3,
              keep_every=2)
    train_ebm(data, tmp_path / "run", recipe, progress=False, checkpoint_every=100, resume=True, keep_every=2)
    kept = tmp_path / "run.snapshots"
    assert sorted(p.name for p in kept.iterdir()) == [
        "step-000002", "step-000002-raw", "step-000004", "step-000004-raw", "step-000006", "step-000006-raw"]
    last, last_raw, run = _weights(kept / "step-000006"), _weights(kept / "step-000006-raw"), _weights(tmp_path / "run")
    early = _weights(kept / "step-000002")
    for k in run:
        assert torch.equal(last[k], run[k]), k  # the last snapshot is the run's (EMA) model
    assert any(not torch.equal(last[k], last_raw[k]) for k in run)
    assert any(not torch.equal(last[k], early[k]) for k in run)
    with pytest.raises(InputError, match="keep-every"):
        train_ebm(data, tmp_path / "other", recipe, progress=False, keep_every=0)


def test_ebm_bank_smaller_than_a_batch_is_refused(data, tmp_path):
    recipe = dataclasses.replace(EBMRecipe.preset("tiny"), bank_size=4, batch_size=8)
    with pytest.raises(InputError, match="bank"):
        train_ebm(data, tmp_path / "run", recipe, progress=False)


@pytest.mark.parametrize("native", [True, False])
def test_training_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    from puregen.evaluation.defenses.friendly_noise import FriendlyNoiseRecipe
    from puregen.evaluation.scales import small_settings
    from puregen.backends import precision as backend_precision
    from puregen.training import loop

    monkeypatch.setattr(backend_precision, "cpu_has_native_bf16", lambda: native)
    expected = "bf16" if native else "fp32"  # emulated bf16 trained 2.4x slower than fp32
    assert loop.fastest_training_precision() == expected
    assert small_settings().classifier.precision == expected and FriendlyNoiseRecipe().precision == expected


def _recorded(run_dir):
    import json

    return json.loads((run_dir / "training_state.json").read_text())


@pytest.mark.parametrize("kind", ["ebm", "ddpm", "classifier"])
def test_resume_of_a_missing_or_stateless_run_folder_is_refused(kind, data, tmp_path):
    train, recipe = {
        "ebm": (train_ebm, dataclasses.replace(EBMRecipe.preset("tiny"), steps=2)),
        "ddpm": (train_ddpm, dataclasses.replace(DDPMRecipe.preset("tiny"), steps=2)),
        "classifier": (train_classifier_run, ClassifierRecipe(epochs=1, batch_size=24)),
    }[kind]
    missing = tmp_path / "no-such-run"
    with pytest.raises(InputError, match=f"{re.escape(str(missing))}: .*does not exist.*without --resume"):
        train(data, missing, recipe, resume=True, progress=False)
    assert not missing.exists()  # refused before anything was written
    stateless = tmp_path / "stateless"
    stateless.mkdir()
    (stateless / "notes.txt").write_text("not a run\n")
    with pytest.raises(InputError, match=f"{re.escape(str(stateless))}: .*no training state"):
        train(data, stateless, recipe, resume=True, progress=False)
    assert sorted(p.name for p in stateless.iterdir()) == ["notes.txt"]


def test_cli_resume_of_a_missing_run_is_an_input_error(data_path, tmp_path, capsys):
    from puregen.cli import main

    missing = tmp_path / "typo-run"
    assert main(["train", "ebm", str(data_path), "-o", str(missing), "--preset", "tiny", "--resume",
                 "--no-progress", "--threads", "2"]) == 2
    err = capsys.readouterr().err
    assert f"puregen: error: {missing}: " in err and "does not exist" in err and "Traceback" not in err
    assert not missing.exists()


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_fixed_when_a_run_starts_and_recorded(native, data, tmp_path, monkeypatch):
    from puregen.backends import precision as backend_precision

    monkeypatch.setattr(backend_precision, "cpu_has_native_bf16", lambda: native)
    chosen = "bf16" if native else "fp32"  # the purifiers' auto: emulated bf16 is several times slower
    assert EBMRecipe.preset("small").precision == "auto"
    recipe = dataclasses.replace(EBMRecipe.preset("tiny"), steps=2, precision="auto")
    info = train_ebm(data, tmp_path / "auto", recipe, progress=False)
    assert info["precision"] == chosen
    assert _recorded(tmp_path / "auto")["recipe"]["precision"] == chosen
    # it trained in that precision, not merely recorded it: the same weights as an explicit run
    train_ebm(data, tmp_path / "explicit", dataclasses.replace(recipe, precision=chosen), progress=False)
    a, b = _weights(tmp_path / "auto"), _weights(tmp_path / "explicit")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="precision 'fp16'.*auto, fp32 or bf16"):
        train_ebm(data, tmp_path / "bad", dataclasses.replace(recipe, precision="fp16"), progress=False)


@pytest.mark.parametrize("first_native, then_native", [(True, False), (False, True)])
def test_a_run_resumed_on_another_cpu_keeps_its_recorded_precision(first_native, then_native, data, tmp_path,
                                                                   monkeypatch, capsys):
    from puregen.backends import precision as backend_precision

    recorded = "bf16" if first_native else "fp32"
    recipe = dataclasses.replace(EBMRecipe.preset("tiny"), steps=4, precision="auto")
    train_ebm(data, tmp_path / "whole", dataclasses.replace(recipe, precision=recorded), progress=False)
    monkeypatch.setattr(backend_precision, "cpu_has_native_bf16", lambda: first_native)
    train_ebm(data, tmp_path / "split", recipe, progress=False, max_steps_this_call=2)
    train_ebm(data, tmp_path / "split", recipe, progress=False, max_steps_this_call=1, resume=True)
    assert "warning" not in capsys.readouterr().err  # the same CPU: nothing to say
    monkeypatch.setattr(backend_precision, "cpu_has_native_bf16", lambda: then_native)
    info = train_ebm(data, tmp_path / "split", recipe, progress=False, resume=True)
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'split'}: " in err and f"in {recorded}" in err and err.count("\n") == 1, err
    assert info["step"] == 4 and info["precision"] == recorded
    assert _recorded(tmp_path / "split")["recipe"]["precision"] == recorded
    whole, split = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert all(torch.equal(whole[k], split[k]) for k in whole)  # exact: the resumed steps ran in `recorded`
    other = "fp32" if recorded == "bf16" else "bf16"
    with pytest.raises(InputError, match=f"trains in {recorded}.*--precision {recorded} or auto"):
        train_ebm(data, tmp_path / "split", dataclasses.replace(recipe, precision=other), resume=True,
                  progress=False)


def test_cli_train_precision_defaults_to_the_presets_auto(data_path, tmp_path, monkeypatch):
    from puregen.cli import build_parser, main
    from puregen.backends import precision as backend_precision

    args = ["train", "ebm", str(data_path), "--no-progress", "--threads", "2", "--batch-size", "4"]
    assert build_parser().parse_args([*args, "-o", "x", "--precision", "auto"]).precision == "auto"
    monkeypatch.setattr(backend_precision, "cpu_has_native_bf16", lambda: False)
    # the small preset on a CPU without native bf16: fp32, no longer emulated bf16
    assert main([*args, "-o", str(tmp_path / "small"), "--preset", "small", "--steps", "1"]) == 0
    assert _recorded(tmp_path / "small")["recipe"]["precision"] == "fp32"
    monkeypatch.setattr(backend_precision, "cpu_has_native_bf16", lambda: True)
    assert main([*args, "-o", str(tmp_path / "tiny"), "--preset", "tiny", "--steps", "1", "--precision", "auto"]) == 0
    assert _recorded(tmp_path / "tiny")["recipe"]["precision"] == "bf16"


def test_cli_lr_decay_at_sets_the_ebm_schedule_and_rejects_bad_steps(data_path, tmp_path, capsys):
    from puregen.cli import main

    args = ["train", "ebm", str(data_path), "--no-progress", "--threads", "2", "--preset", "tiny", "--steps", "3"]
    assert main([*args, "-o", str(tmp_path / "decay"), "--lr-decay-at", "1,2"]) == 0
    assert _recorded(tmp_path / "decay")["recipe"]["lr_decay_at"] == [1, 2]
    assert main([*args, "-o", str(tmp_path / "flat"), "--lr-decay-at", "none"]) == 0
    assert _recorded(tmp_path / "flat")["recipe"]["lr_decay_at"] == []
    for bad in ("2,1", "x", "0"):
        assert main([*args, "-o", str(tmp_path / "bad"), "--lr-decay-at", bad]) == 2
        assert "--lr-decay-at" in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    ddpm = ["train", "ddpm", str(data_path), "--no-progress", "--preset", "tiny", "-o", str(tmp_path / "d")]
    assert main([*ddpm, "--lr-decay-at", "5"]) == 2
    assert "does not apply to ddpm" in capsys.readouterr().err
