"""Real pictures for the composites: Debian packages of desktop backgrounds and of clipart.

Two pools, each split **by picture** into train and held-out:

- **backgrounds**: photographs and digital paintings from desktop-background packages
  (``BACKGROUND_PACKAGES``). Decodable raster files only (SVG and the XML slideshow files are
  skipped), at least ``MIN_BACKGROUND_SIDE`` px on the short side. One picture often ships as
  several files: a wallpaper folder of resolutions (Plasma), ``_3840x2160`` copies, light and
  dark variants (``-l`` / ``-d``, ``images_dark/``). Those files form one *picture group*; per
  group and variant the catalogue keeps one file (the largest whose long side is at most
  ``PREFERRED_BACKGROUND_SIDE``), and a whole group lands in one split. Groups whose
  thumbnails' gradients look alike (``_gradient_hash``) are merged too.
- **objects**: RGBA PNGs from clipart packages (``OBJECT_PACKAGES``) whose alpha holds a real
  object (``object_mask_ok``): enough opaque pixels, not the full frame nor a filled
  rectangle, most of it one connected piece. Files with the same alpha shape (a clipart
  recoloured, or copied into another category) form one group, of which the first file is kept.

Splits are by group (``assign_splits``): per package, the first ~20% of its groups in the
order of a hash of their names are held out, so adding a package never moves a picture from one
split to the other. The catalogue (``CATALOGUE_PATH``, a
small JSON in the repository) lists each kept file with its package, package version,
SHA-256, size, group and split; it is rebuilt from the installed packages, bit for bit, by

    python -m training.real_pictures --install      # apt-get install PACKAGES (needs root)
    python -m training.real_pictures --catalogue    # rewrite training/real_pictures.json

Nothing here installs anything on import; ``load_catalogue`` raises ``RealPicturesMissingError``
with the command to run when the packages' files are not on this machine. scikit-image's
sample images (coins, astronaut, ...) are reserved for evaluation: no path under a
scikit-image data folder is ever catalogued (``FORBIDDEN_PATH_PARTS``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

BACKGROUND_PACKAGES = ("gnome-backgrounds", "mate-backgrounds", "plasma-workspace-wallpapers")
OBJECT_PACKAGES = ("openclipart-png",)
PACKAGES = BACKGROUND_PACKAGES + OBJECT_PACKAGES
CATALOGUE_PATH = Path(__file__).with_name("real_pictures.json")
INSTALL_COMMAND = "python -m training.real_pictures --install"
SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.2
FORMAT_VERSION = 1
COLUMNS = ("path", "sha256", "package", "width", "height", "group", "split")

BACKGROUND_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MIN_BACKGROUND_SIDE = 480  # px, short side
PREFERRED_BACKGROUND_SIDE = 2560  # px, long side: enough for 1024 px composites, fast to decode
GRADIENT_HASH_MAX_DISTANCE = 6  # of 64 bits: thumbnails this close are one picture

MIN_OBJECT_PIXELS = 1500  # opaque pixels (alpha >= 128)
MIN_OBJECT_SIDE = 24  # px, of the opaque part's box
MAX_OBJECT_FRAME_FILL = 0.95  # opaque share of the image: more is a picture, not a cut-out
MAX_OBJECT_BOX_FILL = 0.98  # opaque share of its box: more is a filled rectangle
MIN_LARGEST_PIECE = 0.5  # share of the opaque pixels in the largest connected piece
SKIPPED_OBJECT_DIRS = ("duplicates",)
# scikit-image's bundled samples are the evaluation's; never catalogue them.
FORBIDDEN_PATH_PARTS = ("skimage", "scikit-image", "scikit_image")


class RealPicturesMissingError(RuntimeError):
    """The catalogue's pictures are not on this machine (the Debian packages are missing)."""


@dataclass(frozen=True)
class Picture:
    """One catalogued file: ``path`` absolute, ``sha256`` of its bytes, ``width`` x ``height``
    in px, its ``package`` and that package's ``version``, its picture ``group`` and
    ``split``."""

    path: str
    sha256: str
    package: str
    version: str
    width: int
    height: int
    group: str
    split: str


