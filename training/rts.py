"""The robust training strategy (RTS) of Stable-SAM (Fan et al., ICLR 2025, §3.4; DESIGN §2).

Per training image: large-scale jittering into SAM's square input frame, occlusion synthesis with
probability 0.5, then per object a prompt drawn from a mix of good and poor prompts — the GT box,
a noisy box (noise scale 0.4, IoU ≥ 0.5 to the GT box), 1/3/5/10 positive points, a coarse mask.
The loss is BCE + Dice (``training.engine.bce_dice_loss``), on the logits upsampled to the frame.

Everything here works in the model's input frame: an S x S image (S = 256 for the mini SAM,
1024 for official SAM) with the content at the top left and zero padding at the bottom right, as
SAM's ``preprocess`` pads. Masks are (N, S, S) bool in that frame.

Choices the paper does not publish (all in ``RTSConfig``):

* LSJ scale range (0.5, 2.0) of the frame's side: the usual (0.1, 2.0) would shrink a 256 px
  frame's objects to a few pixels, below what a 64 x 64 low-res mask can represent.
* The occluder is scaled so its box diagonal is 0.25–0.75 of the target's box diagonal (partial
  occlusion; a larger occluder mostly deletes the target), flipped horizontally with p = 0.5, and
  becomes an instance of its own (it is a real object in the augmented image).
* Prompt-type weights: noisy boxes count double (they are the prompt the paper's users make most
  and the one SAM is weakest on); every other type has weight 1.
* Loss on the low-res logits *upsampled* (bilinear) to the S x S frame against the GT mask at S:
  the GT keeps its thin structures (rings, lines) that a 4x downsampled target would lose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from torch import Tensor

from stable_sam import prompts
from stable_sam.prompts import Prompt
from stable_sam.transforms import mask_to_low_res_logits
from training.data import Sample

# Prompt types of the RTS mix (and of the benchmark, minus the coarse mask).
PROMPT_KINDS = (
    "gt_box",
    "noisy_box",
    "points_1",
    "points_3",
    "points_5",
    "points_10",
    "coarse_mask",
)
CLEAN_PROMPT_KINDS = ("gt_box",)  # "DSP without RTS" (paper Table 5) trains on GT boxes only


@dataclass
class RTSConfig:
    """Settings of the robust training strategy."""

    robust: bool = True  # False: clean prompts only (GT boxes), no occlusion synthesis
    occlusion_prob: float = 0.5
    lsj_scale_range: tuple[float, float] = (0.5, 2.0)  # long side / S
    flip_prob: float = 0.5  # horizontal flip of the whole augmented image
    occluder_scale_range: tuple[float, float] = (0.25, 0.75)  # occluder diag / target box diag
    occluder_flip_prob: float = 0.5
    noise_scale: float = 0.4  # noisy box noise on centre, width and height
    min_noisy_iou: float = 0.5
    min_target_pixels: int = 16  # in the S x S frame; smaller objects are not prompted
    prompt_weights: dict[str, float] = field(
        default_factory=lambda: {
            "gt_box": 1.0,
            "noisy_box": 2.0,
            "points_1": 1.0,
            "points_3": 1.0,
            "points_5": 1.0,
            "points_10": 1.0,
            "coarse_mask": 1.0,
        }
    )

    def kinds_and_probs(self) -> tuple[tuple[str, ...], np.ndarray]:
        """The prompt kinds in use and their sampling probabilities."""
        if not self.robust:
            return CLEAN_PROMPT_KINDS, np.ones(1)
        unknown = set(self.prompt_weights) - set(PROMPT_KINDS)
        if unknown:
            raise ValueError(f"unknown prompt kinds {sorted(unknown)}; expected {PROMPT_KINDS}")
        kinds = tuple(k for k in PROMPT_KINDS if self.prompt_weights.get(k, 0.0) > 0)
        w = np.array([self.prompt_weights[k] for k in kinds], dtype=np.float64)
        return kinds, w / w.sum()


@dataclass
class AugmentedImage:
    """One training image in the model's input frame.

    ``image``: (S, S, 3) uint8, content at the top left, zero padding elsewhere. ``masks``:
    (N, S, S) bool. ``valid_hw``: (h, w) of the content region.
    """

    image: np.ndarray
    masks: np.ndarray
    valid_hw: tuple[int, int]


@dataclass(kw_only=True)
class TargetPrompt(Prompt):
    """One RTS prompt (a ``stable_sam.prompts.Prompt`` in input-frame pixels; points all
    positive) for one target, with the kind it was drawn as."""

    kind: str
    target: int  # index into AugmentedImage.masks


# ----------------------------------------------------------------------------- geometry


def resize_masks(masks: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize (N, H, W) bool masks to (N, h, w) (area filter when shrinking, threshold 0.5)."""
    h, w = hw
    if len(masks) == 0:
        return np.zeros((0, h, w), bool)
    shrinking = h < masks.shape[1]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    out = []
    for start in range(0, len(masks), 4):  # cv2.resize handles up to 4 channels in every mode
        chunk = np.ascontiguousarray(masks[start : start + 4].transpose(1, 2, 0), dtype=np.uint8)
        r = cv2.resize(chunk * 255, (w, h), interpolation=interp)
        out.append(r.reshape(h, w, -1).transpose(2, 0, 1) >= 128)
    return np.concatenate(out)


