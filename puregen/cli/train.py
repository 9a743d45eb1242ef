"""`puregen train`: train an EBM, a DDPM or a classifier."""

from __future__ import annotations

import sys

from ..errors import InputError
from . import EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train an EBM, a DDPM, a classifier or a D-VAE (resumable; the run folder is a checkpoint)",
        description="Train a model on a dataset. The run folder holds config.json + model.safetensors "
        "(an EBM or DDPM loads with --ebm/--ddpm) and the training state; --resume continues exactly where it "
        "stopped. Classifiers (small CNN or CIFAR ResNet-18) need labelled data. "
        "dvae fits both D-VAE stages on a labelled (poisoned) set; `puregen purify --method dvae --dvae RUN` "
        "applies them.",
    )
    p.add_argument("kind", choices=("ebm", "ddpm", "classifier", "dvae"))
    p.add_argument("data", help="training dataset (any format `puregen purify` reads)")
    p.add_argument("-o", "--output", required=True, help="run folder (checkpoint) to write")
    p.add_argument("--preset", default="small", choices=("small", "tiny", "paper"),
                   help="recipe: small (CPU, Fashion-MNIST), tiny (tests), paper (published, a GPU job)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--langevin-steps", type=int, help="EBM: Langevin steps per update")
    p.add_argument("--lr-decay-at", metavar="STEP[,STEP...]",
                   help="EBM: multiply the learning rate by 0.1 at each of these steps (default: the preset's; "
                   "'none' for a constant rate)")
    p.add_argument("--ema-decay", type=float,
                   help="EBM: keep an exponential moving average of the weights (e.g. 0.999) and save it "
                   "as the run's model (default: none)")
    p.add_argument("--epochs", type=int, help="classifier, dvae: epochs (dvae: of each stage; default: the preset's)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="bf16: autocast the network to bfloat16 (weights, optimizer and image state stay fp32); "
                   "auto: bf16 where the CPU computes it natively, else fp32. Fixed when the run starts and kept "
                   "on --resume (default: the preset's; auto for the small EBM, else fp32)")
    p.add_argument("--adversarial", type=float, nargs="?", const=8 / 255, metavar="EPS",
                   help="classifier: PGD adversarial training (Madry et al.) within an L-inf budget EPS in [0, 1] "
                        "pixel units (default 8/255; 0.1 is the usual MNIST-family budget)")
    p.add_argument("--adversarial-steps", type=int, help="classifier: PGD steps per batch of --adversarial "
                                                         "(default 10)")
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
TRAIN_OPTIONS = {"ebm": {"steps", "langevin_steps", "lr_decay_at", "ema_decay", "precision"}, "ddpm": {"steps", "precision"},
                 "classifier": {"epochs", "precision", "adversarial_epsilon", "adversarial_steps"},
                 "dvae": {"epochs", "precision"}}


def _decay_steps(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise InputError(f"--lr-decay-at must be step numbers separated by commas (or 'none'), got {text!r}")
    if any(s < 1 for s in steps) or list(steps) != sorted(set(steps)):
        raise InputError(f"--lr-decay-at steps must be positive and increasing, got {text!r}")
    return steps


def _cmd_train(args) -> int:
    import dataclasses

    from ..engine.factory import pin_threads
    from ..training.loop import load_training_data

    if args.checkpoint_every < 1:
        raise InputError(f"--checkpoint-every must be a positive number of steps, got {args.checkpoint_every}")
    pin_threads(args.threads)
    data = load_training_data(args.data, limit=args.limit)
    channels = data.images.shape[1]
    changes = {"batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    specific = {"steps": args.steps, "langevin_steps": args.langevin_steps,
                "lr_decay_at": _decay_steps(args.lr_decay_at), "ema_decay": args.ema_decay,
                "epochs": args.epochs, "precision": args.precision, "adversarial_epsilon": args.adversarial,
                "adversarial_steps": args.adversarial_steps}
    for name, value in specific.items():
        if value is None:
            continue
        if name not in TRAIN_OPTIONS[args.kind]:
            flag = {"adversarial_epsilon": "adversarial"}.get(name, name).replace("_", "-")
            raise InputError(f"--{flag} does not apply to {args.kind} training")
        changes[name] = value
    if args.kind == "ebm":
        from ..training.ebm import EBMRecipe, train_ebm

        recipe, train = EBMRecipe.preset(args.preset, in_channels=channels), train_ebm
    elif args.kind == "ddpm":
        from ..training.ddpm import DDPMRecipe, train_ddpm

        recipe = DDPMRecipe.preset(args.preset, in_channels=channels, sample_size=data.images.shape[-1])
        train = train_ddpm
    elif args.kind == "dvae":
        from ..training.dvae import DVAERecipe, train_dvae

        recipe, train = DVAERecipe.preset(args.preset), train_dvae
    else:
        from ..training.classifier import ClassifierRecipe, train_classifier_run

        recipe, train = ClassifierRecipe.preset(args.preset), train_classifier_run
    recipe = dataclasses.replace(recipe, **{k: v for k, v in changes.items() if v is not None})
    kept = {}
    if args.keep_every is not None:
        if args.kind != "ebm":
            raise InputError(f"--keep-every does not apply to {args.kind} training")
        kept["keep_every"] = args.keep_every
    from ..training.loop import TrainingInterrupted

    try:
        result = train(data, args.output, recipe, resume=args.resume, checkpoint_every=args.checkpoint_every,
                       progress=not args.no_progress, **kept)
    except TrainingInterrupted as e:  # the checkpoint is written: say where, exit 130 (SIGINT) or 143 (SIGTERM)
        print(f"puregen: {e}; rerun with --resume to continue", file=sys.stderr)
        return e.exit_code
    print(f"trained {args.kind} to step {result['step']} in {result['precision']}; checkpoint in {result['run_dir']}")
    return EXIT_OK
