"""`puregen eval`: attack -> purify -> train -> measure, the defense table."""

from __future__ import annotations

from . import EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="attack -> purify -> train -> measure: the defense table (poison success, natural accuracy)",
        description="Crafts each attack's poisons (cached), applies each defense to the clean base set once and to "
        "each poison set on its own (cached), trains the victim's classifier per cell and seed (or target), and "
        "writes results.csv (one row per classifier), summary.csv, results.md (the table in the layout of the "
        "PureGen paper's Table 1), results.json and plots.png to --out. An interrupted run continues where it "
        "stopped. Default: --scale small, attacks badnets, narcissus-16-1pct; defenses none, "
        "jpeg-75, friends, ebm, ddpm, naive; 3 seeds; 50 targets for the targeted attacks of --full. "
        "--family unlearnable: the unlearnable-example table instead (attacks em-sample-8, em-class-8, lsp, ar, "
        "ops; defenses none, jpeg-10, bitdepth-2, grayscale on colour data, ebm, ddpm, dvae; each cell the "
        "victim's clean test accuracy; at small scale on 5,000 base images). --family adversarial: test-time "
        "purification (diffpure SDE/ODE, guided by pixels or by an adversarially trained network) in front of a "
        "standard classifier, under PGD-EOT through the purifier, BPDA and APGD-CE/DLR-EOT, judged on fresh "
        "purifications (docs/adversarial-purification.md).",
    )
    p.add_argument("--scale", default="small", choices=("small", "paper"),
                   help="small: Fashion-MNIST, 10,000 training images, small CNN (CPU, default); "
                   "paper: CIFAR-10, ResNet-18, published schedules (GPU)")
    p.add_argument("--data", help="small: folder with the Fashion-MNIST IDX files (default: $PUREGEN_FASHION_MNIST "
                   "or ../shared/data/fashion-mnist); paper: folder with the CIFAR-10 python batches")
    p.add_argument("--pood", help="paper: labelled out-of-distribution data for the Narcissus surrogate "
                   "(any format `puregen purify` reads; published: Tiny-ImageNet)")
    p.add_argument("-o", "--out", default="runs/eval", help="folder for caches and the report (default: runs/eval)")
    p.add_argument("--full", action="store_true", help="add Gradient Matching, Narcissus 8/255 and 10%%, Bullseye "
                   "Polytope (linear probe, fine-tune), JPEG q90/50/25, reps and filt")
    p.add_argument("--family", default="poisoning", choices=("poisoning", "unlearnable", "adversarial"),
                   help="poisoning: backdoor and targeted attacks (default); unlearnable: unlearnable examples, "
                   "against the squeezing baselines, PureGen and D-VAE; adversarial: test-time purification under "
                   "adaptive attacks")
    p.add_argument("--attacks", help="comma-separated attacks instead of the default set")
    p.add_argument("--defenses", help="comma-separated defenses instead of the default set (none is always run)")
    p.add_argument("--seeds", type=int, help="classifier seeds per backdoor cell (default 3)")
    p.add_argument("--targets", type=int, help="targets per targeted-attack cell (default 50)")
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

    from ..evaluation.eval_run import EvalConfig, run_eval

    def names(text):
        return tuple(n.strip() for n in text.split(",") if n.strip()) if text else None

    def path(text):
        return Path(text) if text else None

    cfg = EvalConfig(out=Path(args.out), scale=args.scale, data=path(args.data), pood=path(args.pood),
                     full=args.full, family=args.family, attacks=names(args.attacks), defenses=names(args.defenses), seeds=args.seeds,
                     targets=args.targets, epochs=args.epochs, ebm=path(args.ebm), ddpm=path(args.ddpm),
                     threads=args.threads, smoke=args.smoke, progress=not args.no_progress)
    run_eval(cfg)
    print()
    print((cfg.out / "results.md").read_text(), end="")
    others = "results.json" if cfg.family == "adversarial" else "results.csv, summary.csv, results.json, plots.png"
    print(f"report: {cfg.out / 'results.md'}, {others}")
    return EXIT_OK
