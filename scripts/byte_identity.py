"""Digests of every method's output, to show that a refactoring changed no byte.

Runs each method (ebm, ddpm, naive, reps, filt, jpeg) on fixed, non-constant
28x28x1 images with the shipped models and with seeded random `tiny` models,
through the API (`Purifier.purify`) and through the pipeline
(`purify_dataset`), in fp32 and bf16, and records the sha256 of each output.

    python scripts/byte_identity.py --write before.json      # on the old code
    python scripts/byte_identity.py --check before.json      # on the new code: exit 1 on any difference

The step counts are small (the point is every code path, not the dynamics'
length); the results are pinned to the machine type and library versions, as
the noise contract says, so compare on one machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from puregen.api import load_purifier, purify_dataset  # noqa: E402
from puregen.bench.measure import benchmark_images  # noqa: E402
from puregen.data import read_dataset, write_dataset  # noqa: E402

# Short runs of every method; filt takes its threshold from the pipeline's global pass.
OVERRIDES = {
    "ebm": {"steps": 4},
    "ddpm": {"t_star": 4},
    "naive": {"steps": 2, "t_star": 2},
    "reps": {"steps": 2, "t_star": 2, "reps": 2},
    "filt": {"t_star": 3, "filter_frac": 0.5},
    "jpeg": {"jpeg_quality": 60},
}


def images(n: int = 24) -> np.ndarray:
    return benchmark_images(n, seed=11, size=28, channels=1)  # smooth, like pictures; never constant


def tiny_models():
    from puregen.models.ebm import EBM, EBMConfig
    from puregen.models.unet import UNet2D
    from puregen.models.unet_config import UNetConfig

    torch.manual_seed(0)
    return EBM(EBMConfig.tiny(in_channels=1)), UNet2D(UNetConfig.tiny(in_channels=1, sample_size=28))


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def run() -> dict:
    x = images()
    labels = np.arange(len(x)) % 10
    tiny_ebm, tiny_unet = tiny_models()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.npz"
        write_dataset(src, x, labels)
        for models, nets in (("shipped", {}), ("tiny", {"ebm": tiny_ebm, "ddpm": tiny_unet})):
            for precision in ("fp32", "bf16"):
                for method, options in OVERRIDES.items():
                    if method == "jpeg" and (models == "tiny" or precision == "bf16"):
                        continue  # no network: one run says it all
                    load = {**nets, **options, "preset": "paper", "threads": 2, "precision": precision}
                    if method == "jpeg":
                        load.pop("precision")
                    purifier = load_purifier(method, **load)
                    key = f"{models}/{precision}/{method}"
                    if method != "filt":
                        results[f"{key}/api"] = digest(purifier.purify(x, seed=3, batch_size=10))
                    out = Path(tmp) / f"{key.replace('/', '-')}.npz"
                    purify_dataset(src, out, purifier=purifier, seed=3, batch_size=7, chunk_size=16, progress=False)
                    results[f"{key}/pipeline"] = digest(read_dataset(out).images)
                    print(f"{key}: done", file=sys.stderr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="JSON", help="record the digests")
    group.add_argument("--check", metavar="JSON", help="compare with recorded digests (exit 1 on a difference)")
    args = parser.parse_args()
    results = run()
    if args.write:
        Path(args.write).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(results)} digests to {args.write}")
        return 0
    before = json.loads(Path(args.check).read_text())
    changed = sorted(k for k in before.keys() | results.keys() if before.get(k) != results.get(k))
    for k in changed:
        print(f"DIFFERENT: {k}: {before.get(k, 'missing')[:12]} -> {results.get(k, 'missing')[:12]}")
    print(f"{len(results) - len(changed)} of {len(before.keys() | results.keys())} outputs byte-identical")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
