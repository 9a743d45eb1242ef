"""`puregen bench --method dvae`: D-VAE purification throughput against its fp32 eager reference.

D-VAE runs networks of its own (the two fitted stages, see
`puregen.models.dvae_purify`), not an EBM or a UNet behind a backend, so its
modes are the ways those modules can run, timed on the same images, labels,
noise key and threads:

* `reference`: fp32, eager (the oracle the method's bytes are defined by);
* `fast`: the precision asked for (bf16 autocast where the CPU has it), eager:
  what `puregen purify --method dvae --precision P` runs;
* `compiled`: the same modules under `torch.compile` at that precision, with
  `--backend compiled`: what `purify --method dvae --backend compiled` runs.

A timed run is one whole purification of the batch (stage 1, stage 2 and
stage 2's reconstruction: three encoder-decoder passes per image), median of
`repeats` after a warm-up that includes any compilation. FLOPs are counted
on the fp32 reference; the ceiling is the 3x3-convolution rate measured in
the same run in the fast precision.
"""

from __future__ import annotations

import torch

from ..backends import check_backend
from ..engine.factory import OWN_NETWORK_BACKENDS, pin_threads, resolve_device
from ..engine.noise_key import NoiseKey
from ..engine.provenance import run_provenance
from ..errors import InputError
from ..models.dvae import DVAE, DVAEConfig
from ..models.dvae_purify import MICRO_BATCH, purify_two_stage
from .measure import benchmark_images, conv_ceiling, counted_flops, median_seconds

def _preset_config(name: str) -> DVAEConfig:
    """The network of a fitting recipe at its scale's image shape: `paper` at CIFAR-10's, `small` (the CPU
    recipe) at Fashion-MNIST's. Random weights: the cost does not depend on them."""
    from ..training.dvae import DVAERecipe

    recipe = DVAERecipe.preset(name)
    shape = dict(in_channels=3, image_height=32, image_width=32) if name == "paper" else \
        dict(in_channels=1, image_height=28, image_width=28)
    return DVAEConfig(**shape, width=recipe.width, latent_channels=recipe.latent_channels)


PRESETS = ("paper", "small")


def dvae_stages(preset: str, checkpoint: str | None) -> tuple[DVAE, DVAE, str]:
    """The two stages to time and a description of where they came from."""
    if checkpoint is not None:
        from ..training.dvae import load_dvae_run

        stage1, stage2, _ = load_dvae_run(checkpoint)
        return stage1, stage2, f"run {checkpoint}"
    if preset not in PRESETS:
        raise InputError(f"bench --method dvae --preset {preset}: no D-VAE is shipped (it is fitted on the data it "
                         f"purifies); choose --preset {' or '.join(PRESETS)} or --checkpoint RUN")
    torch.manual_seed(0)
    config = _preset_config(preset)
    return DVAE(config).eval(), DVAE(config).eval(), preset


