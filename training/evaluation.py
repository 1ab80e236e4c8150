"""The evaluation protocol: prompts per object, decoding through the predictor, scoring.

The benchmark (paper Tables 1, 5, 6), the training job's promotion check, pretraining's held-out
score and the user study measure masks this one way:

- **Prompts** (``object_prompts``), per object and prompt kind: the GT box (deterministic: one
  prompt); ``n_prompts`` noisy boxes (``stable_sam.prompts.noisy_box``: noise scale 0.4, IoU
  with the GT box >= 0.5, clipped to the image); ``n_prompts`` draws of k positive points
  (``points_k``, k = 1, 3, 5, 10). Kinds are drawn in ``PROMPT_KINDS`` order from one generator;
  ``evaluate`` seeds one per image from ``(seed, image index)``, so an image's prompts do not
  depend on the images before it and every model sees the same prompts.
- **Decoding** (``decode``): ``StableSamPredictor.predict_batch(multimask_output=None)``, so
  the predictor's own ``multimask_policy`` chooses single or best-of-3 output, as it does when
  it serves. Masks at the original image size.
- **Scoring** (``score_object``, ``summarize``): per object, the mean mask IoU and boundary IoU
  (``stable_sam.metrics``, HQ-SAM's boundary) over its prompts and the stability ST over them;
  per model and kind, means over objects (every object weighs the same). Fractions, not percent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from stable_sam import metrics, prompts
from training import rts
from training.data import Sample

if TYPE_CHECKING:
    from stable_sam import StableSamPlugins, StableSamPredictor
    from stable_sam.cache import ImageEmbedding
    from stable_sam.predictor import MultimaskPolicy

# RTS's prompt vocabulary without the coarse mask: the paper evaluates boxes and clicks only.
PROMPT_KINDS = tuple(kind for kind in rts.PROMPT_KINDS if kind != "coarse_mask")
KIND_TITLES = {
    "gt_box": "GT box",
    "noisy_box": "Noisy box",
    "points_1": "1 point",
    "points_3": "3 points",
    "points_5": "5 points",
    "points_10": "10 points",
}
NOISE_SCALE = 0.4  # noisy boxes: HQ-SAM's and Stable-SAM's evaluation noise
NOISY_IOU_RANGE = (0.5, 1.0)


# ----------------------------------------------------------------------------- prompts


@dataclass
class ObjectPrompts:
    """The prompts of one object, by kind: boxes (n, 4) xyxy or positive points (n, k, 2) xy,
    in pixels of the original image."""

    by_kind: dict[str, np.ndarray] = field(default_factory=dict)


def noisy_boxes(
    box_xyxy: np.ndarray,
    rng: np.random.Generator,
    n: int,
    image_hw: tuple[int, int],
    noise_scale: float = NOISE_SCALE,
) -> np.ndarray:
    """``n`` noisy versions (n, 4) float32 of a GT box: IoU >= 0.5 with it, clipped to the image.

    A draw that cannot land in the IoU range (a box of a pixel or two) keeps the GT box.
    """
    boxes = []
    for _ in range(n):
        try:
            boxes.append(
                prompts.noisy_box(box_xyxy, rng, noise_scale, NOISY_IOU_RANGE, image_size=image_hw)
            )
        except ValueError:
            boxes.append(box_xyxy)
    return np.asarray(boxes, dtype=np.float32).reshape(n, 4)


def object_prompts(
    mask: np.ndarray,
    rng: np.random.Generator,
    n_prompts: int,
    kinds: Sequence[str] = PROMPT_KINDS,
) -> ObjectPrompts:
    """The protocol's prompts of ``kinds`` for one (H, W) object mask (see the module doc)."""
    box = prompts.gt_box(mask)
    out = ObjectPrompts()
    for kind in kinds:
        if kind == "gt_box":
            out.by_kind[kind] = box[None]
        elif kind == "noisy_box":
            out.by_kind[kind] = noisy_boxes(box, rng, n_prompts, mask.shape)
        elif kind.startswith("points_"):
            k = int(kind.removeprefix("points_"))
            out.by_kind[kind] = np.stack(
                [prompts.sample_points(mask, k, rng) for _ in range(n_prompts)]
            )
        else:
            raise ValueError(f"unknown prompt kind {kind!r}; expected one of {PROMPT_KINDS}")
    return out


