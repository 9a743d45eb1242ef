"""The `puregen` command. Exit codes: 0 success, 2 bad usage or bad input, 1 internal failure.

Each subcommand lives in its own module here (its `add_parser(sub)` and `_cmd_*`); `export` is added by
puregen.export.commands.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from ..export.commands import add_export_parser

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own exit code is 2 as well; keep its usage line
        self.print_usage(sys.stderr)
        print(f"puregen: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_INPUT)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    # Imported here, not at the top: the command modules import EXIT_OK and _Parser from this module.
    from . import bench, checkpoint, demo, evaluate, info, purify, train

    parser = _Parser(prog="puregen", description="Purify poisoned image training data with generative dynamics.")
    parser.add_argument("--version", action="version", version=f"puregen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    purify.add_parser(sub)
    info.add_parser(sub)
    checkpoint.add_parser(sub)
    train.add_parser(sub)
    demo.add_parser(sub)
    evaluate.add_parser(sub)
    bench.add_parser(sub)
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
