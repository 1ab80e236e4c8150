"""Fetch official SAM, MobileSAM, HQ-SAM and SAM 2.1 checkpoints, each verified against a pinned
SHA-256 (the Docker build's ``SAM_CHECKPOINTS``). Standard library only: it runs before the
project is copied in.

    python deploy/checkpoints.py --dest /models vit_b vit_t sam2.1_hiera_tiny
    SAM_CHECKPOINT_SHA256="hq_vit_b=<64 hex digits>" python deploy/checkpoints.py --dest /models hq_vit_b

``CHECKPOINTS`` is the one table of names, URLs and pins. A file is downloaded beside its target,
hashed, and renamed into place only if it matches; a mismatch removes it and fails. A name whose
full SHA-256 was not found in a public source has no pin: it is refused before any download
unless ``SAM_CHECKPOINT_SHA256`` gives one (``name=hex``, space-separated for several), or the
file is mounted into the container instead (``SAM_CHECKPOINT=/path``). A given hash never
overrides a pin. The hex in SAM's file names (``sam_vit_b_01ec64``) is not a SHA-256 prefix.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

ENV_SHA256 = "SAM_CHECKPOINT_SHA256"
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Checkpoint:
    """One downloadable checkpoint: where it is and, if known, its full SHA-256 (with where that
    value was published)."""

    url: str
    sha256: str | None
    source: str = ""

    @property
    def filename(self) -> str:
        return Path(urlparse(self.url).path).name


FBAI = "https://dl.fbaipublicfiles.com/segment_anything"
FBAI_SAM2 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"
HQ = "https://huggingface.co/lkeab/hq-sam/resolve/main"
MICRO_SAM = "computational-cell-analytics/micro-sam micro_sam/util.py"
# Its SAM 2.1 download table (HASHES of hvit_t / hvit_s / hvit_b / hvit_l, checked by pooch).
MICRO_SAM_V2 = "computational-cell-analytics/micro-sam micro_sam/v2/util.py"
REFINERS = "finegrain-ai/refiners src/refiners/conversion/models"

CHECKPOINTS: dict[str, Checkpoint] = {
    "vit_b": Checkpoint(
        f"{FBAI}/sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        MICRO_SAM,
    ),
    "vit_l": Checkpoint(
        f"{FBAI}/sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        MICRO_SAM,
    ),
    "vit_h": Checkpoint(
        f"{FBAI}/sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        f"{MICRO_SAM}; {REFINERS}/sam.py",
    ),
    "vit_t": Checkpoint(
        "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        MICRO_SAM,
    ),
    "hq_vit_h": Checkpoint(
        f"{HQ}/sam_hq_vit_h.pth",
        "a7ac14a085326d9fa6199c8c698c4f0e7280afdbb974d2c4660ec60877b45e35",
        f"{REFINERS}/hq_sam.py",
    ),
    "sam2.1_hiera_tiny": Checkpoint(
        f"{FBAI_SAM2}/sam2.1_hiera_tiny.pt",
        "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
        MICRO_SAM_V2,
    ),
    "sam2.1_hiera_small": Checkpoint(
        f"{FBAI_SAM2}/sam2.1_hiera_small.pt",
        "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
        MICRO_SAM_V2,
    ),
    "sam2.1_hiera_base_plus": Checkpoint(
        f"{FBAI_SAM2}/sam2.1_hiera_base_plus.pt",
        "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",
        MICRO_SAM_V2,
    ),
    "sam2.1_hiera_large": Checkpoint(
        f"{FBAI_SAM2}/sam2.1_hiera_large.pt",
        "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318",
        MICRO_SAM_V2,
    ),
    # No full SHA-256 found in a public source: refused unless SAM_CHECKPOINT_SHA256 gives one.
    "hq_vit_b": Checkpoint(f"{HQ}/sam_hq_vit_b.pth", None),
    "hq_vit_l": Checkpoint(f"{HQ}/sam_hq_vit_l.pth", None),
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be fetched verified (unknown, unpinned, or not matching)."""


def parse_hashes(text: str) -> dict[str, str]:
    """``SAM_CHECKPOINT_SHA256``'s ``name=hex`` pairs (space- or comma-separated)."""
    hashes = {}
    for item in text.replace(",", " ").split():
        name, sep, value = item.partition("=")
        value = value.strip().lower()
        if not sep or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise CheckpointError(f"{ENV_SHA256}: {item!r} is not name=<64 hex digits>")
        hashes[name] = value
    return hashes


def expected_sha256(name: str, given: dict[str, str]) -> str:
    """The SHA-256 ``name`` must have: its pin, or the one given for an unpinned name."""
    if name not in CHECKPOINTS:
        raise CheckpointError(f"unknown checkpoint {name!r}; expected one of {list(CHECKPOINTS)}")
    pin = CHECKPOINTS[name].sha256
    if pin is not None:
        if name in given and given[name] != pin:
            raise CheckpointError(
                f"{ENV_SHA256} gives {name} the SHA-256 {given[name]}, but its pin is {pin}"
            )
        return pin
    if name in given:
        return given[name]
    raise CheckpointError(
        f"no pinned SHA-256 for {name} ({CHECKPOINTS[name].url}): not downloading it "
        f"unverified. Give its hash with {ENV_SHA256}='{name}=<sha256 of the file>', or leave "
        f"it out of SAM_CHECKPOINTS and mount the file (SAM_CHECKPOINT=/path/to/it)"
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, sha256: str) -> None:
    """Raise ``CheckpointError`` and remove ``path`` unless its SHA-256 is ``sha256``."""
    actual = file_sha256(path)
    if actual != sha256:
        path.unlink()
        raise CheckpointError(
            f"{path.name}: SHA-256 {actual} does not match the expected {sha256}; removed"
        )


def fetch(name: str, dest: Path, given: dict[str, str], url: str | None = None) -> Path:
    """Download checkpoint ``name`` (from ``url`` if given: a mirror) into ``dest``, verified."""
    sha256 = expected_sha256(name, given)  # before any download
    checkpoint = CHECKPOINTS[name]
    target = dest / checkpoint.filename
    part = dest / f".{checkpoint.filename}.part"
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with (
            urllib.request.urlopen(url or checkpoint.url, timeout=60) as response,
            open(part, "wb") as f,
        ):
            shutil.copyfileobj(response, f, CHUNK_BYTES)
        verify(part, sha256)
        os.replace(part, target)  # only a verified file ever has the checkpoint's name
    finally:
        part.unlink(missing_ok=True)  # a failed or interrupted download
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"of {', '.join(CHECKPOINTS)}")
    parser.add_argument("--dest", type=Path, required=True, help="folder to put the files in")
    parser.add_argument(
        "--url", action="append", default=[], metavar="NAME=URL", help="fetch NAME from a mirror"
    )
    args = parser.parse_args(argv)
    try:
        given = parse_hashes(os.environ.get(ENV_SHA256, ""))
        mirrors = {}
        for item in args.url:
            name, sep, url = item.partition("=")
            if not sep or not url:
                raise CheckpointError(f"--url {item!r} is not NAME=URL")
            mirrors[name] = url
        for name in args.names:  # every name checked before the first download
            expected_sha256(name, given)
        for name in args.names:
            print(f"fetching {name}", flush=True)
            path = fetch(name, args.dest, given, mirrors.get(name))
            print(f"{path}: SHA-256 verified", flush=True)
    except (CheckpointError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
