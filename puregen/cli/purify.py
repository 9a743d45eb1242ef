"""`puregen purify`: purify a dataset file or folder."""

from __future__ import annotations

from ..backends import BACKENDS, DEFAULT_MICRO_BATCH, PRECISIONS
from ..engine.pipeline import DEFAULT_CHUNK_SIZE
from ..engine.progress import log_to_stderr
from ..errors import InputError
from ..methods.options import PRESETS
from . import EXIT_OK


def add_parser(sub) -> None:
    from ..methods.flags import add_method_flags

    p = sub.add_parser(
        "purify",
        help="purify a dataset file or folder",
        description="Purify a dataset (.npz/.npy, IDX, CIFAR-10 python batches, or an image folder) into OUTPUT "
        "(.npz, .npy or a folder). Resumable: chunks go to OUTPUT.parts/ with a manifest. Each method reads the "
        "options listed for it below; the others are refused.",
    )
    p.add_argument("input", help="dataset file or folder")
    p.add_argument("-o", "--output", required=True, help="output .npz/.npy file or folder")
    p.add_argument("--preset", default="paper", choices=PRESETS, help="hyperparameters (paper = published)")
    add_method_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="images per purifier call (does not change results)")
    p.add_argument("--micro-batch", type=int, default=DEFAULT_MICRO_BATCH,
                   help="fixed network batch shape (part of the result's fingerprint)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="images per resumable chunk")
    p.add_argument("--threads", type=int, help="CPU threads (default: all available; pinned); with --engine ray "
                   "the threads of each actor (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--backend", default="torch", choices=BACKENDS)
    p.add_argument("--onnx-dir", metavar="DIR", help="exported graphs for --backend onnxruntime/tensorrt "
                   "(default: exported on first use into ~/.cache/puregen, or $PUREGEN_CACHE_DIR)")
    p.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local: this process; ray: the chunks purified by Ray actors (pip install 'puregen[ray]'), "
                   "the same files, resume and bytes")
    p.add_argument("--address", help="--engine ray: the Ray cluster to join (default: start a local one)")
    p.add_argument("--num-workers", type=int, default=2, help="--engine ray: purifier actors (default 2)")
    p.add_argument("--format", dest="input_format", help="input format if not detected (npz, npy, idx, cifar, folder, "
                   "parquet, webdataset)")
    p.add_argument("--split", choices=("train", "test"), help="the part of a CIFAR-10 or IDX folder to read "
                   "(default: train where present; the files read are logged)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted job")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output or unfinished job")
    p.add_argument("--limit", type=int, help="purify the first N images only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_purify)


def _cmd_purify(args) -> int:
    from ..api import purify_dataset
    from ..methods.flags import method_options, network_checkpoints
    from ..methods.registry import configure

    options = method_options(args)
    algorithm = configure(args.method, args.preset, **options)  # a flag the method does not read: refused first
    runner = None
    if args.engine == "ray":
        if algorithm.needs_labels:
            raise InputError(f"--engine ray hands its actors images only; method {args.method!r} needs each batch's "
                             "labels: use --engine local")
        from ..distributed.ray_job import RayChunkRunner

        runner = RayChunkRunner(address=args.address, num_workers=args.num_workers)
    elif args.address is not None:
        raise InputError("--address is for --engine ray")
    manifest = purify_dataset(
        args.input, args.output, args.method, **network_checkpoints(args), preset=args.preset, **options,
        seed=args.seed, batch_size=args.batch_size, micro_batch=args.micro_batch, chunk_size=args.chunk_size,
        threads=args.threads if args.threads is not None or runner is None else 1, device=args.device, precision=args.precision, backend=args.backend,
        onnx_dir=args.onnx_dir, resume=args.resume, overwrite=args.overwrite, limit=args.limit,
        input_format=args.input_format, split=args.split, progress=not args.no_progress, log=log_to_stderr,
        chunk_runner=runner,
    )
    timing = manifest.get("timing", {})
    rate = timing.get("images_per_second_this_run")
    print(
        f"wrote {manifest['output']} ({manifest['num_images']} images, method {args.method}"
        + (f", {rate:.1f} images/s" if rate else "")
        + f"); manifest {manifest['output']}.manifest.json"
    )
    return EXIT_OK
