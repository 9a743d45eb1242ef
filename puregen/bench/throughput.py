"""`puregen bench`: purification throughput of a fast path against the reference, from one run.

Three evaluations of the same model, on the same images, micro-batch and
threads:

* `reference`: the `torch` backend in fp32, eager, NCHW (the oracle);
* `bf16-eager`: plain bf16 autocast + channels_last, eager (the easy win a
  user gets without puregen's fast paths; skipped on devices without bf16);
* `fast`: the backend and precision asked for.

Each is timed on `timed_steps` purification steps (network evaluation plus
the fused update), median of `repeats`, after a warm-up that includes any
compilation. Images/s are for the whole purification (150 Langevin steps or
t* = 75 reverse steps, plus the forward noising for the DDPM), from the
median step time; achieved FLOP/s use FLOPs counted on the evaluation that
ran; the ceiling is measured in the same run in the fast path's precision.
"""

from __future__ import annotations

import dataclasses

import torch

from ..backends import build_backend, check_backend
from ..data.convert import to_model_space
from ..engine.factory import pin_threads, resolve_device
from ..engine.noise_key import NoiseKey
from ..engine.provenance import run_provenance
from ..engine.samplers import DiffusionConfig, LangevinConfig, diffuse_denoise, langevin
from ..errors import InputError
from ..methods.registry import configure
from ..models.checkpoints import load_model
from ..models.defaults import default_checkpoint
from ..models.ebm import EBM, EBMConfig
from ..models.unet import UNet2D
from ..models.unet_config import UNetConfig
from .measure import benchmark_images, conv_ceiling, counted_flops, median_seconds

# PureGen on a TPU, CIFAR-10 (50,000 images): 923 s (EBM) and 4181 s (DDPM).
PUBLISHED_IMAGES_PER_SECOND = {"ebm": 50_000 / 923.0, "ddpm": 50_000 / 4181.0}


@dataclasses.dataclass(frozen=True)
class Mode:
    """One way of evaluating the networks: what the benchmarks and the quality bound compare."""

    name: str
    precision: str
    backend: str  # torch (eager), compiled, onnxruntime or tensorrt
    channels_last: bool

    def evaluator(self, ebm, unet, *, device, micro_batch: int):
        return build_backend(self.backend, ebm, unet, device=device, micro_batch=micro_batch,
                             precision=self.precision, channels_last=self.channels_last)


def timed_network(method: str) -> str:
    """The one network a benchmarked method runs (`ebm` or `unet`): the bench times its steps."""
    networks = configure(method, "paper").networks
    if len(networks) != 1:
        raise InputError(f"bench --method {method}: the bench times one network's steps, and {method} runs "
                         f"{len(networks) or 'no'} networks; choose ebm or ddpm")
    return networks[0]


def bench_model(method: str, preset: str, checkpoint: str | None) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """The network to time and its image shape (height, width, channels)."""
    kind = timed_network(method)
    if checkpoint is not None:
        model = load_model(checkpoint, expect=kind).model
    elif preset == "shipped":
        model = load_model(default_checkpoint(kind), expect=kind).model
    elif preset == "paper":
        torch.manual_seed(0)  # random weights: the cost does not depend on them
        model = EBM(EBMConfig.paper()) if kind == "ebm" else UNet2D(UNetConfig.paper())
    else:
        raise InputError(f"unknown bench preset {preset!r}; choose paper or shipped (or pass a checkpoint)")
    cfg = model.config
    size = 28 if preset == "shipped" and checkpoint is None else getattr(cfg, "sample_size", 32)
    return model, (size, size, cfg.in_channels)


def _networks(method: str, model) -> tuple:
    """(ebm, unet) for the evaluator of `method`."""
    return (model, None) if timed_network(method) == "ebm" else (None, model)


def step_flops(method, model, x, device, micro_batch) -> int:
    """FLOPs of one purification step's network evaluation for the batch `x`, counted on the eager fp32 oracle.

    Compiled code calls fused kernels that a dispatch-level counter cannot see;
    it does the same arithmetic, so every mode is credited with these FLOPs.
    """
    evaluator = Mode("count", "fp32", "torch", False).evaluator(*_networks(method, model), device=device,
                                                              micro_batch=micro_batch)
    if timed_network(method) == "ebm":
        return counted_flops(lambda: evaluator.energy_grad(x))
    return counted_flops(lambda: evaluator.epsilon(x, 10))


def time_mode(method, model, mode: Mode, x, *, flop_per_step, device, micro_batch, timed_steps, repeats) -> dict:
    # Images/s are for the method's whole published purification; the timed run is its first steps.
    total_steps = configure(method, "paper").network_evaluations()
    evaluator = mode.evaluator(*_networks(method, model), device=device, micro_batch=micro_batch)
    key = NoiseKey.rows(0, 0, x.shape[0])
    if timed_network(method) == "ebm":
        run = lambda: langevin(x, evaluator, LangevinConfig(steps=timed_steps), key=key)  # noqa: E731
    else:
        run = lambda: diffuse_denoise(x, evaluator, DiffusionConfig(t_star=timed_steps), key=key)  # noqa: E731
    seconds, all_times = median_seconds(run, repeats, device, warmup=1)
    per_step = seconds / timed_steps
    batch = x.shape[0]
    return {
        "mode": mode.name,
        "precision": mode.precision,
        "backend": mode.backend,
        "channels_last": mode.channels_last,
        "compile_state": evaluator.compile_state(),
        "seconds_per_step": per_step,
        "step_times": [t / timed_steps for t in all_times],
        "images_per_second": batch / (per_step * total_steps),
        "flop_per_image": flop_per_step / batch * total_steps,
        "achieved_flop_per_second": flop_per_step / per_step,
    }


