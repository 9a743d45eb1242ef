"""`puregen eval`: the poison-set format, BadNets, the defenses' per-row caching, the statistics and the
end-to-end command (paper scale on small synthetic CIFAR-10 files, and resuming from the cache)."""

import csv
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from puregen.errors import InputError
from puregen.evaluation.attacks.badnets import checkerboard_patch, craft_badnets
from puregen.evaluation.poison_set import ARRAYS_FILE, META_FILE, PoisonSet, load_poison_set
from puregen.evaluation.report import Row, markdown_table, summarize, wilson_interval, write_report
from puregen.evaluation.triggers import Trigger

from .conftest import REPO, smooth_images


def cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "puregen.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, check=False)


def _backdoor(kind="additive"):
    rng = np.random.default_rng(0)
    images = smooth_images(6, seed=1)
    if kind == "additive":
        trigger, amplify = Trigger(rng.uniform(-0.05, 0.05, (28, 28, 1)).astype(np.float32)), 3.0
    else:
        trigger, amplify = checkerboard_patch((28, 28, 1)), 1.0
    return PoisonSet("narcissus", [5, 1, 9, 30, 2, 7], images, [8] * 6, 8, "abc", {"epsilon": 16 / 255}, 12.5,
                     test_trigger=trigger, test_amplify=amplify)


@pytest.mark.parametrize("kind", ["additive", "patch"])
def test_backdoor_poison_set_round_trips(tmp_path, kind):
    ps = _backdoor(kind)
    ps.save(tmp_path / "p")
    back = load_poison_set(tmp_path / "p")
    assert back.attack == "narcissus" and back.target_class == 8 and back.base_fingerprint == "abc"
    assert np.array_equal(back.images, ps.images) and np.array_equal(back.indices, ps.indices)
    assert np.array_equal(back.labels, ps.labels) and back.crafting_seconds == 12.5
    assert back.test_trigger.kind == kind and back.test_amplify == ps.test_amplify
    test = smooth_images(4, seed=3)
    assert np.array_equal(back.test_trigger.apply(test, back.test_amplify), ps.test_trigger.apply(test, ps.test_amplify))
    assert not back.targeted


def test_targeted_poison_set_round_trips(tmp_path):
    ps = PoisonSet("gradient-matching", [3, 4], smooth_images(2), [2, 2], 2, "f", {"steps": 5}, 1.0,
                   target_index=17, target_true_class=6)
    ps.save(tmp_path / "t")
    back = load_poison_set(tmp_path / "t")
    assert back.targeted and back.target_index == 17 and back.target_true_class == 6 and back.target_class == 2
    meta = json.loads((tmp_path / "t" / META_FILE).read_text())
    assert meta["target"] == {"test_index": 17, "true_class": 6, "adversarial_class": 2}


def test_poisoned_training_set_puts_rows_in_place():
    base = smooth_images(40, seed=4)
    labels = np.arange(40) % 10
    ps = _backdoor()
    images, new_labels = ps.poisoned_training_set(base, labels)
    assert np.array_equal(images[ps.indices], ps.images) and (new_labels[ps.indices] == 8).all()
    others = np.setdiff1d(np.arange(40), ps.indices)
    assert np.array_equal(images[others], base[others]) and np.array_equal(new_labels[others], labels[others])
    assert not np.array_equal(base[ps.indices], ps.images)  # the caller's array is untouched
    defended = 255 - ps.images  # a defense's version of the poisons goes into their rows instead
    images, new_labels = ps.poisoned_training_set(base, labels, poison_images=defended)
    assert np.array_equal(images[ps.indices], defended) and np.array_equal(images[others], base[others])
    assert (new_labels[ps.indices] == 8).all()
    with pytest.raises(InputError, match="replaced by"):
        ps.poisoned_training_set(base, labels, poison_images=defended[:2])
    with pytest.raises(InputError, match="reach row 30"):
        ps.poisoned_training_set(base[:30], labels[:30])


def test_bad_poison_set_files_raise_clear_errors(tmp_path):
    _backdoor().save(tmp_path / "p")
    with pytest.raises(InputError, match="missing"):
        load_poison_set(tmp_path / "nothing")
    (tmp_path / "p" / META_FILE).write_text("{not json")
    with pytest.raises(InputError, match="poison.json"):
        load_poison_set(tmp_path / "p")
    _backdoor().save(tmp_path / "q")
    data = (tmp_path / "q" / ARRAYS_FILE).read_bytes()
    (tmp_path / "q" / ARRAYS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="poison.npz"):
        load_poison_set(tmp_path / "q")
    _backdoor().save(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / META_FILE).read_text())
    meta["count"] = 99
    (tmp_path / "r" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="99"):
        load_poison_set(tmp_path / "r")
    with pytest.raises(InputError, match="distinct"):
        PoisonSet("x", [1, 1], smooth_images(2), [0, 0], 0, "f", target_index=0)
    with pytest.raises(InputError, match="either"):
        PoisonSet("x", [1, 2], smooth_images(2), [0, 0], 0, "f")


