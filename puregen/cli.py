"""The `puregen` command. Exit codes: 0 success, 2 bad usage or bad input, 1 internal failure."""

from __future__ import annotations

import argparse
import json
import sys

from .backends import BACKENDS, DEFAULT_MICRO_BATCH, PRECISIONS, availability
from .config import METHODS, PRESETS, check_options_apply
from .engine.pipeline import DEFAULT_CHUNK_SIZE, log_to_stderr
from .errors import InputError
from .export.commands import add_export_parser

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own exit code is 2 as well; keep its usage line
        self.print_usage(sys.stderr)
        print(f"puregen: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_INPUT)


def _add_purify(sub) -> None:
    p = sub.add_parser(
        "purify",
        help="purify a dataset file or folder",
        description="Purify a dataset (.npz/.npy, IDX, CIFAR-10 python batches, or an image folder) into OUTPUT "
        "(.npz, .npy or a folder). Resumable: chunks go to OUTPUT.parts/ with a manifest.",
    )
    p.add_argument("input", help="dataset file or folder")
    p.add_argument("-o", "--output", required=True, help="output .npz/.npy file or folder")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--ebm", metavar="CKPT", help="EBM checkpoint folder")
    p.add_argument("--ddpm", metavar="CKPT", help="DDPM (UNet) checkpoint folder")
    p.add_argument("--preset", default="paper", choices=PRESETS, help="hyperparameters (paper = published)")
    p.add_argument("--steps", type=int, help="Langevin steps (for reps: per repetition)")
    p.add_argument("--temp", type=float, help="Langevin temperature (default 1e-4, the published value; lower "
                   "pulls harder toward the EBM's modes at the same noise)")
    p.add_argument("--t-star", type=int, help="DDPM diffusion depth t* (reps, filt: their DDPM pass)")
    p.add_argument("--reverse-steps", type=int, help="DDPM reverse steps actually run, spread evenly over the t* "
                   "trained timesteps (respacing; default: all t*)")
    p.add_argument("--reps", type=int, help="repetitions R of the reps method")
    p.add_argument("--filter-frac", type=float, help="share k of highest-energy images that filt purifies")
    p.add_argument("--energy-threshold", type=float, help="fixed energy threshold for filt (no global pass)")
    p.add_argument("--jpeg-quality", type=int, help="JPEG quality for --method jpeg (default 75)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="images per purifier call (does not change results)")
    p.add_argument("--micro-batch", type=int, default=DEFAULT_MICRO_BATCH,
                   help="fixed network batch shape (part of the result's fingerprint)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="images per resumable chunk")
    p.add_argument("--threads", type=int, help="CPU threads (default: all available; pinned)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--backend", default="torch", choices=BACKENDS)
    p.add_argument("--onnx-dir", metavar="DIR", help="exported graphs for --backend onnxruntime/tensorrt "
                   "(default: exported on first use into ~/.cache/puregen, or $PUREGEN_CACHE_DIR)")
    p.add_argument("--engine", default="local", choices=("local", "ray"))
    p.add_argument("--format", dest="input_format", help="input format if not detected (npz, npy, idx, cifar, folder)")
    p.add_argument("--split", choices=("train", "test"), help="the part of a CIFAR-10 or IDX folder to read "
                   "(default: train where present; the files read are logged)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted job")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output or unfinished job")
    p.add_argument("--limit", type=int, help="purify the first N images only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_purify)


def _cmd_purify(args) -> int:
    from .api import purify_dataset

    if args.engine != "local":
        raise InputError("--engine ray is not available in this version; use --engine local")
    check_options_apply(args.method, {
        "steps": args.steps, "temp": args.temp, "t_star": args.t_star, "reverse_steps": args.reverse_steps,
        "reps": args.reps, "filter_frac": args.filter_frac, "energy_threshold": args.energy_threshold,
        "jpeg_quality": args.jpeg_quality})
    manifest = purify_dataset(
        args.input, args.output, args.method, ebm=args.ebm, ddpm=args.ddpm, preset=args.preset,
        steps=args.steps, t_star=args.t_star, reps=args.reps, filter_frac=args.filter_frac,
        energy_threshold=args.energy_threshold, jpeg_quality=args.jpeg_quality,
        reverse_steps=args.reverse_steps, temp=args.temp, seed=args.seed,
        batch_size=args.batch_size, micro_batch=args.micro_batch, chunk_size=args.chunk_size,
        threads=args.threads, device=args.device, precision=args.precision, backend=args.backend,
        onnx_dir=args.onnx_dir, resume=args.resume, overwrite=args.overwrite, limit=args.limit, input_format=args.input_format,
        split=args.split, progress=not args.no_progress, log=log_to_stderr,
    )
    timing = manifest.get("timing", {})
    rate = timing.get("images_per_second_this_run")
    print(
        f"wrote {manifest['output']} ({manifest['num_images']} images, method {args.method}"
        + (f", {rate:.1f} images/s" if rate else "")
        + f"); manifest {manifest['output']}.manifest.json"
    )
    return EXIT_OK


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, devices, backends and CPU features")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args) -> int:
    import torch

    from .engine.provenance import run_provenance

    info = run_provenance()
    from .backends.precision import cpu_has_native_bf16, resolve_precision
    from .kernels import dispatch

    info["backends"] = availability()
    info["precision"] = {
        "auto on cpu": resolve_precision("auto", torch.device("cpu")),
        "cpu native bf16": cpu_has_native_bf16(),
    }
    if torch.cuda.is_available():
        info["precision"]["auto on cuda"] = resolve_precision("auto", torch.device("cuda"))
    info["kernels"] = dispatch.describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    for section, value in info.items():
        if isinstance(value, dict):
            print(f"{section}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{section}: {value}")
    return EXIT_OK


def _add_checkpoint(sub) -> None:
    p = sub.add_parser("checkpoint", help="checkpoint utilities")
    csub = p.add_subparsers(dest="checkpoint_command", required=True, parser_class=_Parser)
    init = csub.add_parser(
        "init", help="write a randomly initialised model (for timing and tests, NOT for purification)"
    )
    init.add_argument("kind", choices=("ebm", "ddpm"))
    init.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    init.add_argument("--preset", default="paper", choices=PRESETS)
    init.add_argument("--in-channels", type=int, help="image channels (default: 3 for paper, 1 for tiny)")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=_cmd_checkpoint_init)


def _cmd_checkpoint_init(args) -> int:
    import torch

    from .models.checkpoints import save_model
    from .models.ebm import EBM, EBMConfig
    from .models.unet import UNet2D, UNetConfig

    channels = args.in_channels or (3 if args.preset == "paper" else 1)
    torch.manual_seed(args.seed)
    if args.kind == "ebm":
        cfg = EBMConfig.paper() if args.preset == "paper" else EBMConfig.tiny()
        model = EBM(EBMConfig(in_channels=channels, nf=cfg.nf))
    else:
        import dataclasses

        cfg = UNetConfig.paper() if args.preset == "paper" else UNetConfig.tiny()
        model = UNet2D(dataclasses.replace(cfg, in_channels=channels, out_channels=channels))
    folder = save_model(model, args.output)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote random-weight {args.kind} ({args.preset}, {channels} channels, {params:,} parameters) to {folder}")
    return EXIT_OK


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train an EBM, a DDPM or a classifier (resumable; the run folder is a checkpoint)",
        description="Train a model on a dataset. The run folder holds config.json + model.safetensors "
        "(an EBM or DDPM loads with --ebm/--ddpm) and the training state; --resume continues exactly where it "
        "stopped. Classifiers (small CNN or CIFAR ResNet-18) need labelled data.",
    )
    p.add_argument("kind", choices=("ebm", "ddpm", "classifier"))
    p.add_argument("data", help="training dataset (any format `puregen purify` reads)")
    p.add_argument("-o", "--output", required=True, help="run folder (checkpoint) to write")
    p.add_argument("--preset", default="small", choices=("small", "tiny", "paper"),
                   help="recipe: small (CPU, Fashion-MNIST), tiny (tests), paper (published, a GPU job)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--langevin-steps", type=int, help="EBM: Langevin steps per update")
    p.add_argument("--ema-decay", type=float,
                   help="EBM: keep an exponential moving average of the weights (e.g. 0.999) and save it "
                   "as the run's model (default: none)")
    p.add_argument("--epochs", type=int, help="classifier: epochs (default: the preset's)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="bf16: autocast the network to bfloat16 (weights, optimizer and image state stay fp32); "
                   "auto: bf16 where the CPU computes it natively, else fp32. Fixed when the run starts and kept "
                   "on --resume (default: the preset's; auto for the small EBM, else fp32)")
    p.add_argument("--limit", type=int, help="use the first N training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads (default: all available)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--keep-every", type=int, metavar="N",
                   help="EBM: also keep the model every N steps in OUTPUT.snapshots/step-N (with --ema-decay, "
                   "the raw weights too), e.g. to rank them with scripts/rank_ebm_checkpoints.py")
    p.add_argument("--resume", action="store_true", help="continue the run in OUTPUT")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)


# The recipe options that only some kinds of training have.
TRAIN_OPTIONS = {"ebm": {"steps", "langevin_steps", "ema_decay", "precision"}, "ddpm": {"steps", "precision"},
                 "classifier": {"epochs", "precision"}}


def _cmd_train(args) -> int:
    import dataclasses

    from .engine.factory import pin_threads
    from .training.loop import load_training_data

    if args.checkpoint_every < 1:
        raise InputError(f"--checkpoint-every must be a positive number of steps, got {args.checkpoint_every}")
    pin_threads(args.threads)
    data = load_training_data(args.data, limit=args.limit)
    channels = data.images.shape[1]
    changes = {"batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    specific = {"steps": args.steps, "langevin_steps": args.langevin_steps, "ema_decay": args.ema_decay,
                "epochs": args.epochs, "precision": args.precision}
    for name, value in specific.items():
        if value is None:
            continue
        if name not in TRAIN_OPTIONS[args.kind]:
            raise InputError(f"--{name.replace('_', '-')} does not apply to {args.kind} training")
        changes[name] = value
    if args.kind == "ebm":
        from .training.ebm import EBMRecipe, train_ebm

        recipe, train = EBMRecipe.preset(args.preset, in_channels=channels), train_ebm
    elif args.kind == "ddpm":
        from .training.ddpm import DDPMRecipe, train_ddpm

        recipe = DDPMRecipe.preset(args.preset, in_channels=channels, sample_size=data.images.shape[-1])
        train = train_ddpm
    else:
        from .training.classifier import ClassifierRecipe, train_classifier_run

        recipe, train = ClassifierRecipe.preset(args.preset), train_classifier_run
    recipe = dataclasses.replace(recipe, **{k: v for k, v in changes.items() if v is not None})
    kept = {}
    if args.keep_every is not None:
        if args.kind != "ebm":
            raise InputError(f"--keep-every does not apply to {args.kind} training")
        kept["keep_every"] = args.keep_every
    from .training.loop import TrainingInterrupted

    try:
        result = train(data, args.output, recipe, resume=args.resume, checkpoint_every=args.checkpoint_every,
                       progress=not args.no_progress, **kept)
    except TrainingInterrupted as e:  # the checkpoint is written: say where, exit 130 (SIGINT) or 143 (SIGTERM)
        print(f"puregen: {e}; rerun with --resume to continue", file=sys.stderr)
        return e.exit_code
    print(f"trained {args.kind} to step {result['step']} in {result['precision']}; checkpoint in {result['run_dir']}")
    return EXIT_OK


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="poison Fashion-MNIST, purify with the shipped EBM and DDPM, train, print the defense table",
        description="The end-to-end demo on real data: a Fashion-MNIST training subset gets the shipped "
        "clean-label trigger on 1%% of its images, is purified with the shipped EBM and DDPM, and a small CNN "
        "is trained on the raw and each purified set per seed. Prints poison success and natural accuracy; "
        "writes results.json, results.md and examples.png to --out.",
    )
    p.add_argument("--data", help="folder with the Fashion-MNIST IDX files "
                   "(default: $PUREGEN_FASHION_MNIST or ../shared/data/fashion-mnist)")
    p.add_argument("-o", "--out", default="runs/demo", help="folder for the report (default: runs/demo)")
    p.add_argument("--subset", type=int, help="training images, 10%% per class (default 1000)")
    p.add_argument("--seeds", type=int, help="classifier seeds (default 3)")
    p.add_argument("--epochs", type=int, help="classifier epochs (default: the demo's)")
    p.add_argument("--trigger", help="a shipped trigger's name or a trigger folder")
    p.add_argument("--amplify", type=float, help="test-time trigger multiplier (default 3, as Narcissus)")
    p.add_argument("--ebm-steps", type=int, help="EBM Langevin steps (default 150, the published value)")
    p.add_argument("--ebm-temp", type=float, help="EBM Langevin temperature (default 1e-4, the published value)")
    p.add_argument("--t-star", type=int, help="DDPM diffusion depth (default 75, the published value)")
    p.add_argument("--ebm", metavar="CKPT", help="EBM checkpoint folder (default: the shipped EBM)")
    p.add_argument("--ddpm", metavar="CKPT", help="DDPM checkpoint folder (default: the shipped DDPM)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="network precision for purification (default fp32, the reference; bf16 is about 2x faster)")
    p.add_argument("--backend", default="torch", choices=("torch", "compiled"),
                   help="network evaluation for purification (default torch, eager)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the main process (default 2)")
    p.add_argument("--workers", type=int, default=2,
                   help="1-thread processes for the DDPM purification (default 2; 1 runs it in this process)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    import dataclasses
    from pathlib import Path

    from .evaluation.datasets import default_fashion_mnist_root
    from .evaluation.demo import DemoConfig, run_demo

    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    cfg = DemoConfig(data=Path(args.data) if args.data else default_fashion_mnist_root(), out=Path(args.out),
                     threads=args.threads, workers=args.workers, progress=not args.no_progress,
                     precision=args.precision, backend=args.backend)
    changes = {"subset": args.subset, "trigger": args.trigger, "amplify": args.amplify,
               "ebm_steps": args.ebm_steps, "ebm_temp": args.ebm_temp, "ddpm_t_star": args.t_star,
               "ebm": Path(args.ebm) if args.ebm else None, "ddpm": Path(args.ddpm) if args.ddpm else None}
    if args.seeds is not None:
        if args.seeds < 1:
            raise InputError(f"--seeds must be at least 1, got {args.seeds}")
        changes["seeds"] = tuple(range(args.seeds))
    if args.epochs is not None:
        changes["classifier"] = dataclasses.replace(cfg.classifier, epochs=args.epochs)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    run_demo(cfg)
    print()
    print((cfg.out / "results.md").read_text(), end="")
    print(f"report: {cfg.out / 'results.md'}, {cfg.out / 'results.json'}, {cfg.out / 'examples.png'}")
    return EXIT_OK


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="attack -> purify -> train -> measure: the defense table (poison success, natural accuracy)",
        description="Crafts each attack's poisons (cached), applies each defense to the clean base set once and to "
        "each poison set on its own (cached), trains the victim's classifier per cell and seed (or target), and "
        "writes results.csv (one row per classifier), summary.csv, results.md (the table in the layout of the "
        "PureGen paper's Table 1), results.json and plots.png to --out. An interrupted run continues where it "
        "stopped. Default: --scale small, attacks badnets, narcissus-16-1pct, gradient-matching; defenses none, "
        "jpeg-75, friends, ebm, ddpm, naive; 3 seeds, 20 targets.",
    )
    p.add_argument("--scale", default="small", choices=("small", "paper"),
                   help="small: Fashion-MNIST, 10,000 training images, small CNN (CPU, default); "
                   "paper: CIFAR-10, ResNet-18, published schedules (GPU)")
    p.add_argument("--data", help="small: folder with the Fashion-MNIST IDX files (default: $PUREGEN_FASHION_MNIST "
                   "or ../shared/data/fashion-mnist); paper: folder with the CIFAR-10 python batches")
    p.add_argument("--pood", help="paper: labelled out-of-distribution data for the Narcissus surrogate "
                   "(any format `puregen purify` reads; published: Tiny-ImageNet)")
    p.add_argument("-o", "--out", default="runs/eval", help="folder for caches and the report (default: runs/eval)")
    p.add_argument("--full", action="store_true", help="add Narcissus 8/255 and 10%%, Bullseye Polytope (linear "
                   "probe, fine-tune), JPEG q90/50/25, reps and filt")
    p.add_argument("--attacks", help="comma-separated attacks instead of the default set")
    p.add_argument("--defenses", help="comma-separated defenses instead of the default set (none is always run)")
    p.add_argument("--seeds", type=int, help="classifier seeds per backdoor cell (default 3)")
    p.add_argument("--targets", type=int, help="targets per targeted-attack cell (default 20)")
    p.add_argument("--epochs", type=int, help="victim classifier epochs (default: the scale's)")
    p.add_argument("--ebm", metavar="CKPT", help="EBM checkpoint folder (default: the shipped Fashion-MNIST EBM)")
    p.add_argument("--ddpm", metavar="CKPT", help="DDPM checkpoint folder (default: the shipped Fashion-MNIST DDPM)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all available)")
    p.add_argument("--smoke", action="store_true", help="every stage at its smallest size: checks that the "
                   "pipeline runs, the numbers mean nothing")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from pathlib import Path

    from .evaluation.eval_run import EvalConfig, run_eval

    def names(text):
        return tuple(n.strip() for n in text.split(",") if n.strip()) if text else None

    def path(text):
        return Path(text) if text else None

    cfg = EvalConfig(out=Path(args.out), scale=args.scale, data=path(args.data), pood=path(args.pood),
                     full=args.full, attacks=names(args.attacks), defenses=names(args.defenses), seeds=args.seeds,
                     targets=args.targets, epochs=args.epochs, ebm=path(args.ebm), ddpm=path(args.ddpm),
                     threads=args.threads, smoke=args.smoke, progress=not args.no_progress)
    run_eval(cfg)
    print()
    print((cfg.out / "results.md").read_text(), end="")
    print(f"report: {cfg.out / 'results.md'}, results.csv, summary.csv, results.json, plots.png")
    return EXIT_OK


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="purification throughput: fast path against the fp32 eager reference and the machine's ceiling",
        description="Times purification steps of one model in three modes from one run (the fp32 eager "
        "reference, plain bf16 autocast + channels_last eager, and the fast path asked for) and prints images/s, "
        "counted FLOP/s, the fraction of a 3x3-convolution ceiling measured in the same run, and the ratios.",
    )
    p.add_argument("--method", required=True, choices=("ebm", "ddpm"))
    p.add_argument("--preset", default="paper", choices=("paper", "shipped"),
                   help="paper: the published architecture (random weights), 32x32x3; shipped: the Fashion-MNIST "
                   "default model, 28x28x1")
    p.add_argument("--checkpoint", metavar="CKPT", help="time this checkpoint instead of a preset")
    p.add_argument("--backend", default="compiled", choices=("torch", "compiled", "onnxruntime"),
                   help="fast path backend (onnxruntime: also times the compiled fast path in the same run)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="fast path precision")
    p.add_argument("--batch", default="64", help="images per timed batch; several as 16,64 (default 64)")
    p.add_argument("--micro-batch", type=int, help="network batch shape (default: the batch)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all available)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timed-steps", type=int, default=5,
                   help="purification steps per timed run (images/s are for the full 150 steps / t*=75)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode; the median is reported")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    from pathlib import Path

    from .bench.throughput import format_summary, run_bench
    from .engine.pipeline import write_json_atomic

    from .export.commands import int_list

    summaries = []
    for batch in int_list(args.batch):
        summary = run_bench(
            args.method, preset=args.preset, checkpoint=args.checkpoint, backend=args.backend,
            precision=args.precision, batch=batch, micro_batch=args.micro_batch or batch, threads=args.threads,
            device=args.device, timed_steps=args.timed_steps, repeats=args.repeats, log=log_to_stderr,
        )
        print(format_summary(summary), flush=True)
        summaries.append(summary)
    if args.json:
        write_json_atomic(Path(args.json), summaries[0] if len(summaries) == 1 else {"runs": summaries})
        print(f"wrote {args.json}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="puregen", description="Purify poisoned image training data with generative dynamics.")
    parser.add_argument("--version", action="version", version=f"puregen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_purify(sub)
    _add_info(sub)
    _add_checkpoint(sub)
    _add_train(sub)
    _add_demo(sub)
    _add_eval(sub)
    _add_bench(sub)
    add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InputError as e:
        print(f"puregen: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as e:
        # The file system refused (disk full, permission, a path that cannot exist): the user's to fix.
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"puregen: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("puregen: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - any other failure is ours: say so, exit 1
        import traceback

        traceback.print_exc()
        print(f"puregen: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
