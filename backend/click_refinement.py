"""Refinement across clicks in ``/predict``: which prompts get the previous answer as a mask prompt.

Label Studio resends every keypoint of a region with each click. ``ClickRefinement`` keeps the
low-res logits of each answer (``stable_sam.refinement.ClickMemory``, scoped by project, task,
image, label and model version) and hands them back as ``mask_input`` when a new prompt extends
a remembered one by one point (the rule: ``stable_sam.refinement``).

``REFINE_MASKS``: ``"on"`` refines every extension, ``"off"`` none, ``"auto"`` (default) only
where the click-loop benchmark measured that refinement helps (``AUTO``), per model (plain SAM,
or Stable-SAM with any plugin version) and per first prompt of the chain (a click, or a box).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Literal

import numpy as np

from stable_sam.refinement import ClickMemory, FirstPrompt, PromptKey

RefineMode = Literal["auto", "on", "off"]
ModelKind = Literal["sam", "stable_sam"]

# Where refinement helps, measured on the embedded default's base with a simulated annotator
# (`python -m training.click_loop`, docs/BENCHMARKS.md "The click loop", 90 held-out objects):
# on only where NoC@90 and mIoU after 3 and 5 interactions all improve. With vs without:
#   SAM, clicks:        NoC@90 17.74 vs 17.91, mIoU@3 55.8 vs 54.9, mIoU@5 55.6 vs 52.9 -> on
#   SAM, box first:     NoC@90 17.92 vs 17.78, mIoU@3 56.0 vs 60.2, mIoU@5 53.5 vs 59.9 -> off
#   Stable-SAM, clicks: NoC@90 17.92 vs 17.78, mIoU@3 54.2 vs 53.9, mIoU@5 53.5 vs 53.6 -> off
#   Stable-SAM, box:    NoC@90 17.71 vs 17.89, mIoU@3 55.0 vs 59.1, mIoU@5 54.1 vs 58.7 -> off
# On 45 held-out real-picture composites (`--data composites`) the same four choices hold:
# SAM after a click +3.2 mIoU@5, after a box -5.6; Stable-SAM after a click +1.0 (within noise,
# and -0.1 on the synthetic split: kept off), after a box -8.5.
AUTO: dict[tuple[ModelKind, FirstPrompt], bool] = {
    ("sam", "click"): True,
    ("sam", "box"): False,
    ("stable_sam", "click"): False,
    ("stable_sam", "box"): False,
}


class ClickRefinement:
    """Recalls and remembers answers for the prompts that ``mode`` refines."""

    def __init__(self, mode: RefineMode, model: ModelKind, memory: ClickMemory) -> None:
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"unknown refinement mode {mode!r}")
        self.mode = mode
        self.model = model
        self.memory = memory

    def applies(self, prompt: PromptKey) -> bool:
        """Whether prompts of ``prompt``'s chain are refined (and so remembered)."""
        if self.mode == "auto":
            return AUTO[(self.model, prompt.first_prompt)]
        return self.mode == "on"

    def mask_input(self, image_key: str, scope: Hashable, prompt: PromptKey) -> np.ndarray | None:
        """The logits (1, s, s) to pass as ``mask_input`` for ``prompt``, or None (decode fresh)."""
        if not self.applies(prompt):
            return None
        return self.memory.recall(image_key, scope, prompt)

    def remember(
        self, image_key: str, scope: Hashable, prompt: PromptKey, logits: np.ndarray
    ) -> None:
        """Keep the answer's low-res ``logits`` for the chain's next click (if refined)."""
        if self.applies(prompt):
            self.memory.remember(image_key, scope, prompt, logits)
