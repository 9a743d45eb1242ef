"""The method registry: a method written outside the package, run through the API, the pipeline and the CLI.

`ShrinkToMean` is the example of docs/adding-a-method.md: a `fit` method (its state, the mean image of
the whole input, is part of a job's resumable state) that pulls each image toward that mean and adds
noise drawn from its own Philox stream, keyed like every other stage. Its answer is known in closed form.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from puregen.api import load_purifier, purify_dataset
from puregen.data import read_dataset, write_dataset
from puregen.data.convert import from_model_space, to_model_space
from puregen.engine.noise_key import NoiseKey
from puregen.engine.pipeline import run_job
from puregen.errors import InputError
from puregen.kernels import philox
from puregen.methods import Method, MethodConfig, MethodOutput, option, register, registry, unregister
from puregen.methods.options import within

from .conftest import smooth_images

STREAM_SHRINK = 100  # a stream no built-in stage draws


@dataclasses.dataclass(frozen=True)
class ShrinkConfig(MethodConfig):
    strength: float = option(0.5, "how far each image moves toward the input's mean image", check=within(0.0, 1.0))
    noise: float = option(0.05, "scale of the Gaussian noise added after the pull", check=within(0.0, 1.0))


class ShrinkToMean(Method):
    name = "shrink-to-mean"
    help = "pull each image toward the mean image of the whole input, then add keyed Gaussian noise"
    Config = ShrinkConfig
    presets = {"tiny": {"noise": 0.1}}
    noise_streams = (STREAM_SHRINK,)
    scope = "fit"
    fits = 0  # how often a fit ran (a resumed job must not fit again)

    def network_evaluations(self) -> int:
        return 1

    def fit(self, images_u8, labels, ctx):
        type(self).fits += 1
        return {"mean": to_model_space(images_u8).mean(dim=0), "images": int(images_u8.shape[0])}

    def purify(self, x, ctx) -> MethodOutput:
        c = self.config
        noise = philox.normal_noise(ctx.key.indices, tuple(x.shape[1:]), seed=ctx.key.seed, stream=STREAM_SHRINK,
                                    step=0)
        out = (1 - c.strength) * x + c.strength * ctx.state["mean"].to(x) + c.noise * noise.to(x)
        ctx.step(1)
        return MethodOutput(out.clamp(-1, 1))


@pytest.fixture
def shrink():
    register(ShrinkToMean)
    ShrinkToMean.fits = 0
    yield ShrinkToMean
    unregister(ShrinkToMean.name)


def _expected(images: np.ndarray, seed: int, strength: float, noise: float) -> np.ndarray:
    """The closed form, computed apart from the method: the same float32 arithmetic, then the uint8 rounding."""
    x = to_model_space(images)
    mean = x.mean(dim=0)
    n = philox.normal_noise(torch.arange(len(images)), tuple(x.shape[1:]), seed=seed, stream=STREAM_SHRINK, step=0)
    return from_model_space(((1 - strength) * x + strength * mean + noise * n).clamp(-1, 1)).numpy()


def test_a_method_from_a_test_file_runs_through_the_api_with_its_known_answer(shrink):
    images = smooth_images(20, seed=3)
    p = load_purifier("shrink-to-mean", strength=0.25)
    assert p.config == ShrinkConfig(strength=0.25, noise=0.05)
    out = p.purify(images, seed=9, batch_size=7)  # batches of 7 do not change the whole input's fit
    assert np.array_equal(out, _expected(images, 9, 0.25, 0.05))  # exact: the same fp32 operations
    assert p.dataset_state is None  # the fit belonged to those images
    assert load_purifier("shrink-to-mean", preset="tiny").config.noise == 0.1


def test_a_batch_route_refuses_a_fit_method_until_its_state_is_given(shrink):
    images = smooth_images(12, seed=4)
    p = load_purifier("shrink-to-mean")
    with pytest.raises(InputError, match="fit on the whole input"):
        list(p.purify_stream([images[:6], images[6:]]))
    p.dataset_state = ShrinkToMean(ShrinkConfig()).fit(torch.from_numpy(images), None, None)
    streamed = np.concatenate(list(p.purify_stream([images[:5], images[5:]], seed=2)))
    assert np.array_equal(streamed, _expected(images, 2, 0.5, 0.05))


def test_a_killed_and_resumed_job_keeps_the_fitted_state_and_gives_the_same_bytes(shrink, tmp_path):
    images = smooth_images(30, seed=5)
    labels = np.arange(30) % 10
    write_dataset(tmp_path / "in.npz", images, labels)
    whole = purify_dataset(tmp_path / "in.npz", tmp_path / "whole.npz", "shrink-to-mean", seed=1, chunk_size=8,
                           progress=False)
    assert ShrinkToMean.fits == 1
    assert whole["dataset_state"] == {"images": 30}  # the manifest records the state's JSON values

    def killed(k):
        if k == 1:
            raise KeyboardInterrupt  # after the second chunk is handed to the writer

    with pytest.raises(KeyboardInterrupt):
        run_job(tmp_path / "in.npz", tmp_path / "out.npz", load_purifier("shrink-to-mean"), seed=1, chunk_size=8,
                batch_size=5, progress=False, on_chunk=killed)
    assert ShrinkToMean.fits == 2
    parts = tmp_path / "out.npz.parts"
    assert (parts / "dataset-state.json").is_file() and (parts / "dataset-state.safetensors").is_file()
    resumed = purify_dataset(tmp_path / "in.npz", tmp_path / "out.npz", "shrink-to-mean", seed=1, chunk_size=8,
                             batch_size=3, resume=True, progress=False)
    assert ShrinkToMean.fits == 2, "the resumed job fitted again instead of reading its state"
    assert resumed["complete"] and not parts.exists()
    out = read_dataset(tmp_path / "out.npz")
    assert np.array_equal(out.images, read_dataset(tmp_path / "whole.npz").images)
    assert np.array_equal(out.images, _expected(images, 1, 0.5, 0.05))
    assert np.array_equal(out.labels, labels)


def test_an_installed_packages_entry_point_makes_the_method_a_cli_method(tmp_path):
    """A plug-in package (its dist-info names the class in the `puregen.methods` group) needs no registration call."""
    plugin = tmp_path / "plugin"
    (plugin / "shrink_plugin-1.0.dist-info").mkdir(parents=True)
    (plugin / "shrink_plugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: shrink-plugin\n"
                                                                     "Version: 1.0\n")
    (plugin / "shrink_plugin-1.0.dist-info" / "entry_points.txt").write_text(
        "[puregen.methods]\nshrink-to-mean = shrink_plugin:ShrinkToMean\n")
    source = open(__file__).read()
    start, end = source.index("STREAM_SHRINK = 100"), source.index("@pytest.fixture")
    (plugin / "shrink_plugin.py").write_text(textwrap.dedent('''
        import dataclasses
        import torch
        from puregen.data.convert import to_model_space
        from puregen.kernels import philox
        from puregen.methods import Method, MethodConfig, MethodOutput, option
        from puregen.methods.options import within
    ''') + source[start:end])
    images = smooth_images(10, seed=6)
    write_dataset(tmp_path / "in.npz", images)
    env = {**os.environ, "PYTHONPATH": str(plugin)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "puregen.cli", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=300)
    helped = run("purify", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "shrink-to-mean" in helped.stdout and "--strength" in helped.stdout
    done = run("purify", tmp_path / "in.npz", "-o", tmp_path / "out.npz", "--method", "shrink-to-mean",
               "--strength", "0.75", "--seed", "4", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert np.array_equal(read_dataset(tmp_path / "out.npz").images, _expected(images, 4, 0.75, 0.05))
    refused = run("purify", tmp_path / "in.npz", "-o", tmp_path / "o2.npz", "--method", "shrink-to-mean",
                  "--steps", "3", "--no-progress")
    assert refused.returncode == 2 and "--steps does not apply to --method shrink-to-mean" in refused.stderr
    assert not (tmp_path / "o2.npz").exists()


def test_purify_help_lists_every_method_with_its_help_and_flags():
    r = subprocess.run([sys.executable, "-m", "puregen.cli", "purify", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for method in registry.all_methods():
        assert method.name in r.stdout and method.help.split()[0] in r.stdout
    assert "--energy-threshold=None --filter-frac=0.5 --reverse-steps=None --t-star=125" in r.stdout  # filt, sorted


def test_declarations_that_cannot_work_are_refused_at_registration():
    class Nameless(ShrinkToMean):
        name = "Bad Name"

    class Clashing(ShrinkToMean):
        name = "clashing"

        @dataclasses.dataclass(frozen=True)
        class Config(MethodConfig):
            seed: int = option(0, "a second seed")

    class Streamless(ShrinkToMean):
        name = "streamless"
        noise_streams = (1 << 16,)

    for bad, match in ((Nameless, "name must be"), (Clashing, "job's own keywords"), (Streamless, "noise stream")):
        with pytest.raises(ValueError, match=match):
            register(bad)
    with pytest.raises(ValueError, match="already registered"):
        register(type("Another", (ShrinkToMean,), {"name": "ebm"}))
    with pytest.raises(InputError, match="unknown method 'nope'"):
        registry.get("nope")


def test_the_noise_key_is_checked_once_where_it_is_made():
    assert NoiseKey.rows(3, 5, 8).indices.tolist() == [5, 6, 7]
    for seed in (-1, 1 << 64, 1.5, True):
        with pytest.raises(InputError, match="--seed"):
            NoiseKey.of(seed, [0])
    for indices, match in (([0, 0], "distinct"), ([-1], "non-negative"), ([1 << 48], "2\\*\\*48"),
                           (np.array([0.5]), "integers")):
        with pytest.raises(InputError, match=match):
            NoiseKey.of(0, indices)
    p = load_purifier("jpeg")
    with pytest.raises(TypeError, match="NoiseKey"):
        p.purify_batch(torch.zeros(1, 8, 8, 1, dtype=torch.uint8), torch.arange(1), 0)


def test_a_given_dataset_state_is_part_of_the_jobs_fingerprint(shrink, tmp_path):
    from puregen.engine.pipeline import config_fingerprint

    images = torch.from_numpy(smooth_images(8, seed=7))
    p = load_purifier("shrink-to-mean")
    computed = config_fingerprint(p, 0, 16)[0]  # the job fits on its input: the input's fingerprint covers it
    p.dataset_state = ShrinkToMean(ShrinkConfig()).fit(images, None, None)
    given = config_fingerprint(p, 0, 16)[0]
    p.dataset_state = ShrinkToMean(ShrinkConfig()).fit(images[:4], None, None)
    assert len({computed, given, config_fingerprint(p, 0, 16)[0]}) == 3
    assert config_fingerprint(load_purifier("ebm", preset="tiny"), 0, 16)[1]["method_name"] == "ebm"