def run_dvae_bench(*, preset: str = "paper", checkpoint: str | None = None, backend: str = "compiled",
                   precision: str = "auto", batch: int = 64, threads: int | None = None, device: str = "cpu",
                   repeats: int = 3, log=print) -> dict:
    if min(batch, repeats) < 1:
        raise InputError("--batch and --repeats must be >= 1")
    if backend not in OWN_NETWORK_BACKENDS:
        raise InputError(f"bench --method dvae --backend {backend}: D-VAE runs its own modules eager or under "
                         f"torch.compile; choose {' or '.join(OWN_NETWORK_BACKENDS)}")
    dev = resolve_device(device)
    threads = pin_threads(threads)
    fast_precision = check_backend("torch", precision, dev)
    stage1, stage2, source = dvae_stages(preset, checkpoint)
    cfg = stage1.config
    stage1, stage2 = stage1.to(dev), stage2.to(dev)
    if cfg.image_width != cfg.image_height:
        raise InputError(f"bench --method dvae times square images; this D-VAE takes "
                         f"{cfg.image_height}x{cfg.image_width}")
    images = benchmark_images(batch, seed=0, size=cfg.image_height, channels=cfg.in_channels)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(dev)
    labels = (torch.arange(batch) % cfg.num_classes).to(dev)
    key = NoiseKey.rows(0, 0, batch)

    flop_per_batch = counted_flops(lambda: purify_two_stage(stage1, stage2, x, labels, key, "fp32"))
    modes = [("reference", "fp32", stage1, stage2)]
    if fast_precision != "fp32" or backend == "torch":
        modes.append(("fast", fast_precision, stage1, stage2))
    if backend == "compiled":
        modes.append(("compiled", fast_precision, torch.compile(stage1), torch.compile(stage2)))

    log(f"ceiling: 3x3 conv 128->128, batch 64, 32x32, channels_last, {fast_precision}, median of 10 ...")
    ceiling = conv_ceiling(fast_precision, dev)
    log(f"  {ceiling / 1e9:.1f} GFLOP/s")
    results = {}
    for name, prec, s1, s2 in modes:
        log(f"{name}: dvae, {prec}, {'torch.compile' if name == 'compiled' else 'eager'}, batch {batch} "
            f"(micro {MICRO_BATCH}), {threads} threads, {repeats} runs ...")
        seconds, times = median_seconds(lambda: purify_two_stage(s1, s2, x, labels, key, prec), repeats, dev,
                                        warmup=1)
        results[name] = {
            "mode": name, "precision": prec, "backend": "compiled" if name == "compiled" else "torch",
            "seconds_per_batch": seconds, "batch_times": times, "images_per_second": batch / seconds,
            "flop_per_image": flop_per_batch / batch, "achieved_flop_per_second": flop_per_batch / seconds,
        }
        log(f"  {results[name]['images_per_second']:.1f} images/s")
    fast = results["compiled" if backend == "compiled" else "fast"]
    ref = results["reference"]
    return {
        "method": "dvae", "preset": source, "image_shape": [cfg.image_height, cfg.image_width, cfg.in_channels],
        "width": cfg.width, "latent_channels": cfg.latent_channels, "backend": backend,
        "precision": fast_precision, "batch": batch, "micro_batch": MICRO_BATCH, "threads": threads,
        "device": str(dev), "repeats": repeats, "ceiling_flop_per_second": ceiling,
        "fraction_of_ceiling": fast["achieved_flop_per_second"] / ceiling,
        "ratio_to_reference": fast["images_per_second"] / ref["images_per_second"],
        "ratio_eager_to_reference": (results["fast"]["images_per_second"] / ref["images_per_second"]
                                     if "fast" in results else 1.0),
        "modes": results, "provenance": run_provenance(),
    }


def format_dvae_summary(s: dict) -> str:
    lines = [
        f"puregen bench: dvae ({s['preset']}, images {'x'.join(map(str, s['image_shape']))}, width {s['width']}, "
        f"latent {s['latent_channels']}), batch {s['batch']} (micro {s['micro_batch']}), {s['threads']} threads, "
        f"{s['device']}",
        f"ceiling ({s['precision']} 3x3 conv): {s['ceiling_flop_per_second'] / 1e9:.1f} GFLOP/s",
        f"{'mode':<11} {'precision':<9} {'backend':<11} {'images/s':>10} {'GFLOP/s':>9}",
    ]
    for m in s["modes"].values():
        lines.append(f"{m['mode']:<11} {m['precision']:<9} {m['backend']:<11} {m['images_per_second']:>10.1f} "
                     f"{m['achieved_flop_per_second'] / 1e9:>9.1f}")
    fast = s["modes"]["compiled" if s["backend"] == "compiled" else "fast"]
    lines.append(f"fast path ({fast['mode']}): {fast['images_per_second']:.1f} images/s, "
                 f"{fast['achieved_flop_per_second'] / 1e9:.1f} GFLOP/s = {100 * s['fraction_of_ceiling']:.0f}% of the "
                 f"ceiling; {s['ratio_to_reference']:.2f}x the fp32 eager reference")
    lines.append(f"counted work: {fast['flop_per_image'] / 1e9:.3f} GFLOP per image for the whole purification "
                 "(three encoder-decoder passes)")
    return "\n".join(lines)