def test_badnets_stamps_the_patch_and_flips_labels_of_other_classes():
    images = smooth_images(50, seed=5)
    labels = np.arange(50) % 10
    patch = checkerboard_patch((28, 28, 1), size=4)
    rows, poisoned, new_labels = craft_badnets(images, labels, 3, 10, patch, seed=0)
    assert len(rows) == 10 and (labels[rows] != 3).all() and (new_labels == 3).all()
    inside = patch.mask[..., 0] > 0
    assert inside.sum() == 16
    expected = np.rint(patch.pattern[inside] * 255).astype(np.uint8)
    assert all(np.array_equal(p[inside], expected) for p in poisoned)
    assert np.array_equal(poisoned[:, ~inside], images[rows][:, ~inside])  # only the patch changes
    with pytest.raises(InputError):
        craft_badnets(images, labels, 3, 100, patch, seed=0)


def test_a_patch_trigger_is_stamped_and_an_additive_one_amplified(tmp_path):
    images = smooth_images(3, seed=2)
    patch = checkerboard_patch((28, 28, 1), size=4)
    assert np.array_equal(patch.apply(images), patch.apply(images, 1.0))
    with pytest.raises(InputError, match="cannot be amplified"):
        patch.apply(images, 3.0)
    with pytest.raises(InputError, match="cannot be amplified"):
        PoisonSet("badnets", [1], images[:1], [3], 3, "f", test_trigger=patch, test_amplify=3.0)
    with pytest.raises(InputError, match="saved with its poison set"):
        patch.save(tmp_path / "patch")
    with pytest.raises(InputError, match="needs a mask"):
        Trigger(patch.pattern, kind="patch")
    with pytest.raises(InputError, match="no mask"):
        Trigger(patch.pattern, mask=patch.mask)
    with pytest.raises(InputError, match="kind"):
        Trigger(patch.pattern, kind="blend", mask=patch.mask)
    additive = Trigger(np.full((28, 28, 1), 4 / 255, np.float32), 4 / 255, target=3)
    change = additive.apply(images, 3.0).astype(int) - images
    assert change.max() == 12 and np.array_equal(additive.apply(images).astype(int) - images, np.minimum(4, 255 - images))
    with pytest.raises(InputError, match="pushes towards class 3"):
        PoisonSet("narcissus", [1], images[:1], [5], 5, "f", test_trigger=additive)


def test_wilson_interval_matches_published_values():
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and abs(high - 0.1611) < 1e-3  # 0/20: [0, 16.1%]
    low, high = wilson_interval(10, 20)
    assert abs(low - 0.2993) < 1e-3 and abs(high - 0.7007) < 1e-3
    low, high = wilson_interval(20, 20)
    assert abs(low - 0.8389) < 1e-3 and high == 1.0


def test_summary_and_table_for_backdoor_and_targeted_cells():
    rows = [Row("narcissus", 0, "none", s, 0.8 + s / 100, v, 1.0) for s, v in enumerate((0.7, 0.8, 0.9))]
    rows += [Row("gm", c, "none", c, 0.85, float(c < 5), 1.0, c, 1) for c in range(20)]
    cells = {(c.attack, c.defense): c for c in summarize(rows, {"narcissus": False, "gm": True})}
    nar, gm = cells[("narcissus", "none")], cells[("gm", "none")]
    assert abs(nar.success_mean - 80.0) < 1e-9 and abs(nar.success_std - 10.0) < 1e-9  # sample std, in %
    assert abs(nar.natural_mean - 81.0) < 1e-9
    assert gm.flipped == 5 and gm.n == 20 and abs(gm.success_mean - 25.0) < 1e-9
    assert 0 < gm.success_low < 25 < gm.success_high < 100
    table = markdown_table(list(cells.values()), {"gm": "GM"}, {"none": "None"}, {"gm": 5.0})
    assert "| None | 80.0 ± 10.0 / 81.0 | 25 [" in table and "(5/20) / 85.0 |" in table
    assert "| *chance (clean model)* | - | 5.0 |" in table


def test_both_reports_are_written_by_one_writer(tmp_path):
    result = {"table_markdown": "| a |\n", "setup": {"data": tmp_path}}  # a path is written as its text
    write_report(tmp_path, result, "# report\n")
    assert json.loads((tmp_path / "results.json").read_text()) == {"table_markdown": "| a |\n",
                                                                   "setup": {"data": str(tmp_path)}}
    assert (tmp_path / "results.json").read_text().endswith("}\n")
    assert (tmp_path / "results.md").read_text() == "# report\n"


