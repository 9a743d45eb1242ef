"""SIGINT and SIGTERM during training: a checkpoint at the step boundary, then an exact resume."""

import contextlib
import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import torch

import puregen.training.classifier as classifier_module
import puregen.training.ddpm as ddpm_module
import puregen.training.ebm as ebm_module
from puregen.cli import main
from puregen.data import write_dataset
from puregen.models.safetensors_io import read_safetensors
from puregen.training import loop
from puregen.training.classifier import ClassifierRecipe, train_classifier_run
from puregen.training.ddpm import DDPMRecipe, train_ddpm
from puregen.training.ebm import EBMRecipe, train_ebm
from puregen.training.loop import load_training_data

from .conftest import smooth_images

# Six steps of each kind (48 images in batches of 8 make the classifier's one epoch six steps). The default
# checkpoint intervals (100 or 200 steps) write nothing before the end, so only the signal can checkpoint.
KINDS = {
    "ebm": (ebm_module, train_ebm, dataclasses.replace(EBMRecipe.preset("tiny"), steps=6)),
    "ddpm": (ddpm_module, train_ddpm, dataclasses.replace(DDPMRecipe.preset("tiny"), steps=6)),
    "classifier": (classifier_module, train_classifier_run, ClassifierRecipe(epochs=1, batch_size=8)),
}


@pytest.fixture(autouse=True)
def _one_thread():
    # Each test compares runs made in it with one another, so one thread suffices; on a shared 2-core machine
    # two threads per run mostly wait for each other.
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("interrupt") / "train.npz"
    write_dataset(path, smooth_images(48, seed=3), np.arange(48) % 4)
    return path


class PreviousHandlerCalled(Exception):
    pass


@contextlib.contextmanager
def previous_handlers():
    """Stand-ins for the handlers a caller had: training must not call them, and must put them back."""

    def handler(signum, frame):
        raise PreviousHandlerCalled(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield handler
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def signal_during_step(monkeypatch, module, step: int, signum: int) -> None:
    """Send `signum` to this process at the start of `step`, so that it arrives while the step runs."""
    real = module.step_generator

    def hooked(seed, s, *args, **kwargs):
        if s == step:
            os.kill(os.getpid(), signum)
        return real(seed, s, *args, **kwargs)

    monkeypatch.setattr(module, "step_generator", hooked)


def assert_same_run(a, b):
    for name in ("model.safetensors", "training_state.safetensors"):  # weights, optimizer moments, EMA, bank
        ta, tb = read_safetensors(a / name), read_safetensors(b / name)
        assert ta.keys() == tb.keys(), name
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)


@pytest.mark.parametrize("kind, signum", [("ebm", signal.SIGINT), ("ebm", signal.SIGTERM),
                                          ("ddpm", signal.SIGINT), ("classifier", signal.SIGTERM)],
                         ids=["ebm-SIGINT", "ebm-SIGTERM", "ddpm-SIGINT", "classifier-SIGTERM"])
def test_a_signal_mid_step_checkpoints_that_step_and_the_resume_is_exact(kind, signum, data_path, tmp_path,
                                                                        monkeypatch):
    module, train, recipe = KINDS[kind]
    data = load_training_data(data_path)
    train(data, tmp_path / "whole", recipe, progress=False)
    signal_during_step(monkeypatch, module, 2, signum)
    with previous_handlers() as previous:
        with pytest.raises(KeyboardInterrupt) as stopped:
            train(data, tmp_path / "cut", recipe, progress=False)
        assert signal.getsignal(signal.SIGINT) is previous and signal.getsignal(signal.SIGTERM) is previous
    assert isinstance(stopped.value, loop.TrainingInterrupted)
    assert (stopped.value.step, stopped.value.exit_code) == (3, 128 + signum)
    # step 2 ran to its end and the state written is the one after it, not a half-done step
    assert json.loads((tmp_path / "cut" / "training_state.json").read_text())["step"] == 3
    info = train(data, tmp_path / "cut", recipe, progress=False, resume=True)
    assert info["step"] == 6
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_cli_train_exits_with_the_signal_code_and_resumes_exactly(signum, code, data_path, tmp_path, monkeypatch,
                                                                  capsys):
    args = ["train", "ebm", str(data_path), "--preset", "tiny", "--steps", "6", "--no-progress", "--threads", "1"]
    assert main([*args, "-o", str(tmp_path / "whole")]) == 0
    signal_during_step(monkeypatch, ebm_module, 3, signum)
    capsys.readouterr()
    with previous_handlers():
        assert main([*args, "-o", str(tmp_path / "cut")]) == code
    err = capsys.readouterr().err
    for fragment in (signal.Signals(signum).name, "step 4", str(tmp_path / "cut"), "--resume"):
        assert fragment in err, (fragment, err)
    assert "Traceback" not in err
    assert main([*args, "-o", str(tmp_path / "cut"), "--resume"]) == 0
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


def test_a_signal_in_the_last_step_just_finishes_the_run(data_path, tmp_path, monkeypatch):
    data = load_training_data(data_path)
    recipe = dataclasses.replace(EBMRecipe.preset("tiny"), steps=3)
    signal_during_step(monkeypatch, ebm_module, 2, signal.SIGINT)
    with previous_handlers() as previous:
        info = train_ebm(data, tmp_path / "run", recipe, progress=False)
        assert signal.getsignal(signal.SIGINT) is previous
    assert info["step"] == 3
    assert json.loads((tmp_path / "run" / "training_state.json").read_text())["step"] == 3


def test_a_second_signal_stops_at_once_with_the_previous_handler(data_path, tmp_path, monkeypatch):
    """The way out of a long step: the second signal is the caller's again (for SIGINT: KeyboardInterrupt)."""
    data = load_training_data(data_path)
    real = ebm_module.step_generator

    def twice(seed, s, *args, **kwargs):
        if s == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(seed, s, *args, **kwargs)

    monkeypatch.setattr(ebm_module, "step_generator", twice)
    with previous_handlers() as previous:
        with pytest.raises(PreviousHandlerCalled, match="SIGINT"):
            train_ebm(data, tmp_path / "run", KINDS["ebm"][2], progress=False)
        assert signal.getsignal(signal.SIGINT) is previous
    assert not (tmp_path / "run").exists()  # nothing half-written: the first checkpoint was still to come
