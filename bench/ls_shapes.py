"""Label Studio JSON shapes that the stand-in Label Studio and the tests build."""

from __future__ import annotations

from typing import Any

import numpy as np
from label_studio_sdk.converter.brush import mask2rle


def brush_region(
    mask: np.ndarray,
    region_id: str,
    from_name: str = "tag",
    to_name: str = "image",
    label: str = "Object",
) -> dict[str, Any]:
    """A ``brushlabels`` region as the browser submits it and Label Studio stores it: 0/255 RGBA
    RLE of the whole image (the sdk's own encoder)."""
    h, w = mask.shape
    return {
        "id": region_id,
        "type": "brushlabels",
        "from_name": from_name,
        "to_name": to_name,
        "origin": "manual",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {
            "format": "rle",
            "rle": mask2rle(mask.astype(np.uint8) * 255),
            "brushlabels": [label],
        },
    }
