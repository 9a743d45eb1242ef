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

    # The bench times one network's steps: the methods that run exactly one network.
    p.add_argument("--method", required=True, choices=[m.name for m in all_methods() if len(m.networks) == 1])
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

    from ..bench.throughput import format_summary, run_bench
    from ..data.atomic import write_json_atomic
    from ..export.commands import int_list

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
