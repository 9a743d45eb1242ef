"""UNet2D: parity with diffusers' UNet2DModel, config handling, diffusers folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from puregen.errors import CheckpointError
from puregen.models.diffusers_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_diffusers_unet,
    save_diffusers_unet,
)
from puregen.bench.flops import count_unet_flops
from puregen.models.unet import UNet2D
from puregen.models.unet_config import UNetConfig

# fp32 parity tolerance (max abs error vs diffusers on outputs of magnitude ~1;
# measured ~1e-6 on CPU): the two implementations do the same float ops in
# nearly the same order, so anything above this is a real mismatch.
PARITY_ATOL = 2e-5


def diffusers_model(cfg: UNetConfig, seed: int) -> UNet2DModel:
    """diffusers' model for ``cfg`` with random weights, norms perturbed off (1, 0)."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}
    ref = UNet2DModel(**kwargs).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:  # GroupNorm weight/bias (norm1, norm2, group_norm, conv_norm_out)
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return ref


def ours_from(ref: UNet2DModel, cfg: UNetConfig) -> UNet2D:
    model = UNet2D(cfg).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def max_err(ref: UNet2DModel, ours: UNet2D, x: torch.Tensor, t) -> float:
    with torch.no_grad():
        want = ref(x, t).sample
        got = ours(x, t)
    assert got.shape == want.shape == (x.shape[0], ours.config.out_channels, *x.shape[2:])
    assert want.abs().max() > 0.1  # a meaningful, non-trivial output
    return (got - want).abs().max().item()


def random_inputs(cfg: UNetConfig, batch: int, side: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=gen)
    t = torch.randint(1, 1000, (batch,), generator=gen)
    return x, t


# ------------------------------------------------------------------ parity


def test_tiny_parity_with_diffusers():
    cfg = UNetConfig.tiny()
    ref = diffusers_model(cfg, seed=0)
    ours = ours_from(ref, cfg)
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters())
    x, t = random_inputs(cfg, batch=3, side=28, seed=1)
    err = max_err(ref, ours, x, t)
    print(f"\ntiny (batch 3, 28x28): max abs error vs diffusers = {err:.3e}")
    assert err < PARITY_ATOL  # tolerance: see PARITY_ATOL (fp32, ~1e-6 measured)


def test_variant_config_parity_with_diffusers():
    """Non-default knobs: DDPM-CIFAR style embedding, padding 0, one head, scaled mid block."""
    cfg = UNetConfig(
        sample_size=16,
        in_channels=3,
        out_channels=2,
        block_out_channels=(16, 32, 48),
        layers_per_block=2,
        down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=None,
        norm_num_groups=8,
        norm_eps=1e-6,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        mid_block_scale_factor=math.sqrt(2.0),
        time_embedding_dim=80,
    )
    ref = diffusers_model(cfg, seed=2)
    ours = ours_from(ref, cfg)
    x, t = random_inputs(cfg, batch=2, side=16, seed=3)
    err = max_err(ref, ours, x, t)
    print(f"\nvariant config: max abs error vs diffusers = {err:.3e}")
    assert err < PARITY_ATOL  # tolerance: see PARITY_ATOL
    # scalar timesteps (python int and 0-d tensor) broadcast like diffusers
    assert max_err(ref, ours, x, 417) < PARITY_ATOL
    assert max_err(ref, ours, x, torch.tensor(417)) < PARITY_ATOL


@pytest.fixture(scope="module")
def paper_pair():
    cfg = UNetConfig.paper()
    ref = diffusers_model(cfg, seed=4)
    return cfg, ref, ours_from(ref, cfg)


def test_paper_parity_and_parameter_count(paper_pair):
    cfg, ref, ours = paper_pair
    n_ref = sum(p.numel() for p in ref.parameters())
    n_ours = ours.num_parameters()
    print(f"\npaper parameters: ours {n_ours:,}, diffusers {n_ref:,}")
    assert n_ours == n_ref
    assert 113.6e6 < n_ours < 113.8e6
    x, t = random_inputs(cfg, batch=2, side=32, seed=5)
    err = max_err(ref, ours, x, t)
    print(f"paper (batch 2, 32x32): max abs error vs diffusers = {err:.3e}")
    assert err < PARITY_ATOL  # tolerance: see PARITY_ATOL (fp32, ~1e-6 measured)


# ------------------------------------------------------------------ FLOPs, shapes


