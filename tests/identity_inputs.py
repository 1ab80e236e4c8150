"""The image and prompts the α = (0, 1) identity tests of each base decode (plain SAM against
Stable-SAM on the same frozen base): one box, positive + negative points, box + point."""

import numpy as np

IMAGE = np.random.default_rng(0).integers(0, 255, size=(180, 240, 3), dtype=np.uint8)
PROMPTS = {
    "box": dict(box_xyxy=np.array([20, 30, 150, 160])),
    "points": dict(point_coords=np.array([[50, 60], [120, 90]]), point_labels=np.array([1, 0])),
    "box+points": dict(
        box_xyxy=np.array([20, 30, 150, 160]),
        point_coords=np.array([[60, 70]]),
        point_labels=np.array([1]),
    ),
}
