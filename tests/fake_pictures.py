"""Tiny stand-ins for the Debian picture packages, so catalogue and composite tests run anywhere.

``write_fake_packages(root)`` writes generated files the way the packages lay them out:
a background package (photos-like smooth fields, a resolution copy, light / dark variants, an
SVG, a slideshow XML, a tiny image, a screenshot) and a clipart package (RGBA cut-outs, plus
files the catalogue must reject or fold: no alpha, fully opaque, a filled rectangle, too
small, a recoloured copy, a ``duplicates/`` folder).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from training.real_pictures import Catalogue, build_catalogue

BACKGROUND_PACKAGE, OBJECT_PACKAGE = "fake-backgrounds", "fake-clipart"
N_BACKGROUNDS, N_OBJECTS = 10, 12  # distinct pictures (groups) of each pool


def _field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like (h, w, 3) uint8 picture: smooth colour blobs and fine grain."""
    grid = rng.random((4, 5, 3), dtype=np.float32) * 255
    img = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    img += rng.standard_normal((h, w, 3), dtype=np.float32) * 6
    return np.clip(img, 0, 255).astype(np.uint8)


def _write(path: Path, rgb_or_rgba: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    code = cv2.COLOR_RGBA2BGRA if rgb_or_rgba.shape[2] == 4 else cv2.COLOR_RGB2BGR
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb_or_rgba, code))
    return path


def _cutout(rng: np.random.Generator, k: int, size: int = 120) -> np.ndarray:
    """An RGBA cut-out: an ellipse of its own proportions and angle, coloured."""
    alpha = np.zeros((size, size), np.uint8)
    axes = (54 - 2 * k, 14 + k)
    cv2.ellipse(alpha, (60, 60), axes, 10 * k, 0, 360, 255, -1)
    color = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (size, size, 3))
    return np.dstack([color, alpha])


def write_fake_packages(root: Path) -> tuple[dict, dict]:
    """Write both fake packages under ``root``; ``build_catalogue``'s two arguments."""
    rng = np.random.default_rng(0)
    bg_dir = root / "usr/share/backgrounds/fake"
    backgrounds = [
        _write(bg_dir / f"photo{i:02d}.jpg", _field(rng, 480, 640))
        for i in range(N_BACKGROUNDS - 2)
    ]
    sea = _field(rng, 600, 800)
    backgrounds.append(_write(bg_dir / "sea.png", sea))  # and a smaller copy of the same picture
    backgrounds.append(_write(bg_dir / "sea_640x480.png", cv2.resize(sea, (640, 480))))
    light = _field(rng, 480, 640)
    backgrounds.append(_write(bg_dir / "sky-l.png", light))  # and its dark variant
    backgrounds.append(_write(bg_dir / "sky-d.png", 255 - light))
    backgrounds.append(_write(bg_dir / "tiny.png", _field(rng, 100, 120)))
    backgrounds.append(_write(bg_dir / "screenshot.png", _field(rng, 480, 640)))
    for name, text in (("waves.svg", "<svg/>"), ("slideshow.xml", "<background/>")):
        (bg_dir / name).write_text(text)
        backgrounds.append(bg_dir / name)

    obj_dir = root / "usr/share/clipart/png"
    objects = [
        _write(obj_dir / f"things/thing{k:02d}.png", _cutout(rng, k)) for k in range(N_OBJECTS)
    ]
    recoloured = _cutout(rng, 0)
    recoloured[..., :3] = 255 - recoloured[..., :3]
    objects.append(_write(obj_dir / "things/thing00_recoloured.png", recoloured))
    objects.append(_write(obj_dir / "duplicates/thing01.png", _cutout(rng, 1)))
    objects.append(_write(obj_dir / "flat/no_alpha.png", _field(rng, 120, 120)))
    opaque = np.dstack([_field(rng, 120, 120), np.full((120, 120), 255, np.uint8)])
    objects.append(_write(obj_dir / "flat/opaque.png", opaque))
    box = np.zeros((120, 120, 4), np.uint8)
    box[20:100, 10:110] = 200
    box[..., 3][20:100, 10:110] = 255
    objects.append(_write(obj_dir / "flat/rectangle.png", box))
    speck = np.zeros((120, 120, 4), np.uint8)
    speck[50:60, 50:60] = 255
    objects.append(_write(obj_dir / "flat/speck.png", speck))
    return (
        {BACKGROUND_PACKAGE: ("1.0-1", backgrounds)},
        {OBJECT_PACKAGE: ("2:0.5-3", objects)},
    )


def write_fake_catalogue(root: Path) -> tuple[Catalogue, Path]:
    """The fake packages and their catalogue, written to ``root/catalogue.json``."""
    catalogue = build_catalogue(*write_fake_packages(root))
    path = root / "catalogue.json"
    path.write_text(catalogue.to_json())
    return catalogue, path
