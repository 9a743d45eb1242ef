"""ONNX export, the onnxruntime backend, and the plain-Python parts of the TensorRT backend."""

import json
import shutil

import numpy as np
import pytest
import torch

from puregen.api import load_purifier
from puregen.cli import main
from puregen.errors import InputError
from puregen.models.ebm import EBM, EBMConfig

from .conftest import needs_onnx, smooth_images

pytestmark = needs_onnx


def _autograd_grad(ebm, x):
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(ebm(x).sum(), x)
    return g


@pytest.mark.parametrize("shape", [(1, 28, 28), (2, 32, 32), (3, 32, 32), (1, 27, 30)])
def test_gradient_graph_equals_autograd(shape, tiny_models):
    from puregen.export.gradient_graph import EnergyGradient

    torch.manual_seed(1)
    ebm = EBM(EBMConfig.tiny(in_channels=shape[0])).eval()
    x = torch.rand(5, *shape) * 2 - 1
    graph = EnergyGradient(ebm, shape)  # traced at another batch size: the batch axis is symbolic
    grad, energy = graph(x)
    ref = _autograd_grad(ebm, x)
    # Same fp32 arithmetic reordered (transposed convolutions for the backward): ~1e-7 of the scale.
    assert torch.allclose(grad, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    assert torch.allclose(energy, ebm(x).reshape(-1), rtol=1e-5, atol=1e-6)
    assert ref.abs().max() > 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_models):
    from puregen.export.onnx_export import export_onnx

    folder = tmp_path_factory.mktemp("onnx")
    ebm, unet = tiny_models
    return folder, export_onnx(ebm, (1, 28, 28), folder), export_onnx(unet, (1, 28, 28), folder)


def test_export_writes_validated_graphs_with_sidecars(exported, tiny_models):
    import onnxruntime as ort

    from puregen.export.onnx_export import torch_reference, weights_fingerprint

    folder, ebm_graph, unet_graph = exported
    for graph, model in ((ebm_graph, tiny_models[0]), (unet_graph, tiny_models[1])):
        side = json.loads((folder / (graph.onnx_path.stem + ".json")).read_text())
        assert side == graph.sidecar
        assert side["weights_fingerprint"] == weights_fingerprint(model)
        assert side["opset"] >= 18 and (folder / side["data_file"]).is_file()
        assert set(side["validation"]["batches"]) == {"1", "7", "64"}
        assert side["validation"]["worst_relative"] <= side["validation"]["tolerance"]
        # Run it ourselves at a batch size the validation did not use.
        session = ort.InferenceSession(str(graph.onnx_path), providers=["CPUExecutionProvider"])
        gen = torch.Generator().manual_seed(3)
        inputs = (torch.rand(5, 1, 28, 28, generator=gen) * 2 - 1,)
        if graph.kind == "unet-eps":
            inputs += (torch.randint(0, 1000, (5,), generator=gen),)
        got = session.run(None, {n: t.numpy() for n, t in zip(graph.input_names, inputs)})
        for g, e in zip(got, torch_reference(graph.kind, model, inputs)):
            assert np.abs(e).max() > 0
            assert np.abs(g - e).max() <= 1e-4 * np.abs(e).max()  # the export's own tolerance


def test_export_over_tolerance_fails_and_writes_nothing(tmp_path, tiny_models, monkeypatch):
    from puregen.export import onnx_export

    real = onnx_export.torch_reference
    monkeypatch.setattr(onnx_export, "torch_reference", lambda *a: [o * 1.01 for o in real(*a)])
    with pytest.raises(onnx_export.ExportError, match="disagrees with the torch model"):
        onnx_export.export_onnx(tiny_models[0], (1, 28, 28), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    ("flip a weight byte", "corrupt or changed"),
    ("truncate the graph", "corrupt or changed"),
    ("delete the weights", "missing"),
    ("garble the sidecar", "unreadable export sidecar"),
    ("other weights", "other weights than the checkpoint"),
    ("other shape", "no export of the ebm-grad graph"),
])
def test_damaged_or_mismatched_exports_are_clear_errors(damage, message, exported, tmp_path, tiny_models):
    from puregen.export.onnx_export import ExportError, load_exported, weights_fingerprint

    folder = _copy(exported[0], tmp_path)
    fingerprint, shape = weights_fingerprint(tiny_models[0]), (1, 28, 28)
    data, graph, side = (folder / f"ebm-grad-1x28x28{s}" for s in (".onnx.data", ".onnx", ".json"))
    if damage == "flip a weight byte":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate the graph":
        graph.write_bytes(graph.read_bytes()[:100])
    elif damage == "delete the weights":
        data.unlink()
    elif damage == "garble the sidecar":
        side.write_text("{not json")
    elif damage == "other weights":
        fingerprint = weights_fingerprint(EBM(EBMConfig.tiny(in_channels=1)))
    elif damage == "other shape":
        shape = (1, 32, 32)
    with pytest.raises(ExportError, match=message):
        load_exported(folder, "ebm-grad", shape, expect_fingerprint=fingerprint)


