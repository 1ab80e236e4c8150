"""How much decoding an image file raises a fresh process's peak RSS (Linux's /proc).

``peak_rss_of_decoding(path, decoder)`` runs ``decoder(data, 100_000_000)`` (``"module:name"``)
on the file's bytes in a new interpreter, after its imports, and returns the rise of its peak
resident set, bytes; ``needs_proc`` skips a test where /proc cannot reset the peak.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PEAK_RSS_SCRIPT = """
import importlib
import sys

module, name = sys.argv[2].split(":")
decode = getattr(importlib.import_module(module), name)

def rss(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))

data = open(sys.argv[1], "rb").read()
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # the peak (VmHWM) starts again from the current RSS
before = rss("VmRSS")
decode(data, 100_000_000)
print(rss("VmHWM") - before)
"""


def peak_rss_of_decoding(path: Path, decoder: str = "labelstudio.images:decode_image") -> int:
    """How much decoding the image file at ``path`` raises a fresh process's peak RSS, bytes."""
    return int(
        subprocess.run(
            [sys.executable, "-c", PEAK_RSS_SCRIPT, str(path), decoder],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc"
)
