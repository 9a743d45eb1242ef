"""Kill-and-resume check of `puregen purify`: SIGKILL at a random chunk, then --resume.

Runs the job once uninterrupted, once killed with SIGKILL after a random
number of finished chunks and resumed with `--resume`, and checks the two
output files are byte-identical. Prints the timings.

    python benchmarks/kill_resume.py INPUT WORKDIR --chunk-size 1000 -- --method ebm --preset tiny --ebm CKPT
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _purify_cmd(input_path, out, extra, chunk_size, *more):
    return [sys.executable, "-m", "puregen.cli", "purify", str(input_path), "-o", str(out), *map(str, extra),
            "--chunk-size", str(chunk_size), "--no-progress", *more]


def _run(cmd) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with {r.returncode}:\n{r.stderr}")
    return time.perf_counter() - t0


def kill_and_resume(input_path, workdir, extra, chunk_size: int, num_chunks: int, rng_seed=None) -> dict:
    """Returns the chunk it killed after, the timings, and whether the outputs are byte-identical."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ref, out = workdir / "reference.npz", workdir / "resumed.npz"
    for stale in (ref, out):  # a rerun in the same folder starts from nothing
        for path in (stale, workdir / (stale.name + ".manifest.json")):
            path.unlink(missing_ok=True)
        shutil.rmtree(workdir / (stale.name + ".parts"), ignore_errors=True)
    t_ref = _run(_purify_cmd(input_path, ref, extra, chunk_size))

    # Leave at least one whole chunk after the kill point: a poller descheduled for
    # longer than one chunk must not see the job finish and merge before it acts.
    kill_at = random.Random(rng_seed).randrange(1, max(num_chunks - 1, 2))
    proc = subprocess.Popen(_purify_cmd(input_path, out, extra, chunk_size), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = workdir / (out.name + ".parts")
    t0 = time.perf_counter()
    while proc.poll() is None:
        if len(list(parts.glob("chunk-*.npz"))) >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    t_killed = time.perf_counter() - t0
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the job ended with {proc.returncode} before it could be killed")
    if out.exists():
        raise RuntimeError("a killed job left a merged output behind")
    chunks_on_disk = len(list(parts.glob("chunk-*.npz")))
    t_resume = _run(_purify_cmd(input_path, out, extra, chunk_size, "--resume"))
    manifest = json.loads((workdir / (out.name + ".manifest.json")).read_text())
    return {
        "killed_after_chunks": kill_at,
        "chunks_on_disk_at_kill": chunks_on_disk,
        "num_chunks": num_chunks,
        "images_resumed": manifest["timing"]["images_this_run"],
        "seconds_uninterrupted": round(t_ref, 1),
        "seconds_until_kill": round(t_killed, 1),
        "seconds_resume": round(t_resume, 1),
        "byte_identical": ref.read_bytes() == out.read_bytes(),
        "output_bytes": out.stat().st_size,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input")
    ap.add_argument("workdir")
    ap.add_argument("--chunk-size", type=int, required=True)
    ap.add_argument("--num-images", type=int, required=True, help="images the job purifies (after --limit)")
    ap.add_argument("--seed", type=int, help="seed of the random kill point")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:split])
    extra = argv[split + 1 :]  # the arguments of `puregen purify`, after `--`
    num_chunks = -(-args.num_images // args.chunk_size)
    result = kill_and_resume(args.input, args.workdir, extra, args.chunk_size, num_chunks, args.seed)
    print(json.dumps(result, indent=2))
    return 0 if result["byte_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