def test_onnxruntime_backend_matches_torch_within_the_quality_bound(exported, tiny_models):
    from puregen.bench.quality import compare
    from puregen.data.convert import to_model_space

    images = smooth_images(24, seed=4)
    ebm, unet = tiny_models
    out = {}
    for backend in ("torch", "onnxruntime"):
        for method, extra in (("ebm", {"steps": 6}), ("ddpm", {"t_star": 6})):
            p = load_purifier(method, ebm=ebm, ddpm=unet, preset="tiny", micro_batch=8, backend=backend,
                              onnx_dir=exported[0] if backend == "onnxruntime" else None, **extra)
            out[backend, method] = p.purify(images, seed=3)
    for method in ("ebm", "ddpm"):
        a, b = (to_model_space(torch.from_numpy(out[backend, method])) for backend in ("torch", "onnxruntime"))
        stats = compare(a, b)
        assert (out["torch", method] != images).mean() > 0.2  # the purification did something
        assert stats["passes"], stats  # mean <= 1 level, >= 99% of pixels within 2 levels


def test_onnxruntime_refuses_reduced_precision_and_a_mismatched_folder(exported, tmp_path, tiny_models):
    ebm, unet = tiny_models
    with pytest.raises(InputError, match="fp32 graphs"):
        load_purifier("ebm", ebm=ebm, preset="tiny", backend="onnxruntime", precision="bf16")
    other = EBM(EBMConfig.tiny(in_channels=1))
    p = load_purifier("ebm", ebm=other, preset="tiny", backend="onnxruntime", onnx_dir=exported[0], steps=2)
    with pytest.raises(InputError, match="other weights"):
        p.purify(smooth_images(2))