def test_defended_poison_rows_equal_the_defended_base_rows_they_replace(tmp_path, tiny_models):
    """The cache's premise: a defense transforms each row on its own, keyed by its base-set index."""
    from puregen.evaluation.defending import Checkpoints, DefenseContext, PreparedDefense, defense_spec
    from puregen.evaluation.scales import ScaleData, smoke_settings, small_settings
    from puregen.models.checkpoints import save_model

    ebm, unet = tiny_models
    ckpt = Checkpoints(save_model(ebm, tmp_path / "ebm"), save_model(unet, tmp_path / "ddpm"))
    images = smooth_images(12, seed=6)
    labels = np.arange(12) % 10
    data = ScaleData("small", images, labels, images[:4], labels[:4], images, labels, images, labels,
                     tuple("abcdefghij"), "test data")
    rows = np.array([9, 2, 5])
    fp32 = dataclasses.replace(smoke_settings(small_settings()), precision="fp32")
    ctx = DefenseContext(data, fp32, tmp_path / "out", ckpt, progress=False)
    for name in ("naive", "jpeg-75"):
        defense = PreparedDefense(defense_spec(name), ctx)
        base = defense.base()
        assert not np.array_equal(base, images)
        assert np.array_equal(defense.rows(images[rows], rows, "check"), base[rows])  # fp32: exact
        # read back from the cache, equal again
        assert np.array_equal(PreparedDefense(defense_spec(name), ctx).base(), base)
    # bf16 network kernels are not invariant to a row's position in its micro-batch: the UNet's output can
    # move by one level in a few pixels (the EBM's did not here); the fp32 reference above is exact.
    bf16 = DefenseContext(data, dataclasses.replace(fp32, precision="bf16"), tmp_path / "bf16", ckpt, progress=False)
    defense = PreparedDefense(defense_spec("naive"), bf16)
    diff = np.abs(defense.rows(images[rows], rows, "check").astype(int) - defense.base()[rows])
    assert diff.max() <= 1 and (diff > 0).mean() < 0.05, (diff.max(), (diff > 0).mean())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_naive_starts_from_the_ebm_defenses_states_and_gives_the_same_bytes(tmp_path, tiny_models, precision,
                                                                           monkeypatch):
    """naive = EBM then DDPM: after the ebm defense ran, naive runs only its DDPM stage, with the same result."""
    import torch

    import puregen.methods.builtin.naive as naive_module
    from puregen.engine.noise_key import NoiseKey
    from puregen.evaluation.defending import Checkpoints, DefenseContext, PreparedDefense, defense_spec
    from puregen.evaluation.scales import ScaleData, smoke_settings, small_settings
    from puregen.models.checkpoints import save_model

    ebm, unet = tiny_models
    ckpt = Checkpoints(save_model(ebm, tmp_path / "ebm"), save_model(unet, tmp_path / "ddpm"))
    images = smooth_images(12, seed=8)
    labels = np.arange(12) % 10
    data = ScaleData("small", images, labels, images[:4], labels[:4], images, labels, images, labels,
                     tuple("abcdefghij"), "test data")
    rows = np.array([7, 3, 10])
    settings = dataclasses.replace(smoke_settings(small_settings()), precision=precision)
    alone = DefenseContext(data, settings, tmp_path / "alone", ckpt, progress=False)
    naive_alone = PreparedDefense(defense_spec("naive"), alone)
    expected_base, expected_rows = naive_alone.base(), naive_alone.rows(images[rows], rows, "poisons")

    after = DefenseContext(data, settings, tmp_path / "after-ebm", ckpt, progress=False)
    ebm_defense = PreparedDefense(defense_spec("ebm"), after)
    ebm_defense.base(), ebm_defense.rows(images[rows], rows, "poisons")
    assert len(list(ebm_defense.folder.glob("*-ebm-state.npz"))) == 2
    naive = PreparedDefense(defense_spec("naive"), after)
    assert naive.first_stage_folder == ebm_defense.folder

    def no_langevin(*args, **kwargs):
        raise AssertionError("naive ran its Langevin stage although the ebm defense's states were there")

    monkeypatch.setattr(naive_module, "langevin", no_langevin)
    # The same rows in the same batches and micro-batches as the ebm pass: equal bytes, bf16 included.
    assert np.array_equal(naive.base(), expected_base)
    assert np.array_equal(naive.rows(images[rows], rows, "poisons"), expected_rows)
    with pytest.raises(ValueError, match="no first stage"):
        ebm_defense.purifier.purify_batch(torch.from_numpy(images[:2]), NoiseKey.rows(0, 0, 2),
                                          first_stage_output=torch.zeros(2, 1, 28, 28))


