"""What a long run shows the user: a progress bar counted in images, and log lines on stderr.

Shared by the bulk pipeline, the worker pool, the evaluation harness and the commands; stdout stays free
for results.
"""

from __future__ import annotations

import sys


def image_progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1,
                bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
