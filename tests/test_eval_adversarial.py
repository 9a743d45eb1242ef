"""`puregen eval --family adversarial`: the smoke run on real Fashion-MNIST writes every row with its attacks and
fresh-draw judgements, reuses them on a rerun, and refuses the poisoning table's options."""

import json
import subprocess
import sys

import pytest

from puregen.evaluation.adversarial.run import AdversarialSettings, rows_to_run

from .conftest import FASHION_MNIST, REPO


def cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "puregen.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, check=False)


def test_the_rows_of_the_table():
    rows = [(p.name, round(eps, 4), kind) for p, eps, kind in rows_to_run(AdversarialSettings())]
    assert rows[:6] == [(n, 0.0314, "main") for n in ("none", "aux classifier alone", "diffpure SDE", "diffpure ODE",
                                                        "guided MSE", "guided adversarial")]
    assert rows[6:] == [("none", 0.1, "main"), ("diffpure SDE", 0.1, "main"), ("diffpure SDE", 0.0314, "convergence")]


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST not found")
def test_adversarial_smoke_run_and_its_rerun(tmp_path):
    out = tmp_path / "adv"
    r = cli("eval", "--family", "adversarial", "--smoke", "--data", FASHION_MNIST, "-o", out, "--threads", "2",
            "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert len(report["rows"]) == 9 and (out / "models" / "aux" / "model.safetensors").exists()
    for key, row in report["rows"].items():
        attacks = [a for a in ("pgd_eot", "bpda_eot", "apgd_eot") if a in row]
        assert attacks and all(0 <= row[a]["accuracy"] <= 1 for a in attacks)
        assert row["worst"]["accuracy"] <= min(row[a]["accuracy"] for a in attacks) + 1e-9, key
        assert ("bpda_eot" in row) == (row["kind"] == "main" and "diffpure" in key or "guided" in key)
    assert '"adversarial_epsilon": 0.1' in (out / "models" / "aux" / "training_state.json").read_text()
    assert "| diffpure SDE (2x steps, 2x EOT) |" in (out / "results.md").read_text()
    again = cli("eval", "--family", "adversarial", "--smoke", "--data", FASHION_MNIST, "-o", out, "--threads", "2",
                "--no-progress")
    assert again.returncode == 0 and json.loads((out / "results.json").read_text())["rows"] == report["rows"]
    refused = cli("eval", "--family", "adversarial", "--attacks", "lsp", "--smoke", "-o", tmp_path / "x")
    assert refused.returncode == 2 and "do not apply to --family adversarial" in refused.stderr


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST not found")
def test_the_serving_example_runs(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "defended_classifier_example.py"), "--data",
                        str(FASHION_MNIST), "--images", "4", "--reverse-steps", "2", "--pgd-steps", "1", "--eot", "1",
                        "--epochs", "1"], capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no defense: clean" in r.stdout and "diffpure: clean" in r.stdout
    assert (tmp_path / "runs" / "example-classifier" / "model.safetensors").exists()
