"""The evaluation harness: triggers, clean-label poisoning, Narcissus, measurements and the demo."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from puregen.errors import InputError
from puregen.evaluation.attacks.narcissus import (
    NarcissusRecipe,
    craft_narcissus,
    optimise_trigger,
)
from puregen.evaluation.datasets import balanced_subset
from puregen.evaluation.harness import EvalSet, measure
from puregen.evaluation.report import Row, markdown_seed_table, summarize
from puregen.evaluation.clean_label import clean_label_poison, contribute_poisons
from puregen.evaluation.triggers import Trigger, load_trigger
from puregen.training.classifier import ClassifierRecipe, train_classifier

from .conftest import FASHION_MNIST, REPO, smooth_images

EPS = 16 / 255


def cli(*args):
    return subprocess.run([sys.executable, "-m", "puregen.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=600, check=False)


def random_trigger(shape=(28, 28, 1), target=3, seed=0):
    rng = np.random.default_rng(seed)
    return Trigger(rng.uniform(-EPS, EPS, shape).astype(np.float32), EPS, target)


def test_trigger_over_budget_or_nan_is_refused():
    with pytest.raises(InputError, match="exceeds its budget"):
        Trigger(np.full((4, 4, 1), EPS * 1.01, np.float32), EPS, 0)
    bad = np.zeros((4, 4, 1), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        Trigger(bad, EPS, 0)


def test_trigger_apply_adds_clips_and_rounds():
    trig = random_trigger()
    images = smooth_images(5)
    images[0] = 0
    images[1] = 255
    out = trig.apply(images)
    expected = np.rint(np.clip(images / 255.0 + trig.pattern, 0, 1) * 255)
    assert out.dtype == np.uint8
    assert np.abs(out.astype(int) - expected).max() <= 1  # float32 vs float64 rounding at .5 ties
    # After rounding, the change is at most the budget (16 levels) plus half a level.
    assert np.abs(out.astype(int) - images.astype(int)).max() <= 16
    amplified = trig.apply(images, amplify=3)
    assert np.abs(amplified.astype(int) - images.astype(int)).max() > 16
    with pytest.raises(InputError, match="cannot be applied"):
        trig.apply(smooth_images(2, 32, 32, 3))


def test_trigger_round_trip_and_corrupt_files(tmp_path):
    trig = random_trigger()
    trig.meta["attack"] = "test"
    trig.save(tmp_path / "t")
    back = load_trigger(tmp_path / "t")
    assert np.array_equal(back.pattern, trig.pattern) and back.target == 3 and back.meta["attack"] == "test"
    (tmp_path / "t" / "trigger.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(InputError, match="trigger.npy"):
        load_trigger(tmp_path / "t")
    with pytest.raises(InputError, match="missing"):
        load_trigger(tmp_path / "nowhere")
    big = Trigger(np.full((28, 28, 1), EPS, np.float32), EPS, 0)
    big.save(tmp_path / "big")
    meta = json.loads((tmp_path / "big" / "trigger.json").read_text())
    meta["epsilon"] = 8 / 255  # the JSON now claims a smaller budget than the array holds
    (tmp_path / "big" / "trigger.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="exceeds its budget"):
        load_trigger(tmp_path / "big")


def test_clean_label_poison_touches_only_chosen_target_images():
    images = smooth_images(100)
    labels = np.arange(100) % 10
    before = images.copy()
    trig = random_trigger(target=4)
    p = clean_label_poison(images, labels, trig, 3, seed=1, test_amplify=3)
    assert len(p.indices) == 3 and (labels[p.indices] == 4).all()
    assert p.test_trigger is trig and p.test_amplify == 3.0 and p.target_class == 4
    poisoned, new_labels = p.poisoned_training_set(images, labels)
    assert np.array_equal(new_labels, labels) and np.array_equal(p.labels, labels[p.indices])  # clean-label
    untouched = np.setdiff1d(np.arange(100), p.indices)
    assert np.array_equal(poisoned[untouched], images[untouched])
    assert np.array_equal(poisoned[p.indices], trig.apply(images[p.indices]))
    assert np.array_equal(images, before)  # the victim's images before the trigger are still there
    again = clean_label_poison(images, labels, trig, 3, seed=1)
    assert np.array_equal(again.indices, p.indices)
    with pytest.raises(InputError, match="cannot poison 11"):
        clean_label_poison(images, labels, trig, 11, seed=0)


def test_contributed_poisons_replace_target_rows_and_keep_labels():
    images, labels = smooth_images(100), np.arange(100) % 10
    own = smooth_images(4, seed=9)
    trig = random_trigger(target=4)
    own_before = own.copy()
    p = contribute_poisons(images, labels, trig, own, seed=0)
    poisoned, new_labels = p.poisoned_training_set(images, labels)
    assert (labels[p.indices] == 4).all() and np.array_equal(new_labels, labels)
    assert np.array_equal(poisoned[p.indices], trig.apply(own)) and np.array_equal(own, own_before)
    untouched = np.setdiff1d(np.arange(100), p.indices)
    assert np.array_equal(poisoned[untouched], images[untouched])
    with pytest.raises(InputError, match="cannot place 11"):
        contribute_poisons(images, labels, trig, smooth_images(11), seed=0)


def test_balanced_subset_has_equal_classes():
    labels = np.random.default_rng(0).integers(0, 10, 2000)
    idx = balanced_subset(labels, 20, seed=0)
    assert np.array_equal(np.bincount(labels[idx], minlength=10), np.full(10, 20))
    assert len(np.unique(idx)) == 200
    with pytest.raises(InputError, match="fewer than"):
        balanced_subset(labels, 1000, seed=0)


def _two_blob_problem(n=120, size=12, seed=0):
    """Class 0 bright on the left, class 1 bright on the right, class 2 (the 'target') bright at the top."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = torch.randn(n, 1, size, size, generator=g) * 0.2 - 0.5
    x[labels == 0, :, :, : size // 2] += 1
    x[labels == 1, :, :, size // 2 :] += 1
    x[labels == 2, :, : size // 2] += 1
    return x.clamp(-1, 1), labels


def test_narcissus_trigger_stays_in_budget_and_lowers_the_target_loss():
    x, y = _two_blob_problem()
    recipe = NarcissusRecipe(epsilon=EPS, surrogate_epochs=3, trigger_steps=30, batch_size=16)
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pood, pood_y, target = u8[y.numpy() != 2], y.numpy()[y.numpy() != 2], u8[y.numpy() == 2]
    trig = craft_narcissus(pood, pood_y, target, target=7, recipe=recipe, progress=False)
    assert trig.linf <= EPS + 1e-6 and trig.linf > 0.5 * EPS
    assert trig.target == 7 and trig.meta["attack"] == "narcissus"
    # Defining property: on a fixed surrogate the optimised trigger lowers the target-class loss.
    surrogate = train_classifier(x, torch.where(y == 2, 2, y), 3,
                                 ClassifierRecipe(epochs=3, batch_size=16, flip=False), progress=False)
    targets = x[y == 2]
    delta = optimise_trigger(surrogate, targets, 2, recipe, progress=False)
    assert delta.abs().max() <= 2 * EPS + 1e-6
    loss = torch.nn.functional.cross_entropy
    lbl = torch.full((len(targets),), 2)
    with torch.no_grad():
        assert loss(surrogate((targets + delta).clamp(-1, 1)), lbl) < loss(surrogate(targets), lbl)


def test_summary_statistics_and_table():
    ms = [Row("narcissus", 0, "none", s, a, b, 1.0) for s, a, b in ((0, 0.80, 0.70), (1, 0.82, 0.90))]
    ms.append(Row("narcissus", 0, "ebm", 0, 0.79, 0.02, 1.0))
    rows = summarize(ms)
    assert [r.defense for r in rows] == ["none", "ebm"]
    assert rows[0].natural_mean == pytest.approx(81.0) and rows[0].success_mean == pytest.approx(80.0)
    assert rows[0].success_std == pytest.approx(np.std([70, 90], ddof=1))
    assert rows[0].natural_std == pytest.approx(np.std([80, 82], ddof=1))
    assert rows[1].success_std == 0.0 and rows[1].n == 1
    table = markdown_seed_table(rows)
    assert table.startswith("| defense | poison success % | natural accuracy % | seeds |\n|---|---|---|---|\n")
    assert "| none | 80.0 ± 14.1 | 81.0 ± 1.4 | 2 |" in table
    with pytest.raises(ValueError, match="one backdoor attack"):
        markdown_seed_table(summarize(ms + [Row("badnets", 0, "none", 0, 0.8, 0.5, 1.0)]))


def test_measure_counts_only_non_target_images_as_poison_targets():
    class Constant(torch.nn.Module):  # predicts class 1 for everything
        def forward(self, x):
            out = torch.zeros(len(x), 10)
            out[:, 1] = 1
            return out

    images, labels = smooth_images(20), np.arange(20) % 10
    test = EvalSet.build(images, labels, random_trigger(target=1), amplify=1)
    assert test.triggered.shape[0] == 18  # the two class-1 images are left out
    natural, success = measure(Constant(), test)
    assert natural == pytest.approx(0.1) and success == 1.0


def test_bf16_classifier_training_matches_fp32_for_a_few_steps():
    x, y = _two_blob_problem(n=64)
    base = ClassifierRecipe(epochs=1, batch_size=16, flip=False, seed=0)
    fp32 = train_classifier(x, y, 3, base, progress=False)
    bf16 = train_classifier(x, y, 3, dataclasses.replace(base, precision="bf16"), progress=False)
    with torch.no_grad():
        a, b = fp32(x), bf16(x)
    # 4 SGD steps with bf16 activations (8-bit mantissa) drift a little from fp32; logits agree to ~5%.
    assert (a - b).abs().max() <= 0.05 * a.abs().max() + 0.05
    with pytest.raises(InputError, match="precision"):
        train_classifier(x, y, 3, dataclasses.replace(base, precision="fp8"), progress=False)


def test_digits_are_upsampled_to_fashion_mnist_size():
    pytest.importorskip("sklearn")
    from puregen.evaluation.datasets import digits_as_images

    ds = digits_as_images(28)
    assert ds.images.shape == (1797, 28, 28, 1) and ds.images.dtype == np.uint8
    assert set(np.unique(ds.labels)) == set(range(10))
    assert ds.images.max() == 255 and ds.images[:, 0, 0].max() < 64  # bright strokes on a dark border


def test_shipped_demo_trigger_is_within_budget_and_clean_label():
    from puregen.evaluation.datasets import load_fashion_mnist
    from puregen.evaluation.demo import DEMO_TRIGGER, VICTIM_ROWS
    from puregen.evaluation.triggers import shipped_trigger

    trig = shipped_trigger(DEMO_TRIGGER)
    assert trig.epsilon == pytest.approx(16 / 255) and trig.linf <= 16 / 255 + 1e-6
    assert trig.pattern.shape == (28, 28, 1) and trig.meta["attack"] == "narcissus"
    rows = np.array(trig.meta["contributed"]["indices"])
    assert len(rows) >= 10 and rows.min() >= VICTIM_ROWS and len(np.unique(rows)) == len(rows)
    if (FASHION_MNIST / "train-labels-idx1-ubyte.gz").exists():
        labels = load_fashion_mnist(FASHION_MNIST, "train").labels
        assert (labels[rows] == trig.target).all()  # the attacker contributes true target-class images
    with pytest.raises(InputError, match="no shipped trigger"):
        shipped_trigger("nope")


def test_demo_end_to_end_on_real_data_with_few_steps(tmp_path):
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found at {FASHION_MNIST}")
    out = tmp_path / "demo"
    r = cli("demo", "--data", FASHION_MNIST, "-o", out, "--subset", 100, "--seeds", 2, "--epochs", 1,
            "--ebm-steps", 2, "--ebm-temp", "5e-5", "--t-star", 2, "--no-progress")
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "results.json").read_text())
    assert [row["defense"] for row in result["table"]] == ["none", "ebm", "ddpm"]
    assert len(result["measurements"]) == 6 and result["setup"]["poisons"] == 1
    assert result["setup"]["ebm_temp"] == 5e-5 and "2 Langevin steps at temperature 5e-05" in r.stdout
    assert all(0 <= m["natural_accuracy"] <= 1 and 0 <= m["poison_success"] <= 1 for m in result["measurements"])
    assert set(result["checks"]) >= {"no defense: poison success >= 60%", "ebm: poison success <= 10%"}
    assert "| none |" in r.stdout and (out / "results.md").read_text() in r.stdout
    assert (out / "examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cached = sorted((out / "purified").iterdir())
    assert [p.name.split("-")[0] for p in cached] == ["ddpm", "ebm"]
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = cli("demo", "--data", FASHION_MNIST, "-o", out, "--subset", 100, "--seeds", 1, "--epochs", 1,
                "--ebm-steps", 2, "--ebm-temp", "5e-5", "--t-star", 2, "--no-progress")
    assert again.returncode == 0, again.stderr
    assert [p.stat().st_mtime_ns for p in sorted((out / "purified").iterdir())] == stamps  # reused, not redone
    rerun = json.loads((out / "results.json").read_text())
    first, second = result["measurements"][0], rerun["measurements"][0]
    for key in ("defense", "seed", "natural_accuracy", "poison_success"):  # same data and seed: same numbers
        assert first[key] == second[key]


def test_demo_with_missing_data_exits_2_naming_the_file(tmp_path):
    r = cli("demo", "--data", tmp_path / "nowhere", "-o", tmp_path / "out", "--no-progress")
    assert r.returncode == 2
    assert "nowhere" in r.stderr and "Fashion-MNIST" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


class _Blur:
    """A deterministic stand-in purifier: a 3x3 box blur (a smooth trigger survives it, a noisy one does not)."""

    def purify(self, images, seed=0):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        out = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
        return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class _Identity:
    def purify(self, images, seed=0):
        return images.copy()


class _Constant:
    def purify(self, images, seed=0):
        return np.full_like(images, 128)


def test_trigger_retention_is_one_for_identity_zero_for_constant_and_between_for_blur():
    from puregen.evaluation.retention import trigger_retention

    images = smooth_images(6)
    trig = random_trigger()  # i.i.d. noise: a blur removes most of it
    assert trigger_retention(_Identity(), images, trig)["retention"] == pytest.approx(1.0, abs=1e-12)
    constant = trigger_retention(_Constant(), images, trig)
    assert constant["retention"] == 0.0 and constant["surviving_norm_ratio"] == 0.0
    blurred = trigger_retention(_Blur(), images, trig)["retention"]
    assert 0.0 < blurred < 0.3  # a 3x3 box keeps 1/9 of white noise's power along itself, plus rounding
    with pytest.raises(ValueError, match="changes none"):
        trigger_retention(_Identity(), np.full_like(images, 255), Trigger(np.full((28, 28, 1), EPS, np.float32),
                                                                           EPS, 0))


def test_random_sign_triggers_fill_their_budget_and_coarse_ones_survive_a_blur():
    from puregen.evaluation.retention import random_sign_triggers, retention_of_triggers, trigger_retention

    coarse, fine = random_sign_triggers((28, 28, 1), EPS, grids=(4, 14), seed=3)
    for t in (coarse, fine):
        assert np.array_equal(np.abs(t.pattern), np.full((28, 28, 1), np.float32(EPS)))  # the whole budget
        assert 0.2 < (t.pattern > 0).mean() < 0.8  # both signs: not a constant shift
    again = random_sign_triggers((28, 28, 1), EPS, grids=(4, 14), seed=3)
    assert np.array_equal(again[0].pattern, coarse.pattern)
    assert not np.array_equal(random_sign_triggers((28, 28, 1), EPS, grids=(4,), seed=4)[0].pattern, coarse.pattern)
    images = smooth_images(6)
    shared = retention_of_triggers(_Blur(), images, [coarse, fine])
    for r, t in zip(shared["retention"], (coarse, fine)):  # sharing the clean pass changes nothing
        assert r == pytest.approx(trigger_retention(_Blur(), images, t)["retention"], abs=1e-12)
    # a blur keeps a pattern with large sign regions and loses much of one with small regions
    assert shared["retention"][0] > shared["retention"][1] + 0.1
    assert retention_of_triggers(_Identity(), images, [coarse])["mean_retention"] == pytest.approx(1.0, abs=1e-12)


def test_demo_with_a_missing_ebm_checkpoint_exits_2_naming_it(tmp_path):
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found at {FASHION_MNIST}")
    r = cli("demo", "--data", FASHION_MNIST, "-o", tmp_path / "out", "--ebm", tmp_path / "no-such-ebm",
            "--subset", 100, "--no-progress")
    assert r.returncode == 2, r.stderr
    assert "no-such-ebm" in r.stderr and "Traceback" not in r.stderr


def test_demo_purifies_with_the_asked_precision_and_caches_it_apart(tmp_path):
    from puregen.evaluation.demo import DemoConfig, cached_purification

    from .conftest import smooth_images

    images = smooth_images(6, seed=4)
    cfg = DemoConfig(data=tmp_path, out=tmp_path / "out", workers=1, progress=False)
    outs = {}
    for precision in ("fp32", "bf16"):
        options = {"micro_batch": 8, "precision": precision, "backend": "torch", "steps": 3}
        outs[precision] = cached_purification("ebm", options, images, cfg, threads=2)
    assert len(list((tmp_path / "out" / "purified").glob("ebm-*.npz"))) == 2  # one cache entry per precision
    diff = np.abs(outs["fp32"].astype(int) - outs["bf16"].astype(int))
    assert 0 < diff.max() and diff.mean() <= 1.0  # bf16 changes some bytes, within the fast paths' bound


def test_rank_ebm_checkpoints_script_scores_the_shipped_ebm():
    if not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found at {FASHION_MNIST}")
    from puregen.models.defaults import default_checkpoint

    r = subprocess.run([sys.executable, str(REPO / "scripts" / "rank_ebm_checkpoints.py"),
                        str(default_checkpoint("ebm")), "--data", str(FASHION_MNIST), "--images", "8",
                        "--with-demo-trigger"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(row["random"]) == 3 and "demo" in row
    # the shipped EBM removes part of every pattern but not all of it (0.4-0.65 on 64 images)
    assert all(0.1 < x < 0.95 for x in row["random"] + [row["demo"]]), row