@dataclass(frozen=True)
class Catalogue:
    """The two pools and the package versions they were read from."""

    packages: dict[str, str]
    backgrounds: tuple[Picture, ...]
    objects: tuple[Picture, ...]
    heldout_fraction: float = HELDOUT_FRACTION

    def pool(self, kind: str, split: str) -> tuple[Picture, ...]:
        """The ``kind`` ("backgrounds" or "objects") pictures of ``split``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        pictures = {"backgrounds": self.backgrounds, "objects": self.objects}[kind]
        return tuple(p for p in pictures if p.split == split)

    def to_json(self) -> str:
        """The catalogue as JSON: a header, then one row per picture and line (``COLUMNS``;
        each package's version is in ``packages``)."""
        head = {
            "format": FORMAT_VERSION,
            "heldout_fraction": self.heldout_fraction,
            "packages": self.packages,
            "columns": list(COLUMNS),
        }
        lines = ["{", *[f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]]
        for i, kind in enumerate(("backgrounds", "objects")):
            rows = [json.dumps([getattr(p, c) for c in COLUMNS]) for p in getattr(self, kind)]
            lines.append(f'  "{kind}": [')
            lines += [
                f"    {row}" + ("," if j < len(rows) - 1 else "") for j, row in enumerate(rows)
            ]
            lines.append("  ]" + ("," if i == 0 else ""))
        lines.append("}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Catalogue:
        data = json.loads(text)
        if data.get("format") != FORMAT_VERSION or tuple(data.get("columns", ())) != COLUMNS:
            raise ValueError(f"unknown catalogue format {data.get('format')!r}")
        packages = dict(data["packages"])

        def pictures(rows: list[list]) -> tuple[Picture, ...]:
            out = []
            for row in rows:
                fields = dict(zip(COLUMNS, row, strict=True))
                out.append(Picture(version=packages[fields["package"]], **fields))
            return tuple(out)

        return cls(
            packages=packages,
            backgrounds=pictures(data["backgrounds"]),
            objects=pictures(data["objects"]),
            heldout_fraction=float(data["heldout_fraction"]),
        )


# ----------------------------------------------------------------------------- packages


def install(packages: Sequence[str] = PACKAGES) -> None:
    """``apt-get install`` the packages (a training command's set-up step; needs root or sudo)."""
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    if prefix and shutil.which("sudo") is None:
        raise PermissionError("installing Debian packages needs root (or sudo)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*prefix, "apt-get", "update"], check=True, env=env)
    command = [*prefix, "apt-get", "install", "-y", "--no-install-recommends", *packages]
    subprocess.run(command, check=True, env=env)


def installed_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Each package's installed version (``dpkg-query -W``), None where it is not installed."""
    versions: dict[str, str | None] = {}
    for package in packages:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
            capture_output=True,
            text=True,
        )
        status, _, version = out.stdout.partition("\t")
        versions[package] = version if out.returncode == 0 and "installed" in status else None
    return versions


def package_files(package: str) -> list[Path]:
    """The regular files an installed package put on this machine (``dpkg -L``), sorted."""
    out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True)
    return sorted(Path(line) for line in out.stdout.splitlines() if Path(line).is_file())


# ----------------------------------------------------------------------------- scanning


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def group_rank(pool: str, group: str) -> str:
    """A picture group's place in the hash order that decides the splits."""
    return hashlib.sha256(f"{pool}:{group}".encode()).hexdigest()


def assign_splits(
    pool: str, pictures: Sequence[Picture], heldout_fraction: float = HELDOUT_FRACTION
) -> list[Picture]:
    """``pictures`` with their ``split``: per package, the ``round(fraction * groups)`` groups
    first in hash order (``group_rank``; at least one of two or more) are held out, whole.

    Per package, so another package never moves a picture between splits, and every package
    has its share of held-out pictures (a plain hash threshold held out 6 of 59 background
    groups: too few pictures to evaluate on).
    """
    groups: dict[str, set[str]] = {}
    for p in pictures:
        groups.setdefault(p.package, set()).add(p.group)
    heldout: set[str] = set()
    for names in groups.values():
        n = round(heldout_fraction * len(names))
        if len(names) >= 2:
            n = max(n, 1)
        heldout |= set(sorted(names, key=lambda g: group_rank(pool, g))[:n])
    return [replace(p, split="heldout" if p.group in heldout else "train") for p in pictures]


def _check_allowed(path: Path) -> None:
    lowered = str(path).lower()
    if any(part in lowered for part in FORBIDDEN_PATH_PARTS):
        raise ValueError(f"{path}: scikit-image's sample images are reserved for evaluation")


def background_picture_name(path: Path) -> tuple[str, str]:
    """(picture name, variant) of a background file: the name shared by every resolution and
    light / dark version of one picture, and which version this file is."""
    parts = path.parts
    if "wallpapers" in parts and "contents" in parts:  # Plasma: <Name>/contents/images[_dark]/
        name = parts[parts.index("contents") - 1]
        return name, parts[parts.index("contents") + 1]
    stem = re.sub(r"_\d+x\d+$", "", path.stem)
    variant = "default"
    match = re.search(r"[-_](l|d|light|dark)$", stem, flags=re.IGNORECASE)
    if match:
        stem, variant = stem[: match.start()], match.group(1).lower()[0]
    return stem, variant


def _gradient_hash(rgb: np.ndarray) -> int:
    """64-bit difference hash of the thumbnail's horizontal gradients, sign ignored: light and
    dark versions of one design hash alike."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(gray, (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
    grad = np.abs(np.diff(small, axis=1))
    bits = (grad > np.median(grad)).ravel()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def _read_rgb(path: Path) -> np.ndarray | None:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def scan_backgrounds(files: dict[str, tuple[str, Iterable[Path]]]) -> list[Picture]:
    """The background pictures among ``files`` (package -> (version, paths)), grouped and
    split (see the module doc), sorted by path."""
    candidates = []  # (package, version, path, name, variant, w, h, hash)
    for package, (version, paths) in sorted(files.items()):
        for path in sorted(paths):
            _check_allowed(path)
            if path.suffix.lower() not in BACKGROUND_SUFFIXES or "screenshot" in path.stem:
                continue
            rgb = _read_rgb(path)
            if rgb is None or min(rgb.shape[:2]) < MIN_BACKGROUND_SIDE:
                continue
            name, variant = background_picture_name(path)
            h, w = rgb.shape[:2]
            candidates.append((package, version, path, name, variant, w, h, _gradient_hash(rgb)))

    # One file per (package, picture, variant): the largest that is not too large to decode.
    best: dict[tuple[str, str, str], tuple] = {}
    for c in candidates:
        key = (c[0], c[3], c[4])
        if key not in best or _prefer(c[5], c[6], *best[key][5:7]):
            best[key] = c
    kept = sorted(best.values(), key=lambda c: str(c[2]))

    # Picture groups: same package and name, or look-alike thumbnails (union-find).
    parent = list(range(len(kept)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(kept):
        for j in range(i):
            b = kept[j]
            same_name = (a[0], a[3]) == (b[0], b[3])
            alike = bin(a[7] ^ b[7]).count("1") <= GRADIENT_HASH_MAX_DISTANCE
            if same_name or alike:
                parent[find(i)] = find(j)
    pictures = []
    for i, c in enumerate(kept):
        root = kept[find(i)]
        group = f"{root[0]}:{root[3]}"
        pictures.append(
            Picture(
                path=str(c[2]),
                sha256=file_sha256(c[2]),
                package=c[0],
                version=c[1],
                width=c[5],
                height=c[6],
                group=group,
                split="",
            )
        )
    return assign_splits("backgrounds", pictures)


def _prefer(w: int, h: int, best_w: int, best_h: int) -> bool:
    """Whether a w x h file beats the kept best_w x best_h one of the same picture."""
    fits, best_fits = (
        max(w, h) <= PREFERRED_BACKGROUND_SIDE,
        max(best_w, best_h) <= PREFERRED_BACKGROUND_SIDE,
    )
    if fits != best_fits:
        return fits
    return (w * h > best_w * best_h) if fits else (w * h < best_w * best_h)


def read_rgba(path: str | Path) -> np.ndarray | None:
    """An image file as (H, W, 4) uint8 RGBA, or None when it has no alpha channel."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.ndim != 3 or raw.shape[2] != 4:
        return None
    if raw.dtype == np.uint16:
        raw = (raw >> 8).astype(np.uint8)
    return cv2.cvtColor(raw, cv2.COLOR_BGRA2RGBA)


def object_mask_ok(alpha: np.ndarray) -> bool:
    """Whether an (H, W) uint8 alpha channel holds a usable cut-out object (module doc)."""
    opaque = (alpha >= 128).astype(np.uint8)
    count = cv2.countNonZero(opaque)
    if count < MIN_OBJECT_PIXELS or count > MAX_OBJECT_FRAME_FILL * alpha.size:
        return False
    _x, _y, bw, bh = cv2.boundingRect(opaque)
    if min(bw, bh) < MIN_OBJECT_SIDE or count > MAX_OBJECT_BOX_FILL * bw * bh:
        return False
    n, _labels, stats, _ = cv2.connectedComponentsWithStats(opaque, connectivity=8)
    return n > 1 and stats[1:, cv2.CC_STAT_AREA].max() >= MIN_LARGEST_PIECE * count


def alpha_shape_hash(alpha: np.ndarray) -> str:
    """The opaque part's shape at 16 x 16 inside its box, hashed to 16 hex digits: recolours
    and copies hash alike."""
    opaque = (alpha >= 128).astype(np.uint8)
    x, y, bw, bh = cv2.boundingRect(opaque)
    small = cv2.resize(opaque[y : y + bh, x : x + bw] * 255, (16, 16), interpolation=cv2.INTER_AREA)
    return hashlib.sha256(np.packbits(small.ravel() >= 128).tobytes()).hexdigest()[:16]


def scan_objects(files: dict[str, tuple[str, Iterable[Path]]]) -> list[Picture]:
    """The cut-out objects among ``files`` (package -> (version, paths)), sorted by path; of
    files with one alpha shape (a group) only the first is kept."""
    pictures = []
    seen: set[str] = set()
    for package, (version, paths) in sorted(files.items()):
        for path in sorted(paths):
            _check_allowed(path)
            if path.suffix.lower() != ".png" or set(path.parts) & set(SKIPPED_OBJECT_DIRS):
                continue
            rgba = read_rgba(path)
            if rgba is None or not object_mask_ok(rgba[..., 3]):
                continue
            group = f"shape:{alpha_shape_hash(rgba[..., 3])}"
            if group in seen:
                continue
            seen.add(group)
            pictures.append(
                Picture(
                    path=str(path),
                    sha256=file_sha256(path),
                    package=package,
                    version=version,
                    width=rgba.shape[1],
                    height=rgba.shape[0],
                    group=group,
                    split="",
                )
            )
    return assign_splits("objects", pictures)


def build_catalogue(
    backgrounds: dict[str, tuple[str, Iterable[Path]]],
    objects: dict[str, tuple[str, Iterable[Path]]],
) -> Catalogue:
    """The catalogue of the given files (package -> (version, paths)) of each pool."""
    packages = {p: v for p, (v, _) in sorted({**backgrounds, **objects}.items())}
    return Catalogue(
        packages=packages,
        backgrounds=tuple(scan_backgrounds(backgrounds)),
        objects=tuple(scan_objects(objects)),
    )


def catalogue_installed_packages() -> Catalogue:
    """The catalogue of this machine's installed ``PACKAGES`` (all must be installed)."""
    versions = installed_versions()
    missing = [p for p, v in versions.items() if v is None]
    if missing:
        raise RealPicturesMissingError(
            f"Debian packages not installed: {', '.join(missing)}; run `{INSTALL_COMMAND}`"
        )

    def files(packages: Sequence[str]) -> dict[str, tuple[str, Iterable[Path]]]:
        return {p: (str(versions[p]), package_files(p)) for p in packages}

    return build_catalogue(files(BACKGROUND_PACKAGES), files(OBJECT_PACKAGES))


# ----------------------------------------------------------------------------- loading


def load_catalogue(path: str | Path = CATALOGUE_PATH) -> Catalogue:
    """Read a catalogue and check that its pictures are on this machine.

    Raises ``RealPicturesMissingError`` (naming the install command) when the catalogue file or any
    of its pictures is missing; each picture's SHA-256 is checked when it is first read
    (``training.composites``), not here.
    """
    path = Path(path)
    if not path.is_file():
        raise RealPicturesMissingError(
            f"no real-picture catalogue at {path}; run `{INSTALL_COMMAND}` "
            "and `python -m training.real_pictures --catalogue`"
        )
    catalogue = Catalogue.from_json(path.read_text())
    absent = [
        p.path for p in (*catalogue.backgrounds, *catalogue.objects) if not os.path.isfile(p.path)
    ]
    if absent:
        packages = sorted(
            {
                p.package
                for p in (*catalogue.backgrounds, *catalogue.objects)
                if p.path in set(absent)
            }
        )
        raise RealPicturesMissingError(
            f"{len(absent)} catalogued pictures are missing (first: {absent[0]}), from the Debian "
            f"packages {', '.join(packages)}; install them with `{INSTALL_COMMAND}`"
        )
    return catalogue


def main(argv: list[str] | None = None) -> None:
    from runtime.logs import configure_logging

    configure_logging("INFO")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help="apt-get install the packages")
    parser.add_argument("--catalogue", action="store_true", help="rebuild the catalogue JSON")
    parser.add_argument("--out", type=Path, default=CATALOGUE_PATH)
    args = parser.parse_args(argv)
    if not (args.install or args.catalogue):
        parser.error("nothing to do: give --install and/or --catalogue")
    if args.install:
        install()
        logger.info("installed %s", installed_versions())
    if args.catalogue:
        catalogue = catalogue_installed_packages()
        args.out.write_text(catalogue.to_json())
        for kind in ("backgrounds", "objects"):
            counts = {s: len(catalogue.pool(kind, s)) for s in SPLITS}
            groups = {s: len({p.group for p in catalogue.pool(kind, s)}) for s in SPLITS}
            logger.info("%s: files %s, picture groups %s", kind, counts, groups)
        logger.info("catalogue written to %s (packages %s)", args.out, catalogue.packages)


__all__ = [
    "CATALOGUE_PATH",
    "INSTALL_COMMAND",
    "PACKAGES",
    "Catalogue",
    "Picture",
    "RealPicturesMissingError",
    "assign_splits",
    "build_catalogue",
    "catalogue_installed_packages",
    "install",
    "installed_versions",
    "load_catalogue",
    "object_mask_ok",
    "read_rgba",
]

if __name__ == "__main__":
    main()
