"""Memory of decoding images at once: peak RSS against the decoded images' own size.

The case from the security issue: a 7000x7000 1-bit PNG is ~6 KB on the wire and 147 MB as RGB.
Each case runs in a fresh interpreter (peak RSS, VmHWM, reset after the imports) and decodes
``--at-once`` copies in threads through ``labelstudio.images.decode_image``, with the decode budget
the settings describe (``IMAGE_DECODE_CONCURRENCY``, ``IMAGE_DECODE_BUDGET_MB``) or with none.
The baseline of each line is measured in the same run: the RGB bytes the decodes return.
Run from a checkout of older code (no budget: ``--budget-mb 0``) to compare decoders.

    .venv/bin/python bench/bench_decode_memory.py
    .venv/bin/python bench/bench_decode_memory.py --size 5000 --at-once 4
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

CASE = """
import json, sys, threading
from labelstudio import images
decode_image = images.decode_image

path, at_once, budget_mb, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = open(path, "rb").read()
budget = images.DecodeBudget(concurrency, budget_mb * 2**20, 600) if budget_mb > 0 else None

def rss(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))

results = []
def one():
    args = (data, 100_000_000) if budget is None else (data, 100_000_000, budget)
    results.append(decode_image(*args).nbytes)

with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # VmHWM starts again from the current RSS
before = rss("VmRSS")
threads = [threading.Thread(target=one) for _ in range(at_once)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"peak_rise": rss("VmHWM") - before, "result_bytes": results[0]}))
"""


def bilevel_png(size: int) -> bytes:
    """A ``size`` x ``size`` 1-bit PNG of a few shapes (compresses to a few KB)."""
    image = np.zeros((size, size), bool)
    image[size // 4 : size // 2, size // 4 : size * 3 // 4] = True
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def run_case(path: Path, at_once: int, budget_mb: int, concurrency: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CASE, str(path), str(at_once), str(budget_mb), str(concurrency)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=7000, help="image side, pixels")
    parser.add_argument("--at-once", type=int, default=8, help="decodes started together")
    parser.add_argument("--budget-mb", type=int, default=1024, help="IMAGE_DECODE_BUDGET_MB")
    parser.add_argument("--concurrency", type=int, default=2, help="IMAGE_DECODE_CONCURRENCY")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bilevel.png"
        path.write_bytes(bilevel_png(args.size))
        print(f"{args.size}x{args.size} 1-bit PNG: {path.stat().st_size} bytes on the wire")
        cases = [
            ("1 decode", 1, 0),
            (f"{args.at_once} at once, no budget", args.at_once, 0),
        ]
        if args.budget_mb > 0:
            cases.append(
                (
                    f"{args.at_once} at once, budget {args.budget_mb} MB / "
                    f"{args.concurrency} decodes",
                    args.at_once,
                    args.budget_mb,
                )
            )
        for name, at_once, budget_mb in cases:
            result = run_case(path, at_once, budget_mb, args.concurrency)
            own = result["result_bytes"]
            rise = result["peak_rise"]
            print(
                f"{name:<45} peak RSS +{rise / 2**20:7.0f} MiB = {rise / own:5.2f} x one "
                f"decoded RGB image ({own / 2**20:.0f} MiB)"
            )


if __name__ == "__main__":
    main()
