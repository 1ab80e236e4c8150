"""Consensus rules for crowd boxes: which way of merging K annotators' masks of one object is best.

The backend turns the K crowd boxes of one object into K masks and merges them
(``runtime.task_boxes.consensus_mask``: a pixel is in when at least half the masks have it).
This measures that rule against the others that need only what the backend has per box (its
mask, SAM's predicted IoU, its low-res logits, the box itself), on held-out data:

- ``majority``: ``2·votes >= K`` (the current rule; at K = 2 the union of the two masks);
- ``strict_majority``: ``2·votes > K`` (at K = 2 the intersection);
- ``mean_logits``: the mean of the K masks' logits > 0 (a soft vote; the low-res logits are
  averaged and upsampled once, the same as averaging the upsampled ones: the upsampling is
  linear);
- ``mean_probability``: the mean of the K masks' probabilities (sigmoid of the full-size
  logits) > 0.5 (at K = 2 the same as ``mean_logits``: σ(a) + σ(b) > 1 exactly when a + b > 0);
- ``medoid_box``: the mask of the box nearest the mean box (highest box IoU with it);
- ``best_score``: the mask with the highest predicted IoU;
- ``mean_box``: one mask decoded from the mean of the K boxes (one more decode per object);
- ``median_box``: one mask decoded from the coordinate-wise median box (at K = 2 the mean box).

**Crowd boxes** as in the paper's user study: each annotator's box is the GT box with
``stable_sam.prompts.jitter_boxes`` noise (the noise model of ``noisy_box``, no IoU filter),
clipped to the image, at the noise scale whose mean box IoU with the GT box is
``--target-box-iou`` (0.753, the paper's annotators), found on the run's own GT boxes by
``training.user_study.box_quality.equivalent_noise_scale``. Each object gets ``max(K)``
annotators' boxes from a generator seeded by ``(seed, image index)``; K annotators are the
first K of them, so the K = 2, 3, 5 rows share boxes. All K boxes count as one object (the
backend's grouping by IoU >= 0.5 is not simulated).

**Models**: the embedded default mini SAM without plugins (``sam``) and with the shipped plugins
(``stable-sam``), built as the user study builds them (``training.user_study.models``), decoding
the single-mask output as the backend's box conversion does.

**Scores**: per object, the IoU (and boundary IoU) with the GT mask of each rule's mask
(``training.evaluation.score_object``); ``single`` is one annotator: the mean over the
object's K boxes of their masks' IoU. Means over objects in percent; each rule's ``delta``
against ``majority`` is the mean paired per-object difference in points with its 95% interval
(1.96 standard errors).

    python -m training.consensus_rules --out docs/benchmark

writes ``consensus_rules.json`` and ``.md`` (``consensus_rules_composites.*`` with
``--data composites``) in ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stable_sam import metrics, prompts
from stable_sam.transforms import low_res_to_original
from training.data import Sample
from training.evaluation import EvalModel, score_object

logger = logging.getLogger(__name__)

RULES = {
    "majority": "Pixel majority, 2·votes ≥ K (current; union at K=2)",
    "strict_majority": "Strict majority, 2·votes > K (intersection at K=2)",
    "mean_logits": "Mean logits > 0 (soft vote)",
    "mean_probability": "Mean probability > 0.5",
    "medoid_box": "Mask of the box nearest the mean box",
    "best_score": "Mask with the highest predicted IoU",
    "mean_box": "One mask from the mean box",
    "median_box": "One mask from the median box",
}
CURRENT = "majority"
ANNOTATORS = (2, 3, 5)
TARGET_BOX_IOU = 0.753  # the paper's user study: annotators' mean box IoU with the GT box
MODEL_TITLES = {"sam": "SAM (base, plugins off)", "stable-sam": "Stable-SAM (shipped plugins)"}
CLEAR_GAIN_POINTS = 1.0  # "clearly better": this much over majority at K = 2 ...


# ----------------------------------------------------------------------------- crowd boxes


def crowd_boxes(
    gt_box_xyxy: np.ndarray,
    rng: np.random.Generator,
    noise_scale: float,
    n: int,
    image_hw: tuple[int, int],
) -> np.ndarray:
    """``n`` annotators' boxes (n, 4) float32 xyxy around one GT box: ``jitter_boxes`` noise,
    clipped to the image (H, W), no IoU filter (as ``box_quality`` simulates annotators)."""
    h, w = image_hw
    boxes = prompts.jitter_boxes(gt_box_xyxy, rng, noise_scale, n)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    return boxes.astype(np.float32)


def summary_boxes(boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and the coordinate-wise median (4,) of K boxes (K, 4)."""
    return boxes_xyxy.mean(axis=0), np.median(boxes_xyxy, axis=0)