def image_prompts(
    sample: Sample,
    index: int,
    seed: int,
    n_prompts: int,
    max_objects: int | None = None,
    kinds: Sequence[str] = PROMPT_KINDS,
) -> tuple[np.ndarray, list[ObjectPrompts]]:
    """The objects evaluated on image ``index`` of a dataset (all, or ``max_objects`` chosen at
    random) and their prompts, from a generator seeded by ``(seed, index)``."""
    rng = np.random.default_rng([seed, index])
    objects = np.arange(sample.num_instances)
    if max_objects is not None and objects.size > max_objects:
        objects = np.sort(rng.choice(objects, max_objects, replace=False))
    return objects, [object_prompts(sample.masks[o], rng, n_prompts, kinds) for o in objects]


# ----------------------------------------------------------------------------- decoding


@dataclass
class EvalModel:
    """A model as evaluated: its predictor (whose ``multimask_policy`` decides between single
    and best-of-3 output), the plugin set to decode with (None: the model's own) and, for
    reports, what it is."""

    key: str
    predictor: StableSamPredictor
    plugins: StableSamPlugins | None = None
    description: str = ""

    def with_policy(self, policy: MultimaskPolicy, key: str) -> EvalModel:
        """The same model and embedding cache behind a predictor with another policy."""
        from stable_sam import StableSamPredictor

        predictor = StableSamPredictor(
            self.predictor.model, cache=self.predictor.cache, multimask_policy=policy
        )
        return EvalModel(key, predictor, self.plugins, self.description)