def large_scale_jitter(
    image: np.ndarray,
    masks: np.ndarray,
    side: int,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip_prob: float = 0.5,
) -> AugmentedImage:
    """LSJ (Ghiasi et al. 2021) into an S x S frame: resize the long side to ``side · u``,
    u ~ U(scale_range), random crop when larger than the frame, pad bottom-right when smaller,
    horizontal flip with ``flip_prob``."""
    h, w = image.shape[:2]
    long_side = side * rng.uniform(*scale_range)
    scale = long_side / max(h, w)
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    # Crop in the original image first so that zooming in does not resize pixels we drop.
    ch, cw = min(nh, side), min(nw, side)
    y0 = int(rng.integers(0, nh - ch + 1))
    x0 = int(rng.integers(0, nw - cw + 1))
    oy0, oy1 = int(np.floor(y0 / scale)), min(h, int(np.ceil((y0 + ch) / scale)))
    ox0, ox1 = int(np.floor(x0 / scale)), min(w, int(np.ceil((x0 + cw) / scale)))
    sub_img, sub_masks = image[oy0:oy1, ox0:ox1], masks[:, oy0:oy1, ox0:ox1]
    th, tw = max(1, int(round((oy1 - oy0) * scale))), max(1, int(round((ox1 - ox0) * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    sub_img = cv2.resize(sub_img, (tw, th), interpolation=interp)
    sub_masks = resize_masks(sub_masks, (th, tw))
    dy, dx = y0 - int(round(oy0 * scale)), x0 - int(round(ox0 * scale))
    dy, dx = min(max(dy, 0), max(th - ch, 0)), min(max(dx, 0), max(tw - cw, 0))
    sub_img = sub_img[dy : dy + ch, dx : dx + cw]
    sub_masks = sub_masks[:, dy : dy + ch, dx : dx + cw]
    ch, cw = sub_img.shape[:2]
    if rng.random() < flip_prob:
        sub_img, sub_masks = sub_img[:, ::-1], sub_masks[:, :, ::-1]
    out_img = np.zeros((side, side, 3), np.uint8)
    out_img[:ch, :cw] = sub_img
    out_masks = np.zeros((len(masks), side, side), bool)
    out_masks[:, :ch, :cw] = sub_masks
    return AugmentedImage(out_img, out_masks, (ch, cw))


# ----------------------------------------------------------------------------- occlusion


def paste_object(
    image: np.ndarray,
    masks: np.ndarray,
    patch: np.ndarray,
    patch_mask: np.ndarray,
    top_left_yx: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paste an object over an image and update the instance masks.

    Arguments:
      image: (H, W, 3) uint8. masks: (N, H, W) bool.
      patch: (h, w, 3) uint8 pixels of the object. patch_mask: (h, w) bool, its shape.
      top_left_yx: where the patch's (0, 0) lands; may lie partly outside the image (clipped).

    Returns:
      image (H, W, 3) with the object painted, masks (M, H, W) — occluded pixels removed, fully
      occluded objects dropped, the pasted object (its visible part) appended last when
      non-empty — and ``kept`` (N,) bool, which input masks survived.
    """
    H, W = image.shape[:2]
    y, x = top_left_yx
    h, w = patch_mask.shape
    iy0, ix0, iy1, ix1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
    occluder = np.zeros((H, W), bool)
    image = image.copy()
    if iy1 > iy0 and ix1 > ix0:
        pm = patch_mask[iy0 - y : iy1 - y, ix0 - x : ix1 - x]
        occluder[iy0:iy1, ix0:ix1] = pm
        image[iy0:iy1, ix0:ix1][pm] = patch[iy0 - y : iy1 - y, ix0 - x : ix1 - x][pm]
    masks = masks & ~occluder[None]
    kept = masks.reshape(len(masks), -1).any(axis=1)
    masks = masks[kept]
    if occluder.any():
        masks = np.concatenate([masks, occluder[None]])
    return image, masks, kept


def synthesize_occlusion(
    target: AugmentedImage,
    donor_image: np.ndarray,
    donor_mask: np.ndarray,
    rng: np.random.Generator,
    config: RTSConfig,
) -> AugmentedImage:
    """Paste the donor object (scale-jittered, maybe flipped) so that its centre lies inside the
    box of a randomly chosen target object; see ``paste_object`` for the mask update."""
    areas = target.masks.sum(axis=(1, 2))  # (N,) even for N = 0, unlike reshape(N, -1)
    candidates = np.flatnonzero(areas >= config.min_target_pixels)
    if candidates.size == 0 or not donor_mask.any():
        return target
    tbox = prompts.gt_box(target.masks[int(rng.choice(candidates))])
    dbox = prompts.gt_box(donor_mask)
    x0, y0, x1, y1 = (int(v) for v in dbox)
    patch, patch_mask = donor_image[y0:y1, x0:x1], donor_mask[y0:y1, x0:x1]
    t_diag = float(np.hypot(tbox[2] - tbox[0], tbox[3] - tbox[1]))
    d_diag = float(np.hypot(x1 - x0, y1 - y0))
    scale = rng.uniform(*config.occluder_scale_range) * t_diag / d_diag
    ph, pw = max(1, int(round((y1 - y0) * scale))), max(1, int(round((x1 - x0) * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    patch = cv2.resize(np.ascontiguousarray(patch), (pw, ph), interpolation=interp)
    patch_mask = resize_masks(patch_mask[None], (ph, pw))[0]
    if rng.random() < config.occluder_flip_prob:
        patch, patch_mask = patch[:, ::-1], patch_mask[:, ::-1]
    if not patch_mask.any():
        return target
    cx, cy = rng.uniform(tbox[0], tbox[2]), rng.uniform(tbox[1], tbox[3])
    top_left = (int(round(cy - ph / 2)), int(round(cx - pw / 2)))
    # Paint only inside the content region: the padding must stay zero, as SAM pads.
    vh, vw = target.valid_hw
    ys = np.arange(ph)[:, None] + top_left[0]
    xs = np.arange(pw)[None, :] + top_left[1]
    clip = (ys < vh) & (xs < vw)
    image, masks, _ = paste_object(target.image, target.masks, patch, patch_mask & clip, top_left)
    return AugmentedImage(image, masks, target.valid_hw)


def augment(
    sample: Sample,
    donor: Sample | None,
    side: int,
    rng: np.random.Generator,
    config: RTSConfig,
) -> AugmentedImage:
    """The RTS image pipeline: LSJ, then (robust mode, probability ``occlusion_prob``) an object
    of ``donor`` pasted over one of the targets. ``donor`` may be ``sample`` itself."""
    aug = large_scale_jitter(
        sample.image, sample.masks, side, rng, config.lsj_scale_range, config.flip_prob
    )
    if (
        config.robust
        and donor is not None
        and donor.num_instances > 0
        and rng.random() < config.occlusion_prob
    ):
        k = int(rng.integers(donor.num_instances))
        aug = synthesize_occlusion(aug, donor.image, donor.masks[k], rng, config)
    return aug


# ----------------------------------------------------------------------------- prompts


def make_prompt(
    kind: str, mask: np.ndarray, target: int, side: int, rng: np.random.Generator, config: RTSConfig
) -> TargetPrompt:
    """A prompt of ``kind`` for one (S, S) target mask, in input-frame pixels."""
    if kind == "gt_box":
        return TargetPrompt(kind=kind, target=target, box_xyxy=prompts.gt_box(mask))
    if kind == "noisy_box":
        box = prompts.gt_box(mask)
        try:
            noisy = prompts.noisy_box(
                box, rng, config.noise_scale, (config.min_noisy_iou, 1.0), image_size=(side, side)
            )
        except ValueError:  # degenerate box at the frame edge: fall back to the clean box
            noisy = box
        return TargetPrompt(kind=kind, target=target, box_xyxy=noisy)
    if kind.startswith("points_"):
        k = int(kind.removeprefix("points_"))
        return TargetPrompt(kind=kind, target=target, points_xy=prompts.sample_points(mask, k, rng))
    if kind == "coarse_mask":
        coarse = prompts.coarse_mask(mask, rng)
        return TargetPrompt(
            kind=kind, target=target, mask_logits=mask_to_low_res_logits(coarse, side)
        )
    raise ValueError(f"unknown prompt kind {kind!r}")


def sample_prompts(
    aug: AugmentedImage, n: int, rng: np.random.Generator, config: RTSConfig
) -> list[TargetPrompt]:
    """``n`` prompts for the image's objects (each object at least once when n allows), each
    of a kind drawn from the RTS mix. Objects under ``min_target_pixels`` are skipped."""
    areas = aug.masks.sum(axis=(1, 2))
    valid = np.flatnonzero(areas >= config.min_target_pixels)
    if valid.size == 0 or n <= 0:
        return []
    targets = rng.permutation(valid)[:n] if valid.size >= n else valid
    if targets.size < n:
        targets = np.concatenate([targets, rng.choice(valid, n - targets.size)])
    kinds, probs = config.kinds_and_probs()
    side = aug.image.shape[0]
    chosen = rng.choice(len(kinds), size=n, p=probs)
    return [
        make_prompt(kinds[c], aug.masks[t], int(t), side, rng, config)
        for t, c in zip(targets, chosen, strict=True)
    ]


def group_prompts(batch: Sequence[TargetPrompt]) -> dict[str, list[TargetPrompt]]:
    """Prompts grouped by kind: SAM's prompt encoder takes one prompt layout per call."""
    groups: dict[str, list[TargetPrompt]] = {}
    for p in batch:
        groups.setdefault(p.kind, []).append(p)
    return groups


def prompt_tensors(
    group: Sequence[TargetPrompt], device: torch.device
) -> tuple[tuple[Tensor, Tensor] | None, Tensor | None, Tensor | None]:
    """SAM prompt-encoder inputs for prompts of one kind: points (coords (B,k,2), labels (B,k)),
    boxes (B,4) or mask logits (B,1,S/4,S/4), all in the input frame."""
    first = group[0]
    if first.box_xyxy is not None:
        boxes = torch.as_tensor(np.stack([p.box_xyxy for p in group]), device=device)
        return None, boxes.float(), None
    if first.points_xy is not None:
        coords = torch.as_tensor(np.stack([p.points_xy for p in group]), device=device).float()
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=device)
        return (coords, labels), None, None
    logits = torch.as_tensor(np.stack([p.mask_logits for p in group]), device=device)
    return None, None, logits.float()


__all__ = [
    "CLEAN_PROMPT_KINDS",
    "PROMPT_KINDS",
    "AugmentedImage",
    "RTSConfig",
    "TargetPrompt",
    "augment",
    "group_prompts",
    "large_scale_jitter",
    "make_prompt",
    "paste_object",
    "prompt_tensors",
    "resize_masks",
    "sample_prompts",
    "synthesize_occlusion",
]