# ----------------------------------------------------------------------------- the rules


@dataclass
class CrowdMasks:
    """What the backend has for one object's K boxes, plus the two one-box alternatives.

    ``logits``: (K, H, W) float32 full-size logits (the mask is ``logits > 0``); ``scores``:
    (K,) predicted IoU; ``boxes``: (K, 4) xyxy px; ``mean_box_mask`` / ``median_box_mask``:
    (H, W) bool, the masks decoded from the mean and median box.
    """

    logits: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    mean_box_mask: np.ndarray
    median_box_mask: np.ndarray

    @property
    def masks(self) -> np.ndarray:
        return self.logits > 0


def rule_masks(crowd: CrowdMasks) -> dict[str, np.ndarray]:
    """The (H, W) bool mask of every rule in ``RULES`` for one object's K >= 1 masks."""
    masks = crowd.masks
    k = len(masks)
    votes = masks.sum(axis=0, dtype=np.int32)
    mean_box, _ = summary_boxes(crowd.boxes)
    medoid = int(np.argmax(metrics.box_iou_matrix(crowd.boxes, mean_box)[:, 0]))
    probability = 1.0 / (1.0 + np.exp(-crowd.logits.astype(np.float64)))
    return {
        "majority": 2 * votes >= k,
        "strict_majority": 2 * votes > k,
        "mean_logits": crowd.logits.mean(axis=0) > 0,
        "mean_probability": probability.mean(axis=0) > 0.5,
        "medoid_box": masks[medoid],
        "best_score": masks[int(np.argmax(crowd.scores))],
        "mean_box": crowd.mean_box_mask,
        "median_box": crowd.median_box_mask,
    }


# ----------------------------------------------------------------------------- one image


@dataclass
class ObjectResult:
    """One object's IoUs (fractions): ``single[k]`` the mean over its first k boxes' masks,
    ``rules[k][rule]`` (IoU, boundary IoU) of each rule's mask from those k masks."""

    box_ious: tuple[float, ...]  # each annotator's box IoU with the GT box
    single: dict[int, tuple[float, float]]
    rules: dict[int, dict[str, tuple[float, float]]]


