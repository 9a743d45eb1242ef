"""`puregen bench`: purification throughput."""

from __future__ import annotations

from ..backends import PRECISIONS
from ..engine.progress import log_to_stderr
from . import EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="purification throughput: fast path against the fp32 eager reference and the machine's ceiling",
        description="Times purification steps of one model in three modes from one run (the fp32 eager "
        "reference, plain bf16 autocast + channels_last eager, and the fast path asked for) and prints images/s, "
        "counted FLOP/s, the fraction of a 3x3-convolution ceiling measured in the same run, and the ratios.",
    )
    from ..methods.registry import all_methods

    # The bench times one network's steps (the methods that run exactly one network), or D-VAE's own modules.
    p.add_argument("--method", required=True,
                   choices=[m.name for m in all_methods() if len(m.networks) == 1] + ["dvae"])
    p.add_argument("--preset", default="paper", choices=("paper", "shipped", "small"),
                   help="paper: the published architecture (random weights), 32x32x3; shipped: the Fashion-MNIST "
                   "default model, 28x28x1; small (dvae): D-VAE's CPU recipe at 28x28x1 (random weights)")
    p.add_argument("--checkpoint", metavar="CKPT", help="time this checkpoint (dvae: a fitted run folder) instead "
                   "of a preset")
    p.add_argument("--backend", default="compiled", choices=("torch", "compiled", "onnxruntime"),
                   help="fast path backend (onnxruntime: also times the compiled fast path in the same run)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="fast path precision")
    p.add_argument("--batch", default="64", help="images per timed batch; several as 16,64 (default 64)")
    p.add_argument("--micro-batch", type=int, help="network batch shape (default: the batch; dvae: fixed at 32)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all available)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timed-steps", type=int,
                   help="purification steps per timed run (default 5; images/s are for the full 150 steps / "
                   "t*=75; dvae times whole purifications)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode; the median is reported")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    from ..bench.throughput import format_summary, run_bench
    from ..export.commands import int_list

    if args.method == "dvae":
        return _bench_dvae(args)
    summaries = []
    for batch in int_list(args.batch):
        summary = run_bench(
            args.method, preset=args.preset, checkpoint=args.checkpoint, backend=args.backend,
            precision=args.precision, batch=batch, micro_batch=args.micro_batch or batch, threads=args.threads,
            device=args.device, timed_steps=args.timed_steps or 5, repeats=args.repeats, log=log_to_stderr,
        )
        print(format_summary(summary), flush=True)
        summaries.append(summary)
    _write_json(args, summaries)
    return EXIT_OK


def _bench_dvae(args) -> int:
    from ..bench.dvae_throughput import format_dvae_summary, run_dvae_bench
    from ..errors import InputError
    from ..export.commands import int_list

    for flag, value in (("--micro-batch", args.micro_batch), ("--timed-steps", args.timed_steps)):
        if value is not None:
            raise InputError(f"bench --method dvae: {flag} does not apply (D-VAE's micro-batch is fixed at 32 and "
                             "a timed run is one whole purification)")
    summaries = []
    for batch in int_list(args.batch):
        summary = run_dvae_bench(preset=args.preset, checkpoint=args.checkpoint, backend=args.backend,
                                 precision=args.precision, batch=batch, threads=args.threads, device=args.device,
                                 repeats=args.repeats, log=log_to_stderr)
        print(format_dvae_summary(summary), flush=True)
        summaries.append(summary)
    _write_json(args, summaries)
    return EXIT_OK


def _write_json(args, summaries: list[dict]) -> None:
    from pathlib import Path

    from ..data.atomic import write_json_atomic

    if args.json:
        write_json_atomic(Path(args.json), summaries[0] if len(summaries) == 1 else {"runs": summaries})
        print(f"wrote {args.json}")
