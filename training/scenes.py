"""Deterministic synthetic scenes with instance masks, hard the way real annotation is hard.

Each scene has 3-12 objects drawn back to front on a textured, cluttered background: convex and
concave polygons, ellipses, stars and thin structures (rings, lines, branches), with textured
fills; distractor clutter in colours close to the objects' colours; objects that touch and
occlude each other (earlier masks lose what later objects cover; objects left tiny are
dropped); a global lighting gradient, gamma and sensor noise; object scale from ~3% to ~45% of
the short side; image sides from 256 to 1024 px (non-square too).

A scene is a pure function of its integer seed. ``SceneDataset`` maps split and index to a seed
(``scene_seed``): train uses even seeds, held-out odd seeds, so the splits never share a scene.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from training.data import Sample

SPLITS = ("train", "heldout")
SHAPES = ("convex", "concave", "ellipse", "star", "ring", "line", "branch")
# Thin structures are rarer than solid shapes, as in real annotation.
SHAPE_WEIGHTS = np.array([0.18, 0.2, 0.17, 0.15, 0.1, 0.1, 0.1])
MIN_VISIBLE_FRACTION = 0.0008  # of the image area; below this an occluded object is dropped
MIN_VISIBLE_PIXELS = 48
MIN_OBJECTS, MAX_OBJECTS = 3, 12  # visible instances per scene
MAX_TOP_UP = 20  # extra placement attempts when occlusion left fewer than MIN_OBJECTS


@dataclass
class Scene:
    """A rendered scene: ``image`` (H, W, 3) uint8 RGB, ``masks`` (N, H, W) bool (visible parts,
    pairwise disjoint, back to front), ``kinds`` the shape name of each mask."""

    image: np.ndarray
    masks: np.ndarray
    kinds: list[str]


def scene_seed(split: str, index: int) -> int:
    """The seed of scene ``index`` of ``split``; train and held-out seeds are disjoint."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if index < 0:
        raise ValueError("index must be >= 0")
    return 2 * index + SPLITS.index(split)


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], shape (h, w): a ``cells``-wide random grid, resized."""
    gh = max(2, int(round(cells * h / max(h, w))))
    gw = max(2, int(round(cells * w / max(h, w))))
    grid = rng.random((gh, gw), dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC).clip(0.0, 1.0)


def _texture(rng: np.random.Generator, h: int, w: int, color: np.ndarray) -> np.ndarray:
    """A textured fill of mean colour ``color`` (3,), shape (h, w, 3) float32 in [0, 255]."""
    kind = rng.integers(4)
    amp = rng.uniform(10, 45)
    if kind == 0:  # blotchy noise
        t = smooth_noise(rng, h, w, int(rng.integers(3, 12))) - 0.5
        field = t[..., None] * amp * 2
    elif kind == 1:  # stripes at a random angle
        theta = rng.uniform(0, math.pi)
        k = 2 * math.pi / rng.uniform(4, 24)
        yy = np.arange(h, dtype=np.float32)[:, None] * (math.sin(theta) * k)
        xx = np.arange(w, dtype=np.float32)[None, :] * (math.cos(theta) * k)
        field = np.sin(xx + yy)[..., None] * amp
    elif kind == 2:  # checker / dots
        period = int(rng.integers(4, 18))
        yy = (np.arange(h)[:, None] // period) % 2
        xx = (np.arange(w)[None, :] // period) % 2
        c = (yy ^ xx).astype(np.float32) - 0.5
        field = c[..., None] * amp * 1.5
    else:  # fine grain
        field = rng.standard_normal((h, w, 1), dtype=np.float32) * (amp * 0.5)
    tint = rng.normal(0, 0.25, 3).astype(np.float32) + 1.0  # texture not perfectly grey
    return np.clip(color[None, None, :] + field * tint, 0, 255, dtype=np.float32)


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(20, 235, 3).astype(np.float32)


def _near_color(rng: np.random.Generator, color: np.ndarray, spread: float = 25) -> np.ndarray:
    return np.clip(color + rng.normal(0, spread, 3), 0, 255).astype(np.float32)


def _radial_polygon(
    rng: np.random.Generator, cx: float, cy: float, r: float, n: int, jitter: float
) -> np.ndarray:
    """A star-shaped polygon around (cx, cy): ``n`` vertices, radius jitter in [0, 1)."""
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = r * (1 - jitter * rng.random(n))
    aspect = rng.uniform(0.5, 1.0)
    rot = rng.uniform(0, 2 * math.pi)
    x = radii * np.cos(angles)
    y = radii * np.sin(angles) * aspect
    xr = x * math.cos(rot) - y * math.sin(rot)
    yr = x * math.sin(rot) + y * math.cos(rot)
    return np.stack([cx + xr, cy + yr], axis=1)


def draw_shape(
    rng: np.random.Generator, kind: str, h: int, w: int, cx: float, cy: float, r: float
) -> np.ndarray:
    """Rasterise one shape of radius ~``r`` px at (cx, cy); (h, w) uint8 0/1."""
    m = np.zeros((h, w), np.uint8)
    shift = 4  # sub-pixel precision for cv2 drawing
    scale = 1 << shift

    def pts(p: np.ndarray) -> np.ndarray:
        return np.round(p * scale).astype(np.int32).reshape(-1, 1, 2)

    if kind == "convex":
        poly = _radial_polygon(rng, cx, cy, r, int(rng.integers(3, 9)), 0.2)
        hull = cv2.convexHull(pts(poly))
        cv2.fillPoly(m, [hull], 1, cv2.LINE_8, shift)
    elif kind == "concave":
        poly = _radial_polygon(rng, cx, cy, r, int(rng.integers(6, 14)), 0.7)
        cv2.fillPoly(m, [pts(poly)], 1, cv2.LINE_8, shift)
    elif kind == "ellipse":
        axes = (int(r * scale), int(r * rng.uniform(0.3, 1.0) * scale))
        center = (int(cx * scale), int(cy * scale))
        cv2.ellipse(m, center, axes, rng.uniform(0, 180), 0, 360, 1, -1, cv2.LINE_8, shift)
    elif kind == "star":
        n = int(rng.integers(4, 9))
        base = rng.uniform(0, 2 * math.pi)
        ang = base + np.arange(2 * n) * math.pi / n
        inner = rng.uniform(0.3, 0.6)
        rad = np.where(np.arange(2 * n) % 2 == 0, r, r * inner)
        poly = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)
        cv2.fillPoly(m, [pts(poly)], 1, cv2.LINE_8, shift)
    elif kind == "ring":
        thickness = max(2, int(r * rng.uniform(0.12, 0.35)))
        axes = (int(r * scale), int(r * rng.uniform(0.6, 1.0) * scale))
        center = (int(cx * scale), int(cy * scale))
        sweep = 360 if rng.random() < 0.7 else rng.uniform(200, 330)  # some open arcs
        start = rng.uniform(0, 360)
        cv2.ellipse(
            m,
            center,
            axes,
            rng.uniform(0, 180),
            start,
            start + sweep,
            1,
            thickness,
            cv2.LINE_8,
            shift,
        )
    elif kind == "line":
        thickness = max(2, int(r * rng.uniform(0.06, 0.18)))
        n = int(rng.integers(2, 5))  # a polyline: straight or bent
        ang = rng.uniform(0, 2 * math.pi)
        seg = 2 * r / (n - 1)
        p = np.array([cx - r * math.cos(ang), cy - r * math.sin(ang)])
        poly = [p.copy()]
        for _ in range(n - 1):
            ang += rng.normal(0, 0.5)
            p = p + seg * np.array([math.cos(ang), math.sin(ang)])
            poly.append(p.copy())
        cv2.polylines(m, [pts(np.array(poly))], False, 1, thickness, cv2.LINE_8, shift)
    elif kind == "branch":
        thickness = max(2, int(r * rng.uniform(0.05, 0.14)))
        stack = [(np.array([cx, cy]), rng.uniform(0, 2 * math.pi), r * 0.7, 0)]
        while stack:
            p, ang, length, depth = stack.pop()
            q = p + length * np.array([math.cos(ang), math.sin(ang)])
            seg = np.stack([p, q])
            t = max(2, thickness - depth)
            cv2.polylines(m, [pts(seg)], False, 1, t, cv2.LINE_8, shift)
            if depth < 2:
                for _ in range(int(rng.integers(1, 4))):
                    stack.append((q, ang + rng.uniform(-1.1, 1.1), length * 0.6, depth + 1))
    else:
        raise ValueError(kind)
    return m


def _bbox(m: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the non-zero pixels of a (h, w) uint8 mask, or None if empty."""
    x, y, bw, bh = cv2.boundingRect(m)
    if bw == 0 or bh == 0:
        return None
    return y, y + bh, x, x + bw