def image_objects(
    sample: Sample,
    index: int,
    seed: int,
    noise_scale: float,
    max_objects: int | None,
    n_annotators: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The objects evaluated on image ``index`` (all, or ``max_objects`` at random) and their
    annotators' boxes (O, n_annotators, 4), from a generator seeded by ``(seed, index)``."""
    rng = np.random.default_rng([seed, index])
    objects = np.arange(sample.num_instances)
    if max_objects is not None and objects.size > max_objects:
        objects = np.sort(rng.choice(objects, max_objects, replace=False))
    hw = sample.image.shape[:2]
    boxes = [
        crowd_boxes(prompts.gt_box(sample.masks[o]), rng, noise_scale, n_annotators, hw)
        for o in objects
    ]
    return objects, np.asarray(boxes, dtype=np.float32).reshape(len(objects), n_annotators, 4)


def run_image(
    models: Sequence[EvalModel],
    sample: Sample,
    objects: np.ndarray,
    boxes: np.ndarray,
    ks: Sequence[int],
) -> dict[str, list[ObjectResult]]:
    """Every model's ``ObjectResult`` per object of one image; ``boxes`` (O, max(ks), 4).

    One embedding (the first model's predictor; the plugins only change the decoder) and one
    decoder batch per model: every annotator box, then each K's mean and median box.
    """
    n_objects, n_annotators = boxes.shape[:2]
    extra = np.asarray(
        [summary_boxes(boxes[o, :k]) for o in range(n_objects) for k in ks], dtype=np.float32
    ).reshape(n_objects, len(ks), 2, 4)
    prompt_boxes = np.concatenate([boxes.reshape(-1, 4), extra.reshape(-1, 4)])
    embedding = models[0].predictor.embed(sample.image)
    side, square = models[0].predictor.model.image_size, models[0].predictor.model.square_input
    hw = embedding.original_size
    out: dict[str, list[ObjectResult]] = {}
    for model in models:
        batch = model.predictor.predict_batch(
            embedding=embedding,
            boxes_xyxy=prompt_boxes,
            multimask_output=False,  # as the backend's box conversion decodes
            plugins=model.plugins,
            return_masks=False,
        )
        logits = np.stack(
            [low_res_to_original(m[0], hw, side, square) for m in batch.low_res_logits]
        )
        scores = batch.scores[:, 0]
        crowd_logits = logits[: n_objects * n_annotators].reshape(n_objects, n_annotators, *hw)
        crowd_scores = scores[: n_objects * n_annotators].reshape(n_objects, n_annotators)
        extra_masks = (logits[n_objects * n_annotators :] > 0).reshape(n_objects, len(ks), 2, *hw)
        results = []
        for o, obj in enumerate(objects):
            gt = sample.masks[obj]
            singles = crowd_logits[o] > 0
            per_k = {}
            for j, k in enumerate(ks):
                crowd = CrowdMasks(
                    crowd_logits[o, :k], crowd_scores[o, :k], boxes[o, :k], *extra_masks[o, j]
                )
                per_k[k] = rule_masks(crowd)
            flat = [m for per in per_k.values() for m in per.values()]
            score = score_object(gt, np.stack([*singles, *flat]))
            pairs = list(zip(score.ious, score.bious, strict=True))
            single_pairs, rule_pairs = pairs[:n_annotators], iter(pairs[n_annotators:])
            gt_box = prompts.gt_box(gt)
            results.append(
                ObjectResult(
                    box_ious=tuple(float(metrics.box_iou(b, gt_box)) for b in boxes[o]),
                    single={k: _mean_pair(single_pairs[:k]) for k in ks},
                    rules={k: {r: next(rule_pairs) for r in per_k[k]} for k in ks},
                )
            )
        out[model.key] = results
    return out


def _mean_pair(pairs: Sequence[tuple[float, float]]) -> tuple[float, float]:
    ious, bious = zip(*pairs, strict=True)
    return float(np.mean(ious)), float(np.mean(bious))


# ----------------------------------------------------------------------------- summary


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (1.96 standard errors), in the same unit."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return float(v.mean()) if v.size else float("nan"), float("nan")
    return float(v.mean()), float(1.96 * v.std(ddof=1) / np.sqrt(v.size))


def summarize(results: Sequence[ObjectResult], ks: Sequence[int]) -> dict[str, dict]:
    """Per K: ``single`` and each rule's ``miou`` / ``mbiou`` (percent), and each rule's
    ``delta`` (points, paired per object, against ``majority``) with ``ci95``."""
    table: dict[str, dict] = {}
    for k in ks:
        current = np.asarray([r.rules[k][CURRENT][0] for r in results])
        row: dict[str, dict] = {
            "single": {
                "miou": round(100 * float(np.mean([r.single[k][0] for r in results])), 2),
                "mbiou": round(100 * float(np.mean([r.single[k][1] for r in results])), 2),
            }
        }
        for rule in RULES:
            ious = np.asarray([r.rules[k][rule][0] for r in results])
            delta, ci = mean_ci(100 * (ious - current))
            row[rule] = {
                "miou": round(100 * float(ious.mean()), 2),
                "mbiou": round(100 * float(np.mean([r.rules[k][rule][1] for r in results])), 2),
                "delta": round(delta, 2),
                "ci95": round(ci, 2),
            }
        table[str(k)] = row
    return table


def clearly_better(models: dict[str, dict], ks: Sequence[int]) -> list[str]:
    """The rules that beat ``majority`` by more than ``CLEAR_GAIN_POINTS`` at the smallest K
    (their 95% interval above 0) and are not worse (delta >= 0) at every other K, for every
    model."""
    smallest, others = str(min(ks)), [str(k) for k in ks if k != min(ks)]
    winners = []
    for rule in RULES:
        if rule == CURRENT:
            continue
        ok = all(
            table[smallest][rule]["delta"] > CLEAR_GAIN_POINTS
            and table[smallest][rule]["delta"] - table[smallest][rule]["ci95"] > 0
            and all(table[k][rule]["delta"] >= 0 for k in others)
            for table in models.values()
        )
        if ok:
            winners.append(rule)
    return winners


def markdown_report(result: dict) -> str:
    """One table per model: mIoU per rule (rows) and K (columns), each rule's delta against
    ``majority`` in points with its 95% interval; single-annotator mIoU first."""
    meta = result["meta"]
    ks = [str(k) for k in meta["annotators"]]
    lines = [
        f"{meta['data']}: {meta['images']} images, {meta['objects']} objects; crowd boxes at "
        f"noise scale {meta['noise_scale']:.3f} (mean box IoU with the GT box "
        f"{meta['mean_box_iou']:.3f}); mIoU in percent, Δ = rule − majority in points "
        "(paired per object, ± 95% interval).",
    ]
    for key, table in result["models"].items():
        lines += [
            "",
            f"**{MODEL_TITLES.get(key, key)}**",
            "",
            "| rule | " + " | ".join(f"K={k} mIoU | K={k} Δ" for k in ks) + " |",
            "|---|" + "---:|---:|" * len(ks),
            "| One annotator (baseline) | "
            + " | ".join(f"{table[k]['single']['miou']:.1f} | " for k in ks)
            + " |",
        ]
        for rule, title in RULES.items():
            cells = []
            for k in ks:
                cell = table[k][rule]
                delta = "–" if rule == CURRENT else f"{cell['delta']:+.1f} ± {cell['ci95']:.1f}"
                cells.append(f"{cell['miou']:.1f} | {delta}")
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    winners = result["clearly_better"]
    lines += [
        "",
        "Clearly better than majority (Δ > "
        f"{CLEAR_GAIN_POINTS:.0f} point at K={ks[0]} with its interval above 0, Δ ≥ 0 at "
        f"every other K, both models): {', '.join(winners) if winners else 'none'}.",
        "",
        f"Command: `{meta['command']}`",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def evaluate(
    models: Sequence[EvalModel],
    dataset: Sequence[Sample],
    ks: Sequence[int] = ANNOTATORS,
    max_objects: int | None = 5,
    target_box_iou: float = TARGET_BOX_IOU,
    seed: int = 0,
) -> dict:
    """Every rule, K and model on ``dataset`` (see the module doc): ``{models, meta}``."""
    from training.user_study.box_quality import equivalent_noise_scale

    samples = [dataset[i] for i in range(len(dataset))]
    gt_boxes = [prompts.gt_box(m) for s in samples for m in s.masks]
    sizes = [s.image.shape[:2] for s in samples for _ in s.masks]
    scale = equivalent_noise_scale(target_box_iou, gt_boxes, sizes, seed=seed)["scale"]
    per_model: dict[str, list[ObjectResult]] = {m.key: [] for m in models}
    for index, sample in enumerate(samples):
        if sample.num_instances == 0:
            continue
        objects, boxes = image_objects(sample, index, seed, scale, max_objects, max(ks))
        for key, results in run_image(models, sample, objects, boxes, ks).items():
            per_model[key] += results
        if index % 10 == 9:
            logger.info("consensus rules: %d/%d images", index + 1, len(samples))
    some = next(iter(per_model.values()))
    return {
        "models": {key: summarize(results, ks) for key, results in per_model.items()},
        "meta": {
            "images": len(samples),
            "objects": len(some),
            "annotators": list(ks),
            "max_objects_per_image": max_objects,
            "target_box_iou": target_box_iou,
            "noise_scale": scale,
            "mean_box_iou": float(np.mean([b for r in some for b in r.box_ious])),
            "seed": seed,
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the .json and .md")
    parser.add_argument("--data", choices=("synthetic", "composites"), default="synthetic",
                        help="held-out synthetic scenes, or held-out real-picture composites "
                             "(training.composites; needs its Debian packages)")  # fmt: skip
    parser.add_argument("--n-images", type=int, default=80, help="held-out images")
    parser.add_argument("--max-objects", type=int, default=5, help="objects per image")
    parser.add_argument("--annotators", type=int, nargs="+", default=list(ANNOTATORS))
    parser.add_argument("--target-box-iou", type=float, default=TARGET_BOX_IOU)
    parser.add_argument("--size-range", type=int, nargs=2, default=(256, 1024))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenCV CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    import cv2
    import torch

    from runtime.logs import configure_logging
    from training.real_benchmark import load_dataset
    from training.user_study.models import build_models

    configure_logging("INFO")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    ks = sorted(set(args.annotators))
    models = list(build_models(["sam", "stable-sam"], device=args.device).values())
    dataset = load_dataset(args.data, args.n_images, tuple(args.size_range))
    started = time.perf_counter()
    result = evaluate(models, dataset, ks, args.max_objects, args.target_box_iou, args.seed)
    result["clearly_better"] = clearly_better(result["models"], ks)
    result["meta"].update(
        data=f"{args.data} (held-out)",
        size_range=list(args.size_range),
        models={m.key: m.description for m in models},
        wall_s=round(time.perf_counter() - started, 1),
        command="python -m training.consensus_rules "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    report = markdown_report(result)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "consensus_rules" if args.data == "synthetic" else f"consensus_rules_{args.data}"
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(report + "\n")
    print(report)
    return result


__all__ = [
    "RULES",
    "CrowdMasks",
    "clearly_better",
    "crowd_boxes",
    "evaluate",
    "main",
    "rule_masks",
    "run_image",
    "summarize",
]

if __name__ == "__main__":
    main()