def test_cli_export_then_purify_with_onnxruntime(tmp_path, tiny_checkpoints, capsys):
    ebm, _ = tiny_checkpoints
    out = tmp_path / "graphs"
    assert main(["export", "onnx", "--ebm", str(ebm), "-o", str(out), "--validate-batches", "1,5"]) == 0
    printed = capsys.readouterr().out
    assert "validated against torch fp32" in printed and "batch 5" in printed
    assert main(["export", "onnx", "--ebm", str(ebm), "-o", str(out)]) == 2  # nothing is replaced silently
    assert "--overwrite" in capsys.readouterr().err
    data = tmp_path / "in.npz"
    np.savez(data, x=smooth_images(10), y=np.arange(10))
    args = ["purify", str(data), "--method", "ebm", "--preset", "tiny", "--ebm", str(ebm), "--steps", "3",
            "--backend", "onnxruntime", "--onnx-dir", str(out), "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "a.npz")]) == 0
    manifest = json.loads((tmp_path / "a.npz.manifest.json").read_text())
    assert manifest["config"]["evaluator"]["backend"] == "onnxruntime"
    # A damaged export: exit 2 naming the file, and the finished output is untouched.
    before = (tmp_path / "a.npz").read_bytes()
    (out / "ebm-grad-1x28x28.onnx.data").write_bytes(b"\0" * 10)
    assert main([*args, "-o", str(tmp_path / "a.npz"), "--overwrite"]) == 2
    assert "ebm-grad-1x28x28.onnx.data: corrupt" in capsys.readouterr().err
    assert (tmp_path / "a.npz").read_bytes() == before


def test_bench_times_onnxruntime_against_torch_and_the_compiled_fast_path(tmp_path, tiny_checkpoints, capsys):
    ebm, _ = tiny_checkpoints
    out = tmp_path / "bench.json"
    assert main(["bench", "--method", "ebm", "--checkpoint", str(ebm), "--backend", "onnxruntime", "--batch", "4,8",
                 "--micro-batch", "4", "--timed-steps", "1", "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("of the ceiling") == 2 and "onnxruntime" in text
    runs = json.loads(out.read_text())["runs"]
    assert [r["batch"] for r in runs] == [4, 8]
    for run in runs:
        assert {"reference", "compiled", "fast"} <= set(run["modes"])
        assert run["modes"]["fast"]["backend"] == "onnxruntime" and run["modes"]["compiled"]["backend"] == "compiled"
        assert all(m["images_per_second"] > 0 for m in run["modes"].values())


# ---- TensorRT: the parts that are plain Python (TensorRT itself cannot be installed here) ----


def test_batch_profiles():
    from puregen.export.tensorrt_engines import BatchProfile

    p = BatchProfile.parse("1,16,64")
    assert p == BatchProfile(1, 16, 64)
    spec = {"name": "images", "shape": ["batch", 1, 28, 28]}
    assert p.shapes(spec) == ((1, 1, 28, 28), (16, 1, 28, 28), (64, 1, 28, 28))
    assert BatchProfile.for_micro_batch(8) == BatchProfile(1, 8, 8)
    for bad in ("1,16", "a,b,c", "16,1,64", "0,1,2"):
        with pytest.raises(InputError, match="batch profile|--batch-profile"):
            BatchProfile.parse(bad)
    with pytest.raises(InputError, match="no leading batch axis"):
        p.shapes({"name": "t", "shape": [1, "batch"]})


def test_engine_cache_key_covers_every_field():
    from puregen.export.tensorrt_engines import BatchProfile, engine_cache_key

    base = ("a" * 64, "fp16", BatchProfile(1, 16, 64), "10.7.0", "sm_90")
    key = engine_cache_key(*base)
    assert key == engine_cache_key(*base)
    variants = [("b" * 64,) + base[1:], base[:1] + ("bf16",) + base[2:], base[:2] + (BatchProfile(1, 32, 64),)
                + base[3:], base[:3] + ("10.8.0", "sm_90"), base[:4] + ("sm_89",)]
    assert len({engine_cache_key(*v) for v in variants} | {key}) == 6
    with pytest.raises(InputError, match="precision"):
        engine_cache_key("a", "int8", BatchProfile(1, 1, 1), "10", "sm_90")


def test_engine_cache_refuses_stale_or_damaged_engines(tmp_path):
    from puregen.export.tensorrt_engines import EngineCache

    cache = EngineCache(tmp_path)
    fields = {"onnx_sha256": "a" * 64, "precision": "fp16", "profile": {"min": 1, "opt": 8, "max": 8},
              "tensorrt": "10.7.0", "gpu_arch": "sm_90"}
    assert cache.load("k", fields) is None
    cache.store("k", b"engine bytes", fields)
    assert cache.load("k", fields) == b"engine bytes"
    with pytest.raises(InputError, match="stale TensorRT engine.*tensorrt"):
        cache.load("k", dict(fields, tensorrt="10.8.0"))
    engine, record = cache.paths("k")
    engine.write_bytes(b"engine by")
    with pytest.raises(InputError, match="corrupt or truncated"):
        cache.load("k", fields)
    record.write_text("{")
    with pytest.raises(InputError, match="unreadable engine record"):
        cache.load("k", fields)
    engine.unlink()
    with pytest.raises(InputError, match="missing half"):
        cache.load("k", fields)


def test_tensorrt_absent_is_a_clear_error(tmp_path, tiny_checkpoints, capsys, monkeypatch):
    import importlib.util

    from puregen.export import tensorrt_engines

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else real(name, *a))
    assert "not installed" in tensorrt_engines.unavailable_reason()
    with pytest.raises(tensorrt_engines.TensorRTUnavailable, match="--backend tensorrt is unavailable"):
        tensorrt_engines.import_tensorrt()
    ebm, _ = tiny_checkpoints
    assert main(["export", "tensorrt", "--ebm", str(ebm), "-o", str(tmp_path / "t")]) == 2
    assert "tensorrt is unavailable" in capsys.readouterr().err
    data = tmp_path / "in.npz"
    np.savez(data, x=smooth_images(4))
    assert main(["purify", str(data), "-o", str(tmp_path / "o.npz"), "--method", "ebm", "--ebm", str(ebm),
                 "--backend", "tensorrt", "--no-progress"]) == 2
    assert "tensorrt needs --device cuda" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()