def test_unknown_names_are_rejected():
    from puregen.evaluation.defending import defense_spec

    for bad in ("jpeg-0", "jpeg-x", "median"):
        with pytest.raises(InputError, match="unknown defense"):
            defense_spec(bad)
    r = cli("eval", "--attacks", "nonesuch", "--smoke", "--no-progress")
    assert r.returncode != 0 and "unknown attack" in r.stderr


def _synthetic_cifar(folder, n_train=300, n_test=100):
    from puregen.data.cifar import write_cifar_batch

    rng = np.random.default_rng(0)
    base = folder / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for k, start in enumerate(range(0, n_train, n_train // 2), start=1):
        imgs = np.concatenate([smooth_images(n_train // 2, 32, 32, 1, seed=k)] * 3, axis=3)
        write_cifar_batch(base / f"data_batch_{k}", imgs, rng.integers(0, 10, n_train // 2))
    test = np.concatenate([smooth_images(n_test, 32, 32, 1, seed=9)] * 3, axis=3)
    write_cifar_batch(base / "test_batch", test, rng.integers(0, 10, n_test))
    return base


def test_paper_scale_smoke_run_on_cifar_format_files_and_resume(tmp_path):
    data = _synthetic_cifar(tmp_path / "cifar")
    for kind in ("ebm", "ddpm"):
        r = cli("checkpoint", "init", kind, "--preset", "tiny", "--in-channels", "3", "-o", tmp_path / kind)
        assert r.returncode == 0, r.stderr
    out = tmp_path / "eval"
    args = ("eval", "--scale", "paper", "--data", data, "--ebm", tmp_path / "ebm", "--ddpm", tmp_path / "ddpm",
            "--smoke", "--attacks", "badnets,narcissus-16-1pct,gradient-matching", "--defenses", "jpeg-75,ebm,ddpm",
            "-o", out, "--no-progress", "--threads", "2")
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| PureGen-EBM |" in r.stdout and "Gradient Matching" in r.stdout
    for name in ("results.md", "results.csv", "summary.csv", "results.json", "plots.png"):
        assert (out / name).is_file(), name
    result = json.loads((out / "results.json").read_text())
    assert result["setup"]["scale"] == "paper" and result["setup"]["smoke"]
    assert any("Tiny-ImageNet" in n for n in result["setup"]["notes"])
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # 4 defenses (none added) x (badnets 1 seed + narcissus 1 seed + 2 targets)
    assert len(rows) == 16 and {r["defense"] for r in rows} == {"none", "jpeg-75", "ebm", "ddpm"}
    poisons = sorted(p.name.split("-")[0] for p in (out / "poisons").iterdir())
    assert poisons == ["badnets", "gradient", "narcissus"]
    # 16 rows + 1 clean reference model (1 seed)
    assert result["classifiers_trained"] == 17 and (out / "chance.json").is_file()
    before = (out / "results.csv").read_bytes()
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "results.csv").read_bytes() == before  # every cell came from the cache
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["classifiers_trained"] == 0 and rerun["chance"] == result["chance"]  # the references too
    assert rerun["earlier_timings"] == [result["timings"]]  # the first run's timings survive the rerun
    (out / "chance.json").write_text('{"cut short')
    broken = cli(*args)
    assert broken.returncode != 0 and "chance.json" in broken.stderr and "not valid JSON" in broken.stderr
    assert "Traceback" not in broken.stderr
    assert (out / "results.csv").read_bytes() == before  # nothing written is lost


def test_paper_scale_without_data_or_with_the_wrong_checkpoint_fails_clearly(tmp_path):
    r = cli("eval", "--scale", "paper", "--smoke", "-o", tmp_path / "o", "--no-progress")
    assert r.returncode != 0 and "--data" in r.stderr
    data = _synthetic_cifar(tmp_path / "cifar", n_train=40, n_test=20)
    r = cli("eval", "--scale", "paper", "--data", data, "--smoke", "--attacks", "badnets", "--defenses", "ebm",
            "-o", tmp_path / "o", "--no-progress")
    assert r.returncode != 0
    assert "28x28" in r.stderr or "channel" in r.stderr, r.stderr[-2000:]


def test_missing_matplotlib_is_reported_before_any_work(monkeypatch):
    from puregen.evaluation.report import require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(InputError, match=r"puregen\[eval\]"):
        require_matplotlib()


def test_gradient_matching_augments_as_the_victim_trains():
    from pathlib import Path

    from puregen.evaluation.attack_suite import ATTACKS, AttackContext, _recipes
    from puregen.evaluation.scales import paper_settings, small_settings

    spec = ATTACKS["gradient-matching"]
    for settings, augments in ((small_settings(), False), (paper_settings(), True)):  # no crops/flips; both
        ctx = AttackContext(None, settings, Path("unused"))
        assert _recipes(ctx, spec)["gm"].augment is augments
