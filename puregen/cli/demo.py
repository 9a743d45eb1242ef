"""`puregen demo`: the end-to-end Fashion-MNIST demo."""

from __future__ import annotations

from ..backends import PRECISIONS
from ..errors import InputError
from . import EXIT_OK


def add_parser(sub) -> None:
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

    from ..evaluation.datasets import default_fashion_mnist_root
    from ..evaluation.demo import DemoConfig, run_demo

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
