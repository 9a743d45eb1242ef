"""Fast paths (bf16/fp16 autocast, channels_last, torch.compile) against the fp32 eager oracle."""

import json
import warnings

import numpy as np
import pytest
import torch

from puregen.bench.flops import count_ebm_flops
from puregen.bench.measure import counted_flops
from puregen.bench.quality import FastPath, compare, purify_float
from puregen.cli import main
from puregen.backends import check_backend
from puregen.backends import precision as backend_precision
from puregen.backends.torch_backend import TorchBackend
from puregen.engine.factory import load_purifier
from puregen.engine.pipeline import config_fingerprint
from puregen.errors import InputError
from puregen.models import ebm as ebm_module
from puregen.models.checkpoints import load_model
from puregen.models.defaults import default_checkpoint
from puregen.models.unet import UNet2D
from puregen.models.unet_config import UNetConfig

from .conftest import FASHION_MNIST, smooth_images


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# -- choosing the mode ----------------------------------------------------------------------------


def test_auto_precision_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(backend_precision, "cpu_features", lambda: {"flags": ["avx512f", "avx512_bf16"]})
    assert backend_precision.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(backend_precision, "cpu_features", lambda: {"flags": ["avx2"]})
    assert backend_precision.resolve_precision("auto", cpu) == "fp32"
    assert backend_precision.resolve_precision("bf16", cpu) == "bf16"


def test_bad_backend_and_precision_are_clear_errors():
    with pytest.raises(InputError, match="fp16 needs a CUDA device"):
        check_backend("torch", "fp16", "cpu")
    with pytest.raises(InputError, match="onnxruntime runs the fp32 graphs"):
        check_backend("onnxruntime", "bf16")
    assert check_backend("onnxruntime", "auto") == "fp32"
    with pytest.raises(InputError, match="tensorrt needs --device cuda"):
        check_backend("tensorrt", "fp16", "cpu")
    with pytest.raises(InputError, match="unknown precision"):
        check_backend("torch", "fp8")


def test_failed_compilation_falls_back_to_eager_with_a_warning(monkeypatch, tiny_models):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    ebm, _ = tiny_models
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    compiled = TorchBackend(ebm, compile=True, micro_batch=4)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler here"):
        g = compiled.energy_grad(x)
    assert torch.equal(g, TorchBackend(ebm, micro_batch=4).energy_grad(x))  # eager fallback is the oracle, exactly
    assert compiled.compile_state()["EBM input gradient"].startswith("eager fallback")


def test_precision_and_backend_are_part_of_the_job_fingerprint(tiny_checkpoints):
    ebm_dir, _ = tiny_checkpoints
    fps = {
        (backend, precision): config_fingerprint(
            load_purifier("ebm", ebm=ebm_dir, preset="tiny", backend=backend, precision=precision), 0, 100
        )[0]
        for backend in ("torch", "compiled")
        for precision in ("fp32", "bf16")
    }
    assert len(set(fps.values())) == 4


# -- per-step error on the paper architectures (random weights) -----------------------------------


def test_paper_ebm_gradient_in_bf16_and_compiled_against_fp32():
    torch.manual_seed(0)
    ebm = ebm_module.EBM(ebm_module.EBMConfig.paper())
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    oracle = TorchBackend(ebm, micro_batch=4).energy_grad(x)
    bf16 = TorchBackend(ebm, micro_batch=4, precision="bf16", channels_last=True).energy_grad(x)
    assert _rel(bf16, oracle) < 0.08  # bf16 keeps 8 mantissa bits; measured about 0.04 on this architecture
    compiled = TorchBackend(ebm, micro_batch=4, compile=True, channels_last=True).energy_grad(x)
    assert _rel(compiled, oracle) < 1e-5  # same fp32 arithmetic, other summation order; measured about 5e-7


def test_paper_unet_epsilon_in_bf16_against_fp32():
    torch.manual_seed(0)
    unet = UNet2D(UNetConfig.paper())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    oracle = TorchBackend(unet=unet, micro_batch=2).epsilon(x, 40)
    bf16 = TorchBackend(unet=unet, micro_batch=2, precision="bf16", channels_last=True).epsilon(x, 40)
    assert bf16.dtype == torch.float32 and bf16.is_contiguous()
    assert _rel(bf16, oracle) < 0.05  # GroupNorm and softmax stay fp32 under autocast; measured about 0.01


# -- batch invariance and the quality bound --------------------------------------------------------


@pytest.mark.parametrize("backend,precision", [("torch", "bf16"), ("compiled", "bf16")])
def test_fast_paths_are_batch_invariant(tiny_checkpoints, backend, precision):
    ebm_dir, ddpm_dir = tiny_checkpoints
    p = load_purifier("naive", ebm=ebm_dir, ddpm=ddpm_dir, preset="tiny", steps=3, t_star=3,
                      backend=backend, precision=precision, micro_batch=4)
    images = smooth_images(9, seed=3)
    whole = p.purify(images, seed=5, batch_size=9)
    assert np.array_equal(whole, p.purify(images, seed=5, batch_size=2))
    order = np.arange(9)[::-1]
    assert np.array_equal(whole[order], p.purify(images[order], seed=5, indices=order, batch_size=4))


@pytest.fixture(scope="module")
def real_images():
    from puregen.evaluation.datasets import load_fashion_mnist

    if not FASHION_MNIST.is_dir():
        pytest.skip(f"Fashion-MNIST not found at {FASHION_MNIST} (set PUREGEN_FASHION_MNIST to its directory)")
    return load_fashion_mnist(FASHION_MNIST, "test").images[:8]


