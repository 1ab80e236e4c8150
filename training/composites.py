"""Composites of real pictures: cut-and-paste scenes with exact masks, beside the synthetic ones.

In the manner of "Cut, Paste and Learn" (Dwibedi et al., 2017): objects with exact masks pasted
on real backgrounds, with the blending varied so that a model cannot find objects by their
paste boundaries. Pictures come from Debian packages through ``training.real_pictures``'s
catalogue; the held-out split uses other pictures (backgrounds and objects) than train, not
only other seeds. A composite (``make_composite``) is a pure function of ``(seed, split)``
and the catalogue:

- **background**: a catalogued background picture of the split, a random crop (5-100% of the
  largest crop of the output's aspect, anywhere), resized to the output, flipped
  horizontally half the time, with colour jitter (gain, contrast, saturation, tint);
- **3-10 objects**, back to front: clipart cut-outs (60%), rotated (mostly upright, 30% at any
  angle), flipped, scaled (log-uniform, 10-60% of the short side across), recoloured (hue
  shift half the time) and jittered, their mask the warped alpha >= 0.5; and the synthetic
  shapes of ``training.scenes`` (``draw_shape``) filled with a crop of *another* real picture
  of the split (40%);
- **occlusion**: 45% of the objects are placed at a pixel of an earlier one; earlier masks lose
  what later objects cover (painter's order, masks pairwise disjoint); an object left with
  less than ``MIN_VISIBLE_PIXELS`` (or ``MIN_VISIBLE_FRACTION`` of the image) visible, or
  less than ``MIN_VISIBLE_SHARE`` of itself, is dropped;
- **objects with parts** (20% of the objects): a body (clipart or filled shape) with one or two
  attachments (filled ellipses, polygons or stars of 25-50% of its size, centred on its
  outline, so they cover a bit of it). Each part is an instance of its own (its mask is what a
  click on it must give at the finest level), and ``Composite.wholes`` lists the instances that
  together form one object: a click on an attachment is ambiguous between the part and the
  whole, as a click is for SAM, and a trainer may take either as the target;
- **paste blending** (Dwibedi et al.'s remedy against boundary artefacts): per object, as
  pasted (the clipart's anti-aliased alpha), or with the boundary band blurred (Gaussian,
  sigma 0.6-1.8 px) half the time; 15% of the objects are defocused before pasting;
- **lighting and camera**: per-object shading, a smooth illumination field with a global
  gain, gamma, sensor noise and, sometimes, blur.

``CompositeDataset`` is a ``Sequence[Sample]`` like ``training.scenes.SceneDataset``. Without
the packages' files it raises ``RealPicturesMissingError`` naming the install command; nothing
is installed here.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from training.data import Sample
from training.real_pictures import (
    CATALOGUE_PATH,
    SPLITS,
    Catalogue,
    Picture,
    RealPicturesMissingError,
    load_catalogue,
)
from training.scenes import Camera, draw_shape, draw_size, smooth_noise

MIN_OBJECTS, MAX_OBJECTS = 3, 10
MAX_TOP_UP = 20  # extra placements, not occluding, while fewer than MIN_OBJECTS are visible
CLIPART_SHARE = 0.6
WITH_PARTS_SHARE = 0.2
OCCLUDE_SHARE = 0.45
FILL_SHAPES = ("convex", "concave", "ellipse", "star", "ring", "line", "branch")
FILL_SHAPE_WEIGHTS = np.array([0.2, 0.22, 0.2, 0.14, 0.08, 0.08, 0.08])
PART_SHAPES = ("ellipse", "convex", "concave", "star")
MIN_VISIBLE_PIXELS = 48
MIN_VISIBLE_FRACTION = 0.0008  # of the image area
MIN_VISIBLE_SHARE = 0.1  # of the object's own pasted area
BACKGROUND_MAX_SIDE = 1280  # px: decoded backgrounds are kept in memory at most this large
OBJECT_MAX_SIDE = 512


@dataclass
class Composite:
    """A rendered composite, with ``training.scenes.Scene``'s fields: ``image`` (H, W, 3) uint8
    RGB, ``masks`` (N, H, W) bool (visible parts, pairwise disjoint, back to front), ``kinds``
    (``clipart`` or ``photo_<shape>``) per mask. ``wholes``: tuples of mask indices that
    together form one object with parts. ``sources``: the catalogued files it was made of."""

    image: np.ndarray
    masks: np.ndarray
    kinds: list[str]
    wholes: list[tuple[int, ...]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- pictures


@functools.lru_cache(maxsize=8)
def catalogue_at(path: str | Path = CATALOGUE_PATH) -> Catalogue:
    """The catalogue at ``path``, read and checked once per process."""
    return load_catalogue(path)


def _read_checked(picture: Picture) -> bytes:
    try:
        data = Path(picture.path).read_bytes()
    except FileNotFoundError as exc:
        raise RealPicturesMissingError(
            f"{picture.path} (package {picture.package}) is missing; install the packages with "
            "`python -m training.real_pictures --install`"
        ) from exc
    if hashlib.sha256(data).hexdigest() != picture.sha256:
        raise ValueError(
            f"{picture.path} differs from the catalogue ({picture.package} {picture.version}); "
            "rebuild it with `python -m training.real_pictures --catalogue`"
        )
    return data


def _fit(image: np.ndarray, max_side: int) -> np.ndarray:
    scale = max_side / max(image.shape[:2])
    if scale >= 1:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


@functools.lru_cache(maxsize=96)
def load_background(picture: Picture) -> np.ndarray:
    """A background picture as (h, w, 3) uint8 RGB, long side at most ``BACKGROUND_MAX_SIDE``."""
    data = _read_checked(picture)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    rgb = _fit(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), BACKGROUND_MAX_SIDE)
    rgb.setflags(write=False)
    return rgb


@functools.lru_cache(maxsize=384)
def load_object(picture: Picture) -> np.ndarray:
    """A cut-out as (h, w, 4) float32 RGBA, colour premultiplied by alpha (both in [0, 1]),
    cropped to its opaque part, long side at most ``OBJECT_MAX_SIDE``."""
    data = _read_checked(picture)
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    scale = 1 / 65535 if raw.dtype == np.uint16 else 1 / 255
    rgba = cv2.cvtColor(raw, cv2.COLOR_BGRA2RGBA).astype(np.float32) * np.float32(scale)
    x, y, w, h = cv2.boundingRect((rgba[..., 3] >= 0.5).astype(np.uint8))
    rgba = rgba[max(0, y - 1) : y + h + 1, max(0, x - 1) : x + w + 1]
    rgba = _fit(rgba, OBJECT_MAX_SIDE)
    rgba[..., :3] *= rgba[..., 3:]
    rgba.setflags(write=False)
    return rgba


# ----------------------------------------------------------------------------- jitter


def _color_jitter(rgb: np.ndarray, rng: np.random.Generator, hue: bool = False) -> np.ndarray:
    """Gain, contrast, saturation and tint jitter of (h, w, 3) float32 in [0, 255]; with
    ``hue``, also a hue rotation (in HSV)."""
    if hue:
        hsv = cv2.cvtColor(np.clip(rgb, 0, 255) / 255, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(0, 360)) % 360
        rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255
    gray = rgb.mean(axis=2, keepdims=True)
    rgb = gray + (rgb - gray) * np.float32(rng.uniform(0.6, 1.4))  # saturation
    mean = float(rgb.mean())
    rgb = mean + (rgb - mean) * np.float32(rng.uniform(0.75, 1.25))  # contrast
    gain = rng.uniform(0.75, 1.25) * rng.uniform(0.92, 1.08, 3)  # brightness and tint
    return np.clip(rgb * gain.astype(np.float32), 0, 255)


def _photo_crop(
    rng: np.random.Generator, picture: np.ndarray, h: int, w: int, min_area: float
) -> np.ndarray:
    """A random crop of ``picture`` with the aspect of (h, w), ``min_area``-100% of the largest
    such crop, resized to (h, w); float32 (h, w, 3)."""
    ph, pw = picture.shape[:2]
    full = min(ph / h, pw / w)  # the largest crop is (h, w) * full
    side = full * math.sqrt(rng.uniform(min_area, 1.0))
    ch, cw = max(2, min(ph, round(h * side))), max(2, min(pw, round(w * side)))
    y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    crop = picture[y0 : y0 + ch, x0 : x0 + cw]
    interp = cv2.INTER_AREA if ch > h else cv2.INTER_LINEAR
    return cv2.resize(crop, (w, h), interpolation=interp).astype(np.float32)


# ----------------------------------------------------------------------------- objects


@dataclass
class _Paste:
    """One object ready to paste at (y0, x0): premultiplied colour (h, w, 3) in [0, 255],
    alpha (h, w) in [0, 1], and its mask (alpha >= 0.5)."""

    y0: int
    x0: int
    color: np.ndarray
    alpha: np.ndarray
    kind: str
    source: str

    @property
    def mask(self) -> np.ndarray:
        return self.alpha >= 0.5


def _clipart(rng: np.random.Generator, picture: Picture, cx: float, cy: float, r: float) -> _Paste:
    """A cut-out scaled to ~2r px across, rotated, flipped and recoloured, centred at (cx, cy)."""
    rgba = load_object(picture)
    oh, ow = rgba.shape[:2]
    angle = rng.uniform(-180, 180) if rng.random() < 0.3 else rng.uniform(-20, 20)
    scale = 2 * r / max(oh, ow)
    m = cv2.getRotationMatrix2D((ow / 2, oh / 2), angle, scale)
    if rng.random() < 0.5:  # horizontal flip, before the rotation
        m[:, 0] *= -1
        m[:, 2] += m[:, 0] * -ow
    corners = np.array([[0, 0, 1], [ow, 0, 1], [0, oh, 1], [ow, oh, 1]], np.float64) @ m.T
    lo, hi = np.floor(corners.min(0)), np.ceil(corners.max(0))
    pw, ph = int(hi[0] - lo[0]) + 1, int(hi[1] - lo[1]) + 1
    m[:, 2] -= lo
    warped = cv2.warpAffine(rgba, m, (pw, ph), flags=cv2.INTER_LINEAR, borderValue=0)
    alpha = warped[..., 3].clip(0, 1)
    color = warped[..., :3] / np.maximum(alpha[..., None], 1e-3) * 255
    color = _color_jitter(color, rng, hue=rng.random() < 0.5) * alpha[..., None]
    y0 = round(cy - ph / 2)
    x0 = round(cx - pw / 2)
    return _Paste(y0, x0, color, alpha, "clipart", picture.path)


def _filled_shape(
    rng: np.random.Generator,
    kind: str,
    fill: np.ndarray,
    source: str,
    h: int,
    w: int,
    cx: float,
    cy: float,
    r: float,
) -> _Paste | None:
    """A ``training.scenes`` shape of radius ~``r`` at (cx, cy) in an (h, w) image, filled with
    a crop of the real picture ``fill``; None when it falls outside the image."""
    m = draw_shape(rng, kind, h, w, cx, cy, r)
    x0, y0, bw, bh = cv2.boundingRect(m)
    if bw == 0 or bh == 0:
        return None
    alpha = m[y0 : y0 + bh, x0 : x0 + bw].astype(np.float32)
    tex = _photo_crop(rng, fill, bh, bw, min_area=0.02)
    tex = _color_jitter(tex, rng, hue=rng.random() < 0.2)
    return _Paste(y0, x0, tex * alpha[..., None], alpha, f"photo_{kind}", source)


def _clip(paste: _Paste, h: int, w: int) -> tuple[slice, slice, slice, slice] | None:
    """(image rows, image cols, patch rows, patch cols) of the part inside the image."""
    ph, pw = paste.alpha.shape
    y0, x0 = max(0, paste.y0), max(0, paste.x0)
    y1, x1 = min(h, paste.y0 + ph), min(w, paste.x0 + pw)
    if y1 <= y0 or x1 <= x0:
        return None
    return (
        slice(y0, y1),
        slice(x0, x1),
        slice(y0 - paste.y0, y1 - paste.y0),
        slice(x0 - paste.x0, x1 - paste.x0),
    )


def _paste(rng: np.random.Generator, image: np.ndarray, paste: _Paste) -> np.ndarray | None:
    """Paste onto ``image`` (H, W, 3) float32 in place; the object's full-frame (H, W) uint8
    mask, or None when nothing of it is inside the image."""
    h, w = image.shape[:2]
    where = _clip(paste, h, w)
    if where is None:
        return None
    ys, xs, py, px = where
    alpha = paste.alpha[py, px]
    color = paste.color[py, px]
    mask = (alpha >= 0.5).astype(np.uint8)
    if not mask.any():
        return None
    shade = 0.8 + 0.4 * smooth_noise(rng, *alpha.shape, 2)[..., None]  # not flat
    color = color * shade
    if rng.random() < 0.15:  # defocused object
        sigma = rng.uniform(0.8, 2.0)
        color = cv2.GaussianBlur(color, (0, 0), sigma)
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigma)
    region = image[ys, xs]
    region[:] = color + region * (1 - alpha[..., None])
    if rng.random() < 0.5:  # blur the paste boundary (Dwibedi et al.'s blending)
        band = cv2.dilate(mask, np.ones((5, 5), np.uint8)) - cv2.erode(
            mask, np.ones((3, 3), np.uint8)
        )
        blurred = cv2.GaussianBlur(region, (0, 0), rng.uniform(0.6, 1.8))
        region[band > 0] = blurred[band > 0]
    full = np.zeros((h, w), np.uint8)
    full[ys, xs] = mask
    return full


# ----------------------------------------------------------------------------- composites


# Real photographs' camera: milder light variation and noise than the synthetic scenes'.
COMPOSITE_CAMERA = Camera(
    light_base=0.7, light_amp=0.5, gain=(0.8, 1.15), gamma=(0.8, 1.25), noise_sigma=(0, 5),
    blur_share=0.3, blur_kernel=(0, 0), blur_sigma=(0.4, 1.2), sigma_first=False,
)  # fmt: skip


def make_composite(
    seed: int,
    split: str = "train",
    size: int | tuple[int, int] | None = None,
    size_range: tuple[int, int] = (256, 1024),
    catalogue: Catalogue | str | Path | None = None,
) -> Composite:
    """Render composite ``seed`` of ``split`` from the pictures of that split (module doc).

    ``size``: side (int) or (H, W); ``None`` draws H and W from ``size_range`` (px,
    inclusive). ``catalogue``: a ``Catalogue`` or the path of one (default: the repository's).
    The same arguments give the same composite, bit for bit.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not isinstance(catalogue, Catalogue):
        catalogue = catalogue_at(catalogue or CATALOGUE_PATH)
    backgrounds = catalogue.pool("backgrounds", split)
    objects = catalogue.pool("objects", split)
    if not backgrounds or not objects:
        raise ValueError(f"the catalogue has no {split} backgrounds or objects")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    h, w = draw_size(rng, size, size_range)
    short = min(h, w)

    background = backgrounds[int(rng.integers(len(backgrounds)))]
    fills = [p for p in backgrounds if p.group != background.group] or list(backgrounds)
    image = _color_jitter(_photo_crop(rng, load_background(background), h, w, 0.05), rng)
    sources = [background.path]

    def filled(kind: str, cx: float, cy: float, r: float) -> _Paste | None:
        fill = fills[int(rng.integers(len(fills)))]
        sources.append(fill.path)
        return _filled_shape(rng, kind, load_background(fill), fill.path, h, w, cx, cy, r)

    masks: list[np.ndarray] = []  # (h, w) uint8, the visible part so far
    areas: list[int] = []  # each object's pasted area
    kinds: list[str] = []
    groups: list[tuple[int, ...]] = []
    min_pixels = max(MIN_VISIBLE_PIXELS, int(MIN_VISIBLE_FRACTION * h * w))

    def add(paste: _Paste | None, occlude: bool = True) -> int | None:
        if paste is None:
            return None
        if not occlude:
            where = _clip(paste, h, w)
            if where is None:
                return None
            ys, xs, py, px = where
            mask = paste.mask[py, px]
            if any(m[ys, xs][mask].any() for m in masks):
                return None
        mask = _paste(rng, image, paste)
        if mask is None:
            return None
        for prev in masks:  # occlusion: the new object hides what it covers
            prev[mask > 0] = 0
        masks.append(mask)
        areas.append(cv2.countNonZero(mask))
        kinds.append(paste.kind)
        if paste.kind == "clipart":
            sources.append(paste.source)
        return len(masks) - 1

    n_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    for i in range(n_objects + MAX_TOP_UP):
        top_up = i >= n_objects
        if top_up and sum(cv2.countNonZero(m) >= min_pixels for m in masks) >= MIN_OBJECTS:
            break
        clipart = rng.random() < CLIPART_SHARE
        lo, hi = (0.05, 0.3) if clipart else (0.04, 0.22)
        r = short * math.exp(rng.uniform(math.log(lo), math.log(hi)))
        cx, cy = rng.uniform(r * 0.5, w - r * 0.5), rng.uniform(r * 0.5, h - r * 0.5)
        if masks and not top_up and rng.random() < OCCLUDE_SHARE:
            ys, xs = np.nonzero(masks[int(rng.integers(len(masks)))])
            if len(ys):
                j = int(rng.integers(len(ys)))
                cx, cy = xs[j] + rng.normal(0, r * 0.3), ys[j] + rng.normal(0, r * 0.3)
        if clipart:
            paste = _clipart(rng, objects[int(rng.integers(len(objects)))], cx, cy, r)
        else:
            kind = FILL_SHAPES[rng.choice(len(FILL_SHAPES), p=FILL_SHAPE_WEIGHTS)]
            paste = filled(kind, cx, cy, r)
        body = add(paste, occlude=not top_up)
        if body is None or top_up or rng.random() >= WITH_PARTS_SHARE:
            continue
        # An object with parts: attachments centred on the body's outline.
        contours, _ = cv2.findContours(masks[body], cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        outline = np.concatenate(contours).reshape(-1, 2)
        members = [body]
        for _ in range(int(rng.integers(1, 3))):
            px, py = outline[int(rng.integers(len(outline)))]
            kind = PART_SHAPES[int(rng.integers(len(PART_SHAPES)))]
            part = add(filled(kind, float(px), float(py), r * rng.uniform(0.25, 0.5)))
            if part is not None:
                members.append(part)
        if len(members) > 1:
            groups.append(tuple(members))

    keep = [
        k
        for k, m in enumerate(masks)
        if (visible := cv2.countNonZero(m)) >= min_pixels
        and visible >= MIN_VISIBLE_SHARE * areas[k]
    ]
    index = {k: j for j, k in enumerate(keep)}
    wholes = [tuple(index[k] for k in g if k in index) for g in groups]
    stacked = np.stack([masks[k] for k in keep]).astype(bool) if keep else np.zeros((0, h, w), bool)
    return Composite(
        image=COMPOSITE_CAMERA.shoot(rng, image),
        masks=stacked,
        kinds=[kinds[k] for k in keep],
        wholes=[g for g in wholes if len(g) > 1],
        sources=sorted(set(sources)),
    )


class CompositeDataset(Sequence[Sample]):
    """``n`` composites of ``split`` ("train" or "heldout"), rendered on access.

    Deterministic: item ``i`` is always ``make_composite(i + offset, split)``. The catalogue
    is read (and its files checked to be present) when the dataset is made.
    """

    def __init__(
        self,
        split: str = "train",
        n: int = 1000,
        size_range: tuple[int, int] = (256, 1024),
        offset: int = 0,
        catalogue: str | Path = CATALOGUE_PATH,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.split, self.n, self.size_range, self.offset = split, n, size_range, offset
        self.catalogue_path = Path(catalogue)
        catalogue_at(self.catalogue_path)  # fails early, naming the install command

    def __len__(self) -> int:
        return self.n

    def composite(self, index: int) -> Composite:
        if not isinstance(index, int):
            raise TypeError("CompositeDataset supports integer indexing only")
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(index)
        return make_composite(
            index + self.offset,
            self.split,
            size_range=self.size_range,
            catalogue=self.catalogue_path,
        )

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        composite = self.composite(index)
        name = f"composite_{self.split}_{index % self.n + self.offset:06d}"
        return Sample(image=composite.image, masks=composite.masks, name=name)


__all__ = [
    "MAX_OBJECTS",
    "MIN_OBJECTS",
    "Composite",
    "CompositeDataset",
    "catalogue_at",
    "load_background",
    "load_object",
    "make_composite",
]
