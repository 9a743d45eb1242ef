"""`puregen checkpoint init`: write a randomly initialised model."""

from __future__ import annotations

from ..methods.options import PRESETS
from . import EXIT_OK, _Parser


def add_parser(sub) -> None:
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

    from ..models.checkpoints import save_model
    from ..models.ebm import EBM, EBMConfig
    from ..models.unet import UNet2D
    from ..models.unet_config import UNetConfig

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