def measured_flops(model: UNet2D, side: int) -> int:
    # The math SDPA backend runs attention as matmuls, which the counter sees.
    x = torch.randn(1, model.config.in_channels, side, side)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([10]))
    return counter.get_total_flops()


def test_count_unet_flops_matches_torch_flop_counter(paper_pair):
    tiny = UNetConfig.tiny()
    assert count_unet_flops(tiny, 28, 28) == measured_flops(UNet2D(tiny), 28)
    cfg, _, ours = paper_pair
    paper_flops = count_unet_flops(cfg, 32, 32)
    print(f"\nFLOPs per image: paper 32x32 {paper_flops / 1e9:.3f} G, tiny 28x28 "
          f"{count_unet_flops(tiny, 28, 28) / 1e9:.3f} G")
    assert paper_flops == measured_flops(ours, 32)
    assert 7.7e9 < paper_flops < 7.9e9


def test_pad_multiple_and_shape_errors():
    tiny = UNet2D(UNetConfig.tiny())
    assert tiny.pad_multiple == 4
    assert UNetConfig.paper().pad_multiple == 32
    with torch.no_grad():
        assert tiny(torch.randn(2, 1, 28, 28), 5).shape == (2, 1, 28, 28)
        assert tiny(torch.randn(1, 1, 12, 20), 5).shape == (1, 1, 12, 20)
        with pytest.raises(ValueError, match="multiples of 4"):
            tiny(torch.randn(1, 1, 30, 28), 5)
        with pytest.raises(ValueError, match="shape"):
            tiny(torch.randn(1, 3, 28, 28), 5)
        with pytest.raises(ValueError, match="timesteps"):
            tiny(torch.randn(2, 1, 28, 28), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="multiples of 32"):
        count_unet_flops(UNetConfig.paper(), 28, 28)


# ------------------------------------------------------------------ config


def test_config_dict_round_trip():
    for cfg in (UNetConfig.paper(), UNetConfig.tiny(), UNetConfig.tiny(in_channels=3, sample_size=32)):
        d = cfg.to_dict()
        assert d["_class_name"] == "UNet2DModel"
        json.dumps(d)  # JSON-ready
        assert UNetConfig.from_dict({**d, "_diffusers_version": "0.42.1", "_name_or_path": "x"}) == cfg
    # keys a config omits take diffusers' defaults
    assert UNetConfig.from_dict({}) == UNetConfig()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]}, "CrossAttnDownBlock2D"),
        ({"up_block_types": ["UpBlock2D", "SkipUpBlock2D", "UpBlock2D"]}, "SkipUpBlock2D"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type"),
        ({"center_input_sample": True}, "center_input_sample"),
        ({"num_class_embeds": 10}, "num_class_embeds"),
        ({"add_attention": False}, "add_attention"),
        ({"downsample_type": "resnet"}, "downsample_type"),
        ({"mystery_option": 1}, "mystery_option"),
        ({"_class_name": "UNet2DConditionModel"}, "UNet2DConditionModel"),
        ({"norm_num_groups": 7}, "norm_num_groups"),
        ({"block_out_channels": [32, 64]}, "same length"),
    ],
)
def test_config_rejects_unsupported_values(change, words):
    d = {**UNetConfig.tiny().to_dict(), **change}
    with pytest.raises(ValueError, match=words):
        UNetConfig.from_dict(d)


# ------------------------------------------------------------------ diffusers folders


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    cfg = UNetConfig.tiny()
    torch.manual_seed(6)
    folder = tmp_path_factory.mktemp("tiny_ckpt")
    save_diffusers_unet(UNet2D(cfg), folder)
    return folder


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_save_load_round_trip(tmp_path):
    cfg = UNetConfig.tiny()
    ref = diffusers_model(cfg, seed=7)
    model = ours_from(ref, cfg)
    save_diffusers_unet(model, tmp_path / "ckpt")
    loaded = load_diffusers_unet(tmp_path / "ckpt")
    assert loaded.config == cfg and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x, t = random_inputs(cfg, 2, 28, seed=8)
    with torch.no_grad():
        assert torch.equal(model(x, t), loaded(x, t))
    # diffusers itself reads what we write (local folder, no network)
    back = UNet2DModel.from_pretrained(tmp_path / "ckpt").eval()
    assert max_err(back, model, x, t) < PARITY_ATOL  # tolerance: see PARITY_ATOL