def decode(
    model: EvalModel,
    embedding: ImageEmbedding,
    prompt_batch: np.ndarray,
    max_batch: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Masks for B prompts of one kind on one image: boxes (B, 4) or positive points (B, k, 2).

    Returns masks (B, H, W) bool at the original size and the routing weights (B, 2) (None for
    plain SAM). At most ``max_batch`` prompts go to the decoder at once (None: all of them).
    """
    h, w = embedding.original_size
    if len(prompt_batch) == 0:
        return np.zeros((0, h, w), dtype=bool), None
    step = max_batch or len(prompt_batch)
    masks, alphas = [], []
    for start in range(0, len(prompt_batch), step):
        chunk = np.asarray(prompt_batch[start : start + step], dtype=np.float32)
        if chunk.ndim == 2:
            prompt = {"boxes_xyxy": chunk}
        else:
            prompt = {"point_coords": chunk, "point_labels": np.ones(chunk.shape[:2], np.int64)}
        batch = model.predictor.predict_batch(
            embedding=embedding, multimask_output=None, plugins=model.plugins, **prompt
        )
        assert batch.masks is not None  # return_masks defaults to True
        masks.append(batch.masks[:, 0])
        alphas.append(batch.alpha)
    alpha = None if alphas[0] is None else np.concatenate(alphas)
    return np.concatenate(masks), alpha


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class ObjectScore:
    """One object's masks from the prompts of one kind, against its GT mask (fractions):
    ``ious`` and ``bious`` per prompt; ``st`` the stability over them (1 for a single prompt,
    by definition)."""

    ious: tuple[float, ...]
    bious: tuple[float, ...]
    st: float

    @property
    def n(self) -> int:
        return len(self.ious)

    @property
    def iou(self) -> float:
        return float(np.mean(self.ious))

    @property
    def biou(self) -> float:
        return float(np.mean(self.bious))


def score_object(gt_mask: np.ndarray, masks: np.ndarray) -> ObjectScore:
    """Score B >= 1 predicted masks (B, H, W) bool of one object against its (H, W) GT mask.

    Computed inside the bounding box of the GT and every prediction, grown by 1 px, with the
    boundary band as wide as on the full image: the same numbers as on the full image (every
    pixel outside is background in all masks), at a fraction of the cost.
    """
    if len(masks) == 0:
        raise ValueError("score_object needs at least one predicted mask")
    gt_mask = np.asarray(gt_mask, dtype=bool)
    hw = gt_mask.shape
    ys, xs = np.nonzero(gt_mask | masks.any(axis=0))
    if ys.size == 0:  # nothing anywhere: the whole (empty) image
        y0, y1, x0, x1 = 0, hw[0], 0, hw[1]
    else:
        y0, y1 = max(0, int(ys.min()) - 1), min(hw[0], int(ys.max()) + 2)
        x0, x1 = max(0, int(xs.min()) - 1), min(hw[1], int(xs.max()) + 2)
    preds = [m[y0:y1, x0:x1] for m in masks]
    gt = gt_mask[y0:y1, x0:x1]
    # Ratio chosen so that round(ratio · crop diagonal) is the full image's band width.
    ratio = metrics.boundary_dilation(hw) / float(np.hypot(*gt.shape))
    return ObjectScore(
        ious=tuple(metrics.mask_iou(p, gt) for p in preds),
        bious=tuple(metrics.boundary_iou(p, gt, dilation_ratio=ratio) for p in preds),
        st=metrics.stability(preds),
    )


def summarize(
    scores: Sequence[ObjectScore], st_min_prompts: int = 1
) -> dict[str, float | int | None]:
    """``miou``, ``mbiou``: means over objects of their per-object means; ``st``: the mean over
    objects with at least ``st_min_prompts`` prompts; ``objects``, ``prompts``: counts. A mean
    over nothing is None."""
    sts = [s.st for s in scores if s.n >= st_min_prompts]
    return {
        "miou": float(np.mean([s.iou for s in scores])) if scores else None,
        "mbiou": float(np.mean([s.biou for s in scores])) if scores else None,
        "st": float(np.mean(sts)) if sts else None,
        "objects": len(scores),
        "prompts": int(sum(s.n for s in scores)),
    }


# ----------------------------------------------------------------------------- evaluation


@dataclass
class ModelScores:
    """One model's scores: per prompt kind, an ``ObjectScore`` per object (dataset order) and
    the DRP routing weight α1 of every prompt (nothing for plain SAM)."""

    objects: dict[str, list[ObjectScore]] = field(default_factory=dict)
    alpha1: dict[str, list[float]] = field(default_factory=dict)


def evaluate(
    models: Sequence[EvalModel],
    dataset: Sequence[Sample],
    kinds: Sequence[str] = PROMPT_KINDS,
    n_prompts: int = 20,
    max_objects: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, ModelScores]:
    """Score every model with the protocol's prompts on ``dataset``; keyed by ``EvalModel.key``.

    Each image is embedded once per encoder (``StableSamPredictor.encoder_id``: the base, plus
    HQ-SAM parameters trained on it), by the first model's predictor with that encoder (from its
    cache when it has seen the image). Each kind's prompts of all an image's objects are decoded
    in one batch.
    """
    scores = {m.key: ModelScores() for m in models}
    indices: Sequence[int] = range(len(dataset))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="evaluation", unit="image")
    for index in indices:
        sample = dataset[index]
        if sample.num_instances == 0:
            continue
        objects, per_object = image_prompts(sample, index, seed, n_prompts, max_objects, kinds)
        embeddings: dict[str, ImageEmbedding] = {}
        for model in models:
            encoder = model.predictor.encoder_id
            if encoder not in embeddings:
                embeddings[encoder] = model.predictor.embed(sample.image)
            embedding = embeddings[encoder]
            for kind in kinds:
                arrays = [p.by_kind[kind] for p in per_object]
                masks, alpha = decode(model, embedding, np.concatenate(arrays))
                by_object = np.split(masks, np.cumsum([len(a) for a in arrays])[:-1])
                scores[model.key].objects.setdefault(kind, []).extend(
                    score_object(sample.masks[o], m)
                    for o, m in zip(objects, by_object, strict=True)
                )
                if alpha is not None:
                    scores[model.key].alpha1.setdefault(kind, []).extend(
                        float(a) for a in alpha[:, 0]
                    )
    return scores


__all__ = [
    "KIND_TITLES",
    "PROMPT_KINDS",
    "EvalModel",
    "ModelScores",
    "ObjectPrompts",
    "ObjectScore",
    "decode",
    "evaluate",
    "image_prompts",
    "noisy_boxes",
    "object_prompts",
    "score_object",
    "summarize",
]
