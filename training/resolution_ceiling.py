"""The best mIoU any SAM of a given input size can reach on the held-out scenes.

SAM predicts masks as low-res logits on a grid of a quarter of its input size (64 x 64 for the
mini SAM's 256 px input) and upsamples them bilinearly to the image. This script passes the
ground-truth masks themselves through that grid and back, as ``Sam.postprocess_masks`` does,
and scores the result against the originals. Two representations of a perfect prediction:

- ``area``: the mask's area-averaged coverage of each grid cell, thresholded at 0.5;
- ``signed distance``: the signed distance to the mask boundary sampled on the grid,
  thresholded at 0 (smooth logits that place the boundary between grid points).

No model can beat the better of the two by much, so it bounds the GT-box mIoU a base of that
input size can reach.

    python -m training.resolution_ceiling --input-size 256 --n 100
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from training.scenes import make_scene, scene_seed


def _iou(pred: torch.Tensor, gt: torch.Tensor) -> list[float]:
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float().clamp(min=1)
    return (inter / union).tolist()


def _through_grid(
    values: torch.Tensor,
    input_size: int,
    resized_hw: tuple[int, int],
    hw: tuple[int, int],
    mode: str,
    pad: float,
) -> torch.Tensor:
    """(N,1,H,W) float at the original size -> the same after the low-res grid and back.
    ``mode`` ("area" or "bilinear") resamples down to the grid; ``pad`` fills the padding."""
    nh, nw = resized_hw
    grid = input_size // 4
    kwargs = {} if mode == "area" else {"align_corners": False}
    r = F.interpolate(values, (nh, nw), mode=mode, **kwargs)
    r = F.pad(r, (0, input_size - nw, 0, input_size - nh), value=pad)
    low = F.interpolate(r, (grid, grid), mode=mode, **kwargs)
    up = F.interpolate(low, (input_size, input_size), mode="bilinear", align_corners=False)
    return F.interpolate(up[..., :nh, :nw], hw, mode="bilinear", align_corners=False)[:, 0]


def resolution_ceiling(input_size: int = 256, n: int = 100) -> dict[str, dict[str, float]]:
    """{shape kind or "all": {"objects", "area", "signed_distance"}} with mIoU in percent over
    the first ``n`` held-out scenes (the split and sizes of ``training.pretrain``'s evaluation)."""
    transform = ResizeLongestSide(input_size)
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for i in range(n):
        scene = make_scene(scene_seed("heldout", i), size_range=(256, 1024))
        h, w = scene.image.shape[:2]
        resized = transform.get_preprocess_shape(h, w, input_size)
        gt = torch.from_numpy(scene.masks)
        coverage = gt.float()[:, None]
        area = _through_grid(coverage, input_size, resized, (h, w), "area", 0.0) > 0.5
        distances = []
        for mask in scene.masks.astype(np.uint8):
            inside = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
            outside = cv2.distanceTransform(1 - mask, cv2.DIST_L2, 5)
            distances.append((inside - outside) * (input_size / max(h, w)))
        sdf = torch.from_numpy(np.stack(distances))[:, None]
        sdf = _through_grid(sdf, input_size, resized, (h, w), "bilinear", -float(input_size))
        sdf = sdf > 0
        for kind, a, s in zip(scene.kinds, _iou(area, gt), _iou(sdf, gt), strict=True):
            for key in (kind, "all"):
                scores[key]["area"].append(a)
                scores[key]["signed_distance"].append(s)
    return {
        key: {
            "objects": len(v["area"]),
            "area": 100 * float(np.mean(v["area"])),
            "signed_distance": 100 * float(np.mean(v["signed_distance"])),
        }
        for key, v in sorted(scores.items())
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input-size", type=int, default=256, help="SAM input side (px)")
    p.add_argument("--n", type=int, default=100, help="held-out scenes")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    grid = args.input_size // 4
    print(f"input {args.input_size} px, low-res grid {grid} x {grid}, {args.n} held-out scenes")
    print("| objects | n | area mIoU | signed-distance mIoU |\n|---|---|---|---|")
    for key, r in resolution_ceiling(args.input_size, args.n).items():
        print(f"| {key} | {r['objects']} | {r['area']:.1f} | {r['signed_distance']:.1f} |")


if __name__ == "__main__":
    main()