def run_bench(
    method: str,
    *,
    preset: str = "paper",
    checkpoint: str | None = None,
    backend: str = "compiled",
    precision: str = "auto",
    batch: int = 64,
    micro_batch: int = 64,
    threads: int | None = None,
    device: str = "cpu",
    timed_steps: int = 5,
    repeats: int = 3,
    log=print,
) -> dict:
    timed_network(method)
    if min(batch, micro_batch, timed_steps, repeats) < 1:
        raise InputError("--batch, --micro-batch, --timed-steps and --repeats must be >= 1")
    dev = resolve_device(device)
    threads = pin_threads(threads)
    fast_precision = check_backend(backend, precision, dev)
    model, (h, w, c) = bench_model(method, preset, checkpoint)
    x = to_model_space(torch.from_numpy(benchmark_images(batch, seed=0, size=h, channels=c)).to(dev))
    flop_per_step = step_flops(method, model, x, dev, micro_batch)

    bf16_ok = dev.type == "cpu" or torch.cuda.is_bf16_supported()
    modes = [Mode("reference", "fp32", "torch", False)]
    if bf16_ok:
        modes.append(Mode("bf16-eager", "bf16", "torch", True))
    if backend == "onnxruntime":  # against torch's own fast path too, in the same run
        modes.append(Mode("compiled", check_backend("compiled", "auto", dev), "compiled", True))
    modes.append(Mode("fast", fast_precision, backend, backend == "compiled"))

    log(f"ceiling: 3x3 conv 128->128, batch 64, 32x32, channels_last, {fast_precision}, median of 10 ...")
    ceiling = conv_ceiling(fast_precision, dev)
    log(f"  {ceiling / 1e9:.1f} GFLOP/s")
    results = {}
    for mode in modes:
        log(f"{mode.name}: {method}, {mode.precision}, {mode.backend}, "
            f"{'channels_last' if mode.channels_last else 'NCHW'}, batch {batch} (micro {micro_batch}), "
            f"{threads} threads, {timed_steps} steps x {repeats} ...")
        results[mode.name] = time_mode(
            method, model, mode, x, flop_per_step=flop_per_step, device=dev, micro_batch=micro_batch,
            timed_steps=timed_steps, repeats=repeats,
        )
        log(f"  {results[mode.name]['images_per_second']:.3f} images/s")
    fast, ref = results["fast"], results["reference"]
    summary = {
        "method": method,
        "preset": preset if checkpoint is None else f"checkpoint {checkpoint}",
        "image_shape": [h, w, c],
        "backend": backend,
        "precision": fast_precision,
        "batch": batch,
        "micro_batch": micro_batch,
        "threads": threads,
        "device": str(dev),
        "timed_steps": timed_steps,
        "repeats": repeats,
        "ceiling_flop_per_second": ceiling,
        "fraction_of_ceiling": fast["achieved_flop_per_second"] / ceiling,
        "ratio_to_reference": fast["images_per_second"] / ref["images_per_second"],
        "ratio_to_bf16_eager": (
            fast["images_per_second"] / results["bf16-eager"]["images_per_second"] if "bf16-eager" in results else None
        ),
        # Only PureGen's two methods have a published rate (diffpure and guided are timed against the reference).
        "ratio_to_published_tpu": (fast["images_per_second"] / PUBLISHED_IMAGES_PER_SECOND[method]
                                   if method in PUBLISHED_IMAGES_PER_SECOND else None),
        "modes": results,
        "provenance": run_provenance(),
    }
    return summary


def format_summary(s: dict) -> str:
    lines = [
        f"puregen bench: {s['method']} ({s['preset']}, images {'x'.join(map(str, s['image_shape']))}), "
        f"batch {s['batch']} (micro {s['micro_batch']}), {s['threads']} threads, {s['device']}",
        f"ceiling ({s['precision']} 3x3 conv): {s['ceiling_flop_per_second'] / 1e9:.1f} GFLOP/s",
        f"{'mode':<11} {'precision':<9} {'backend':<11} {'images/s':>10} {'GFLOP/s':>9} {'s/step':>8}",
    ]
    for m in s["modes"].values():
        lines.append(
            f"{m['mode']:<11} {m['precision']:<9} {m['backend']:<11} {m['images_per_second']:>10.3f} "
            f"{m['achieved_flop_per_second'] / 1e9:>9.1f} {m['seconds_per_step']:>8.4f}"
        )
    fast = s["modes"]["fast"]
    lines.append(
        f"fast path: {fast['images_per_second']:.3f} images/s, {fast['achieved_flop_per_second'] / 1e9:.1f} GFLOP/s = "
        f"{100 * s['fraction_of_ceiling']:.0f}% of the ceiling; {s['ratio_to_reference']:.2f}x the fp32 eager reference"
        + (f", {s['ratio_to_bf16_eager']:.2f}x bf16 autocast + channels_last eager" if s["ratio_to_bf16_eager"] else "")
        + (f"; {s['ratio_to_published_tpu']:.3f}x the published TPU rate "
           f"({PUBLISHED_IMAGES_PER_SECOND[s['method']]:.1f} images/s)" if s["ratio_to_published_tpu"] else "")
    )
    lines.append(f"counted work: {fast['flop_per_image'] / 1e9:.1f} GFLOP per image for the whole purification")
    return "\n".join(lines)



