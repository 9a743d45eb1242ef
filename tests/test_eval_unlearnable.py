"""`puregen eval --family unlearnable`: the squeezing baselines (bit depth, grayscale), D-VAE as a defense
fitted on each whole poisoned set, the accuracy table with its clean reference and recovery shares, and
the end-to-end smoke run on real Fashion-MNIST with its resume."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from puregen.api import load_purifier
from puregen.errors import InputError
from puregen.evaluation.report import Cell, markdown_table, recovery_table

from .conftest import FASHION_MNIST, REPO


def cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "puregen.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, check=False)


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7])
def test_bit_depth_rounds_every_value_to_the_nearest_of_its_levels(bits):
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    out = load_purifier("bitdepth", bits=bits).purify(values).reshape(-1).astype(np.int64)
    levels = 2**bits - 1
    grid = np.floor(np.arange(levels + 1) * 255 / levels + 0.5).astype(np.int64)  # the 2**bits output levels
    assert np.array_equal(np.unique(out), grid)
    v = np.arange(256)
    # Nearest level in value space (no value lies exactly halfway for these level counts).
    nearest = grid[np.abs(v[:, None] * levels / 255 - np.arange(levels + 1)[None]).argmin(1)]
    assert np.array_equal(out, nearest)


def test_grayscale_is_pils_luma_and_leaves_grey_images_alone():
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (3, 9, 7, 3), dtype=np.uint8)
    out = load_purifier("grayscale").purify(rgb)
    ref = np.stack([np.asarray(Image.fromarray(img).convert("L")) for img in rgb])
    assert out.shape == rgb.shape and all(np.array_equal(out[..., c], ref) for c in range(3))
    grey = rgb[..., :1]
    assert np.array_equal(load_purifier("grayscale").purify(grey), grey)
    with pytest.raises(InputError, match="4 channels"):
        load_purifier("grayscale").purify(np.zeros((1, 4, 4, 4), np.uint8) + 7)


def test_the_family_picks_its_attacks_and_defenses_and_refuses_mixing():
    import dataclasses

    from puregen.evaluation.defending import defense_spec
    from puregen.evaluation.eval_run import EvalConfig, _names
    from puregen.evaluation.scales import ScaleData, small_settings

    settings = small_settings()

    def data(channels):
        images = np.zeros((4, 8, 8, channels), np.uint8)
        labels = np.arange(4)
        return ScaleData("t", images, labels, images, labels, images, labels, images, labels, tuple("abcd"), "t")

    cfg = EvalConfig(family="unlearnable")
    attacks, defenses = _names(cfg, settings, data(1))
    assert attacks == ["em-sample-8", "em-class-8", "lsp", "ar", "ops"]
    assert defenses == ["none", "jpeg-10", "bitdepth-2", "ebm", "ddpm", "dvae"]
    assert _names(cfg, settings, data(3))[1] == ["none", "jpeg-10", "bitdepth-2", "grayscale", "ebm", "ddpm", "dvae"]
    assert defense_spec("dvae").kind == "fit" and defense_spec("bitdepth-3").bits == 3
    assert defense_spec("bitdepth-2").label() == "Bit depth 2" and defense_spec("dvae").label() == "D-VAE"
    with pytest.raises(InputError, match="other --family"):
        _names(dataclasses.replace(cfg, attacks=("badnets",)), settings, data(1))
    with pytest.raises(InputError, match="other --family"):
        _names(EvalConfig(attacks=("lsp",)), settings, data(1))
    with pytest.raises(InputError, match="drop --full"):
        _names(dataclasses.replace(cfg, full=True), settings, data(1))
    with pytest.raises(InputError, match="unknown --family"):
        _names(EvalConfig(family="backdoors"), settings, data(1))
    for bad in ("bitdepth-0", "bitdepth-8", "bitdepth-x"):
        with pytest.raises(InputError, match="unknown defense"):
            defense_spec(bad)


def test_the_unlearnable_table_trains_its_own_victim_and_epochs_apply_to_it():
    from puregen.evaluation.eval_run import EvalConfig, _settings
    from puregen.evaluation.scales import small_settings

    ue = small_settings().ue_classifier
    assert ue.arch == "small-cnn" and ue.batch_size == 32  # a globally pooled victim, as the papers' ResNet-18
    assert _settings(EvalConfig(family="unlearnable")).classifier == ue
    assert _settings(EvalConfig()).classifier.arch == "fast-cnn"  # the poisoning table keeps its victim
    assert _settings(EvalConfig(family="unlearnable", epochs=3)).classifier.epochs == 3
    assert _settings(EvalConfig(family="unlearnable", smoke=True)).classifier.arch == "small-cnn"
    assert _settings(EvalConfig(scale="paper", family="unlearnable")).classifier.arch == "resnet18"


def test_the_spec_key_of_the_older_defenses_is_unchanged():
    # Run folders written before bit depth existed keep their caches: their spec key has no `bits`.
    from puregen.evaluation.defending import defense_spec

    assert defense_spec("jpeg-75").key_fields() == {"name": "jpeg-75", "kind": "jpeg", "method": "jpeg",
                                                    "quality": 75}
    assert defense_spec("bitdepth-2").key_fields()["bits"] == 2


def _cell(attack, defense, accuracy):
    return Cell(attack, defense, False, 3, 100 - accuracy, 0.5, math.nan, math.nan, accuracy, 0.5,
                availability=True)


def test_the_accuracy_table_and_the_share_won_back():
    cells = [_cell("lsp", "none", 40.0), _cell("lsp", "dvae", 80.0), _cell("lsp", "jpeg-10", 30.0),
             _cell("ops", "none", 20.0), _cell("ops", "dvae", 90.0), _cell("ops", "jpeg-10", 55.0),
             _cell("ar", "none", 89.5), _cell("ar", "dvae", 85.0), _cell("ar", "jpeg-10", 89.0)]
    chance = {"lsp": 10.0, "ops": 10.0, "ar": 10.0}  # the clean victims' error: 90% clean accuracy
    labels = {"lsp": "LSP", "ops": "OPS", "ar": "AR"}
    table = markdown_table(cells, labels, {"dvae": "D-VAE"}, chance)
    assert "| D-VAE | 80.0 ± 0.5 | 90.0 ± 0.5 | 85.0 ± 0.5 |" in table
    assert "| *clean training set* | 90.0 | 90.0 | 90.0 |" in table and "chance" not in table
    shares = recovery_table(cells, labels, {"dvae": "D-VAE", "jpeg-10": "JPEG q10"}, chance)
    # LSP took 50 points (90 -> 40): D-VAE wins back 40 of them (80%), JPEG loses 10 more (-20%).
    # OPS took 70 points: D-VAE wins back all 70 (100%), JPEG 35 (50%).
    # AR took half a point: it did not work, and no share of it is given.
    assert "| *accuracy taken (points)* | 50.0 | 70.0 | 0.5 |" in shares
    assert "| D-VAE | 80 | 100 | - |" in shares and "| JPEG q10 | -20 | 50 | - |" in shares


def test_unlearnable_smoke_run_on_fashion_mnist_and_its_resume(tmp_path):
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not found at {FASHION_MNIST} (set PUREGEN_FASHION_MNIST)")
    out = tmp_path / "ue"
    # The default defenses but the DDPM (the slowest; the same per-row path as the EBM's): `_names` is
    # checked for the default list above.
    args = ("eval", "--family", "unlearnable", "--attacks", "lsp,ops", "--defenses", "jpeg-10,bitdepth-2,ebm,dvae",
            "--smoke", "--data", FASHION_MNIST, "-o", out, "--no-progress", "--threads", "2")
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    for label in ("| None |", "| JPEG q10 |", "| Bit depth 2 |", "| PureGen-EBM |", "| D-VAE |",
                  "| *clean training set* |", "wins back"):
        assert label in r.stdout, label
    assert "Grayscale" not in r.stdout  # grey images: the grayscale baseline has nothing to remove
    result = json.loads((out / "results.json").read_text())
    assert result["setup"]["family"] == "unlearnable" and result["setup"]["base_images"] == 200
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * 2  # 5 defenses (none added) x 2 attacks x 1 smoke seed
    # D-VAE fitted once per poisoned set: one fit folder and one cached purified set per attack.
    (dvae,) = (out / "defended").glob("dvae-*")
    assert len(list(dvae.glob("fit-*"))) == 2 and len(list(dvae.glob("set-*.npz"))) == 2
    # Every row of an unlearnable set is replaced: no defense purified the base set on its own.
    assert not list((out / "defended").glob("*/base.npz"))
    sets = {p.name: p.stat().st_mtime_ns for p in dvae.glob("set-*.npz")}
    before = (out / "results.csv").read_bytes()
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["classifiers_trained"] == 0
    assert (out / "results.csv").read_bytes() == before
    assert {p.name: p.stat().st_mtime_ns for p in dvae.glob("set-*.npz")} == sets  # nothing fitted again


def test_paper_scale_unlearnable_wiring_on_cifar_format_files(tmp_path):
    """The GPU recipe's wiring (CIFAR-10 files, all training images, D-VAE's paper recipe shrunk by --smoke)."""
    from .test_eval_harness import _synthetic_cifar

    data = _synthetic_cifar(tmp_path / "cifar", n_train=100, n_test=40)
    out = tmp_path / "ue"
    r = cli("eval", "--scale", "paper", "--family", "unlearnable", "--attacks", "lsp", "--defenses", "grayscale,dvae",
            "--smoke", "--data", data, "-o", out, "--no-progress", "--threads", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| Grayscale |" in r.stdout and "| D-VAE |" in r.stdout and "No --pood" not in r.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["setup"]["scale"] == "paper" and result["setup"]["base_images"] == 100
    assert result["setup"]["settings"]["dvae_recipe"] == "paper" and result["setup"]["settings"]["ue_base_per_class"] is None