def _render_background(
    rng: np.random.Generator, h: int, w: int, palette: list[np.ndarray]
) -> np.ndarray:
    """A textured background blended from two colours, plus clutter; (h, w, 3) float32."""
    c1, c2 = _random_color(rng), _random_color(rng)
    t = smooth_noise(rng, h, w, int(rng.integers(2, 8)))[..., None]
    # The base texture is rendered at half resolution (speed); clutter below is full resolution.
    hh, hw = (h + 1) // 2, (w + 1) // 2
    tex = _texture(rng, hh, hw, (c1 + c2) / 2)
    tex = cv2.resize(tex, (w, h), interpolation=cv2.INTER_LINEAR)
    bg = (c2 * 0.6 + tex * 0.4) + ((c1 - c2) * 0.6) * t
    # Clutter: shapes that are not instances, some in colours close to the objects' (distractors).
    n_clutter = int(rng.integers(3, 16))
    short = min(h, w)
    for _ in range(n_clutter):
        kind = SHAPES[rng.choice(len(SHAPES), p=SHAPE_WEIGHTS)]
        r = short * rng.uniform(0.02, 0.12)
        m = draw_shape(rng, kind, h, w, rng.uniform(0, w), rng.uniform(0, h), r)
        box = _bbox(m)
        if box is None:
            continue
        use_palette = palette and rng.random() < 0.5
        color = (
            _near_color(rng, palette[rng.integers(len(palette))])
            if use_palette
            else _random_color(rng)
        )
        y0, y1, x0, x1 = box
        tex = _texture(rng, y1 - y0, x1 - x0, color)
        sub = m[y0:y1, x0:x1].astype(bool)
        alpha = rng.uniform(0.4, 1.0)
        region = bg[y0:y1, x0:x1]
        region[sub] = region[sub] * (1 - alpha) + tex[sub] * alpha
    return bg