@pytest.mark.parametrize("method", ["ebm", "ddpm"])
@pytest.mark.parametrize("path", [FastPath("torch-bf16", "bf16", "torch", True), FastPath("compiled-bf16", "bf16", "compiled", True)],
                         ids=lambda p: p.name)
def test_quality_bound_with_the_shipped_models_on_real_images(real_images, method, path):
    kind = "ebm" if method == "ebm" else "unet"
    model = load_model(default_checkpoint(kind), expect=kind).model
    nets = (model, None) if method == "ebm" else (None, model)
    run = lambda p: purify_float(method, *nets, p, real_images, seed=0, micro_batch=8, device=torch.device("cpu"))  # noqa: E731
    stats = compare(run(FastPath("oracle", "fp32", "torch", False)), run(path))
    # The bound of issue 4: mean <= 1 level, >= 99% of pixels within 2 levels, no NaN (150 steps / t* = 75).
    assert stats["finite"]
    assert stats["mean_levels"] <= 1.0, stats
    assert stats["within_2_levels"] >= 0.99, stats


def test_compare_catches_nan_and_large_differences():
    oracle = torch.rand(2, 1, 4, 4) * 2 - 1
    assert compare(oracle, oracle.clone())["passes"]
    broken = oracle.clone()
    broken[0, 0, 0, 0] = float("nan")
    assert not compare(oracle, broken)["finite"]
    assert not compare(oracle, -oracle)["passes"]


# -- FLOP counting and the bench command --------------------------------------------------------


def test_counted_flops_match_the_architecture_count():
    cfg = ebm_module.EBMConfig.paper()
    ebm = ebm_module.EBM(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ev = TorchBackend(ebm, micro_batch=2)
    forward = counted_flops(lambda: ev.energy(x))
    assert forward == 2 * count_ebm_flops(cfg, 32, 32)  # the counter sees every conv and the linear head
    step = counted_flops(lambda: ev.energy_grad(x))
    assert 1.9 * forward < step < 2.1 * forward  # forward + input-gradient backward, no weight gradients


def test_bench_command_reports_every_mode_and_writes_json(tmp_path, tiny_checkpoints, capsys):
    ebm_dir, _ = tiny_checkpoints
    out = tmp_path / "bench.json"
    rc = main(["bench", "--method", "ebm", "--checkpoint", str(ebm_dir), "--backend", "torch", "--precision", "bf16",
               "--batch", "4", "--micro-batch", "4", "--timed-steps", "1", "--repeats", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "images/s" in text and "of the ceiling" in text and "fp32 eager reference" in text
    summary = json.loads(out.read_text())
    assert set(summary["modes"]) == {"reference", "bf16-eager", "fast"}
    for mode in summary["modes"].values():
        assert mode["images_per_second"] > 0 and mode["achieved_flop_per_second"] > 0
    assert summary["ceiling_flop_per_second"] > 0 and 0 < summary["fraction_of_ceiling"]
    assert summary["ratio_to_reference"] > 0


@pytest.mark.parametrize("method", ["diffpure", "guided"])
def test_bench_times_the_test_time_purifiers_against_the_reference(method, tiny_checkpoints, capsys):
    _, ddpm_dir = tiny_checkpoints
    rc = main(["bench", "--method", method, "--checkpoint", str(ddpm_dir), "--backend", "torch", "--precision", "bf16",
               "--batch", "4", "--micro-batch", "4", "--timed-steps", "1", "--repeats", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "images/s" in text and "fp32 eager reference" in text and "published TPU rate" not in text


def test_bench_rejects_bad_options(capsys):
    assert main(["bench", "--method", "ebm", "--batch", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["bench", "--method", "ddpm", "--preset", "paper", "--backend", "torch",
                     "--precision", "fp16", "--batch", "1"]) == 2


def test_unet_uses_the_fused_group_norm_silu_op_where_it_applies(monkeypatch):
    """On CUDA inference the UNet calls puregen::group_norm_silu; on CPU the op's kernel is the unfused ops."""
    from puregen.models import unet_blocks

    torch.manual_seed(0)
    unet = UNet2D(UNetConfig.tiny(in_channels=1, sample_size=28)).eval()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    t = torch.full((3,), 17)
    with torch.no_grad():
        plain = unet(x, t)
    calls = []
    real_op = unet_blocks.group_norm_silu

    def counting_op(h, norm):
        calls.append(h.shape)
        return real_op(h, norm)

    monkeypatch.setattr(unet_blocks, "_fused_norm_silu_applies", lambda h: True)  # as on a CUDA device
    monkeypatch.setattr(unet_blocks, "group_norm_silu", counting_op)
    with torch.no_grad():
        fused = unet(x, t)
    assert len(calls) == 2 * sum(1 for m in unet.modules() if isinstance(m, unet_blocks.ResBlock)) + 1
    assert _rel(fused, plain) < 1e-5  # the op's CPU kernel is the same torch ops; measured max diff 2e-6
    with torch.no_grad():
        compiled = torch.compile(unet, dynamic=False)(x, t)  # the op's fake implementation lets Inductor trace it
    assert _rel(compiled, plain) < 1e-5  # fp32, other summation order


def test_training_never_takes_the_fused_op():
    from puregen.models import unet_blocks

    x = torch.rand(2, 8, 4, 4)
    with torch.enable_grad():
        assert not unet_blocks._fused_norm_silu_applies(x)