def test_load_folder_written_by_diffusers(tmp_path):
    cfg = UNetConfig.tiny(in_channels=3, sample_size=32)
    ref = diffusers_model(cfg, seed=9)
    ref.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    model = load_diffusers_unet(tmp_path / "ckpt")
    assert model.config == cfg
    x, t = random_inputs(cfg, 2, 32, seed=10)
    assert max_err(ref, model, x, t) < PARITY_ATOL  # tolerance: see PARITY_ATOL


def test_load_legacy_attention_names(tmp_path, tiny_folder):
    from safetensors.torch import load_file, save_file

    folder = copy_folder(tiny_folder, tmp_path / "legacy")
    state = load_file(str(folder / WEIGHTS_NAME))
    renamed = {}
    for k, v in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        renamed[k] = v
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, str(folder / WEIGHTS_NAME))
    legacy = load_diffusers_unet(folder)
    current = load_diffusers_unet(tiny_folder)
    for k, v in current.state_dict().items():
        assert torch.equal(v, legacy.state_dict()[k]), k


# ------------------------------------------------------------------ checkpoint errors


def assert_checkpoint_error(folder: Path, names: Path, *words: str) -> None:
    with pytest.raises(CheckpointError) as info:
        load_diffusers_unet(folder)
    message = str(info.value)
    assert str(names) in message, message
    for word in words:
        assert word in message, message


def test_error_missing_folder_and_files(tmp_path, tiny_folder):
    assert_checkpoint_error(tmp_path / "nope", tmp_path / "nope", "not found")
    no_weights = copy_folder(tiny_folder, tmp_path / "no_weights")
    (no_weights / WEIGHTS_NAME).unlink()
    assert_checkpoint_error(no_weights, no_weights / WEIGHTS_NAME, "not found")
    no_config = copy_folder(tiny_folder, tmp_path / "no_config")
    (no_config / CONFIG_NAME).unlink()
    assert_checkpoint_error(no_config, no_config / CONFIG_NAME, "not found")


def test_error_truncated_safetensors(tmp_path, tiny_folder):
    folder = copy_folder(tiny_folder, tmp_path / "cut")
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    assert_checkpoint_error(folder, folder / WEIGHTS_NAME, "truncated or corrupt")
    (folder / WEIGHTS_NAME).write_bytes(b"\x00garbage" * 3)
    assert_checkpoint_error(folder, folder / WEIGHTS_NAME, "truncated or corrupt")


def test_error_corrupt_json(tmp_path, tiny_folder):
    folder = copy_folder(tiny_folder, tmp_path / "badjson")
    text = (folder / CONFIG_NAME).read_text()
    (folder / CONFIG_NAME).write_text(text[: len(text) // 2])
    assert_checkpoint_error(folder, folder / CONFIG_NAME, "invalid JSON")


def test_error_unsupported_block_type(tmp_path, tiny_folder):
    folder = copy_folder(tiny_folder, tmp_path / "block")
    d = json.loads((folder / CONFIG_NAME).read_text())
    d["down_block_types"][1] = "CrossAttnDownBlock2D"
    (folder / CONFIG_NAME).write_text(json.dumps(d))
    assert_checkpoint_error(folder, folder / CONFIG_NAME, "CrossAttnDownBlock2D")


def test_error_wrong_shape_and_keys(tmp_path, tiny_folder):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_folder / WEIGHTS_NAME))

    shape = copy_folder(tiny_folder, tmp_path / "shape")
    bad = dict(state)
    bad["conv_in.weight"] = torch.zeros(8, 1, 3, 3)
    save_file(bad, str(shape / WEIGHTS_NAME))
    assert_checkpoint_error(shape, shape / WEIGHTS_NAME, "conv_in.weight", "[8, 1, 3, 3]", "[16, 1, 3, 3]")

    keys = copy_folder(tiny_folder, tmp_path / "keys")
    bad = dict(state)
    del bad["mid_block.attentions.0.to_q.bias"]
    bad["extra.weight"] = torch.zeros(1)
    save_file(bad, str(keys / WEIGHTS_NAME))
    assert_checkpoint_error(
        keys, keys / WEIGHTS_NAME, "missing", "mid_block.attentions.0.to_q.bias", "unexpected", "extra.weight"
    )

    # a config describing another model than the weights: mismatch, not a crash
    other = copy_folder(tiny_folder, tmp_path / "other")
    d = json.loads((other / CONFIG_NAME).read_text())
    d["block_out_channels"] = [32, 128, 128]
    (other / CONFIG_NAME).write_text(json.dumps(d))
    assert_checkpoint_error(other, other / WEIGHTS_NAME, "shape mismatch")
