"""Label Studio regions -> SAM prompts: one ``RegionGroup`` (``labelstudio.regions``) becomes
the points and box SAM takes, in pixels of the image as the browser shows it."""

from __future__ import annotations

import numpy as np

from labelstudio.geometry import percent_to_pixels
from labelstudio.regions import RegionGroup, rectangle_box
from stable_sam.prompts import Prompt


def group_to_prompt(group: RegionGroup, width: int, height: int) -> Prompt:
    """SAM prompt in pixels for an image of ``width`` x ``height`` (as the browser shows it).

    SAM takes one box: with several rectangles for one label, the last one drawn wins.
    """
    points = labels = box = None
    if group.keypoints:
        points_pct = np.array([[k.x, k.y] for k in group.keypoints])
        points = percent_to_pixels(points_pct, width, height).astype(np.float32)
        points[:, 0] = points[:, 0].clip(0, width)
        points[:, 1] = points[:, 1].clip(0, height)
        labels = np.array([1 if k.positive else 0 for k in group.keypoints], dtype=np.int64)
    if group.rectangles:
        box = rectangle_box(group.rectangles[-1], width, height)
    return Prompt(points_xy=points, point_labels=labels, box_xyxy=box)