def draw_size(
    rng: np.random.Generator, size: int | tuple[int, int] | None, size_range: tuple[int, int]
) -> tuple[int, int]:
    """An image's (H, W): ``size`` (a side, or (H, W)), or, for ``None``, drawn from
    ``size_range`` (px, inclusive), square in about a third of the draws."""
    if size is None:
        lo, hi = size_range
        h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
        if rng.random() < 0.3:  # a good share of square images
            w = h
        return h, w
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


@dataclass(frozen=True)
class Camera:
    """What a camera does to a rendered picture: a smooth illumination field (``light_base`` +
    ``light_amp`` x low-frequency noise) times a global gain, a gamma curve, Gaussian sensor
    noise, and in ``blur_share`` of the pictures a slight Gaussian blur (``blur_kernel`` (0, 0):
    sized from its sigma)."""

    light_base: float
    light_amp: float
    gain: tuple[float, float]
    gamma: tuple[float, float]
    noise_sigma: tuple[float, float]
    blur_share: float
    blur_kernel: tuple[int, int]
    blur_sigma: tuple[float, float]
    # Whether the noise's sigma is drawn before the noise itself: the order each generator's
    # random stream was first written in, so that their pictures stay the same bit for bit.
    sigma_first: bool = True

    def shoot(self, rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
        """``image`` (H, W, 3) through this camera; uint8 out."""
        h, w = image.shape[:2]
        light = smooth_noise(rng, h, w, int(rng.integers(1, 4)))[..., None]
        light = (self.light_base + self.light_amp * light) * np.float32(rng.uniform(*self.gain))
        image = np.clip(image * light, 0, 255).astype(np.uint8)
        gamma = rng.uniform(*self.gamma)
        lut = (255.0 * (np.arange(256) / 255.0) ** gamma).round().astype(np.uint8)
        image = cv2.LUT(image, lut)
        if self.sigma_first:
            sigma = np.float32(rng.uniform(*self.noise_sigma))
            noise = rng.standard_normal((h, w), dtype=np.float32) * sigma
        else:
            noise = rng.standard_normal((h, w), dtype=np.float32)
            noise *= np.float32(rng.uniform(*self.noise_sigma))
        image = np.clip(image + noise[..., None], 0, 255).astype(np.uint8)
        if rng.random() < self.blur_share:
            image = cv2.GaussianBlur(image, self.blur_kernel, rng.uniform(*self.blur_sigma))
        return image


# The synthetic scenes' camera: strong light variation and noise, often a slight blur.
SCENE_CAMERA = Camera(
    light_base=0.55, light_amp=0.7, gain=(0.7, 1.2), gamma=(0.7, 1.4), noise_sigma=(1, 8),
    blur_share=0.5, blur_kernel=(3, 3), blur_sigma=(0.3, 1.0),
)  # fmt: skip


def make_scene(
    seed: int, size: int | tuple[int, int] | None = None, size_range: tuple[int, int] = (256, 1024)
) -> Scene:
    """Render scene ``seed``. ``size``: side (int) or (H, W); ``None`` draws H and W from
    ``size_range`` (px, inclusive). Same seed and size give the same scene, bit for bit."""
    rng = np.random.default_rng(seed)
    h, w = draw_size(rng, size, size_range)
    short = min(h, w)
    n_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    palette = [_random_color(rng) for _ in range(n_objects)]
    image = _render_background(rng, h, w, palette)

    masks: list[np.ndarray] = []  # (h, w) uint8 0/1, visible part so far
    boxes: list[tuple[int, int, int, int]] = []
    kinds: list[str] = []
    min_pixels = max(MIN_VISIBLE_PIXELS, int(MIN_VISIBLE_FRACTION * h * w))
    for i in range(n_objects + MAX_TOP_UP):
        top_up = i >= n_objects  # extra objects, only while fewer than 3 are visible
        if top_up and sum(cv2.countNonZero(m) >= min_pixels for m in masks) >= MIN_OBJECTS:
            break
        kind = SHAPES[rng.choice(len(SHAPES), p=SHAPE_WEIGHTS)]
        r = short * math.exp(rng.uniform(math.log(0.03), math.log(0.22)))
        cx, cy = rng.uniform(r * 0.5, w - r * 0.5), rng.uniform(r * 0.5, h - r * 0.5)
        if masks and not top_up and rng.random() < 0.45:
            # Touch or overlap an earlier object: centre near one of its pixels.
            k = int(rng.integers(len(masks)))
            y0, y1, x0, x1 = boxes[k]
            ys, xs = np.nonzero(masks[k][y0:y1, x0:x1])
            if len(ys):
                j = int(rng.integers(len(ys)))
                cx = x0 + xs[j] + rng.normal(0, r * 0.3)
                cy = y0 + ys[j] + rng.normal(0, r * 0.3)
        m = draw_shape(rng, kind, h, w, cx, cy, r)
        box = _bbox(m)
        if box is None:
            continue
        y0, y1, x0, x1 = box
        sub = m[y0:y1, x0:x1].astype(bool)
        if top_up and any(prev[y0:y1, x0:x1][sub].any() for prev in masks):
            continue  # a top-up object must not hide the others
        # Object colour: its own palette colour, sometimes close to an earlier object's colour.
        color = palette[i % n_objects]
        if i and rng.random() < 0.3:
            color = _near_color(rng, palette[int(rng.integers(min(i, n_objects)))], 20)
        tex = _texture(rng, y1 - y0, x1 - x0, color)
        shade = 0.8 + 0.4 * smooth_noise(rng, y1 - y0, x1 - x0, 2)[..., None]  # not flat
        image[y0:y1, x0:x1][sub] = (tex * shade)[sub]
        for prev in masks:  # occlusion: the new object hides what it covers
            prev[y0:y1, x0:x1][sub] = 0
        masks.append(m)
        boxes.append(box)
        kinds.append(kind)

    keep = [k for k, m in enumerate(masks) if cv2.countNonZero(m) >= min_pixels]

    image = SCENE_CAMERA.shoot(rng, image)
    stacked = np.stack([masks[k] for k in keep]).astype(bool) if keep else np.zeros((0, h, w), bool)
    return Scene(image=image, masks=stacked, kinds=[kinds[k] for k in keep])


class SceneDataset(Sequence[Sample]):
    """``n`` synthetic scenes of ``split`` ("train" or "heldout"), rendered on access.

    Deterministic: item ``i`` is always ``make_scene(scene_seed(split, i + offset))``.
    """

    def __init__(
        self,
        split: str = "train",
        n: int = 1000,
        size_range: tuple[int, int] = (256, 1024),
        offset: int = 0,
    ) -> None:
        scene_seed(split, 0)  # validates the split
        self.split, self.n, self.size_range, self.offset = split, n, size_range, offset

    def __len__(self) -> int:
        return self.n

    def seed(self, index: int) -> int:
        return scene_seed(self.split, index + self.offset)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if not isinstance(index, int):
            raise TypeError("SceneDataset supports integer indexing only")
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(index)
        scene = make_scene(self.seed(index), size_range=self.size_range)
        return Sample(
            image=scene.image, masks=scene.masks, name=f"{self.split}_{index + self.offset:06d}"
        )
