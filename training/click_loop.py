"""The click loop, measured in clicks: NoC@85 / NoC@90 with a simulated annotator.

Interactive-segmentation work (since Xu et al., 2016) scores the loop an annotator actually
runs: click, look, click where the mask is wrong, until it is good enough. Per object:

- **The simulated annotator** (``next_click``) looks at the errors of the current mask: the
  missed part (false negatives) and the spill (false positives), split into connected regions.
  It clicks in the largest region, at its centre (the pixel farthest from the region's edge,
  the image border counting as edge; of several, the one nearest their middle): a positive
  click on a miss, a negative one on a spill.
  The first click, with nothing predicted yet, lands at the centre of the object.
- **First prompt** ``click``: every interaction is a click. ``box``: the first interaction is
  the object's tight box (the prompt a crowd annotator draws), every later one a click added to
  it. The box counts as one interaction.
- **NoC@t**: the number of interactions until the mask's IoU with the object reaches ``t``,
  ``MAX_CLICKS`` (20) when it never does (then it also counts in **NoF@t**, the fraction that
  fails); **mIoU@k**: the mean IoU after ``k`` interactions (1, 3, 5). An object stops once it
  reached every threshold and ``REPORT_AFTER``'s last count.
- **Worse %**: of the 2nd to 5th interactions, the share whose mask has a lower IoU than the
  one before it: how often the annotator's click is answered with a worse mask (the criterion
  of the end-to-end test of three successive clicks).

Models: SAM and Stable-SAM through ``StableSamPredictor`` with the served multimask policy,
each **with refinement** (the previous answer's low-res logits as ``mask_input``, looked up
through the backend's own ``stable_sam.refinement.ClickMemory``) and without; and OpenCV's
GrabCut in its own click mode (clicks as sure foreground / background seeds, the box as its
rectangle, 5 iterations, re-run from the seeds at each click).

    python -m training.click_loop --out docs/benchmark --n-images 30 --max-objects 3

writes ``click_loop.json`` and ``click_loop.md`` and the ``click_loop`` rows of
``benchmark.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from stable_sam import metrics
from stable_sam.refinement import ClickMemory, FirstPrompt, PromptKey
from training.box_baselines import GRABCUT_ITERATIONS, GRABCUT_MAX_SIDE, GrabCut
from training.data import Sample

if TYPE_CHECKING:
    from stable_sam import StableSamPlugins, StableSamPredictor

logger = logging.getLogger(__name__)

MAX_CLICKS = 20
THRESHOLDS = (0.85, 0.90)
REPORT_AFTER = (1, 3, 5)  # mIoU after this many interactions
FIRST_PROMPTS: tuple[FirstPrompt, ...] = ("click", "box")


# ----------------------------------------------------------------------------- the annotator


@dataclass(frozen=True)
class Click:
    """A click at ``x``, ``y`` (pixels of the original image, pixel centres) and its label."""

    x: float
    y: float
    positive: bool


def next_click(gt: np.ndarray, pred: np.ndarray) -> Click | None:
    """Where the simulated annotator clicks next on an (H, W) object ``gt`` given the current
    mask ``pred`` (see the module doc); None when the mask is exact."""
    best: tuple[int, bool, np.ndarray, np.ndarray] | None = None  # area, positive, labels, stats
    for positive, error in ((True, gt & ~pred), (False, pred & ~gt)):
        if not error.any():
            continue
        n, labels, stats, _ = cv2.connectedComponentsWithStats(error.astype(np.uint8), None, 8)
        k = 1 + int(np.argmax(stats[1:n, cv2.CC_STAT_AREA]))
        area = int(stats[k, cv2.CC_STAT_AREA])
        if best is None or area > best[0]:
            best = (area, positive, labels == k, stats[k])
    if best is None:
        return None
    _, positive, region, stat = best
    x0, y0 = int(stat[cv2.CC_STAT_LEFT]), int(stat[cv2.CC_STAT_TOP])
    x1, y1 = x0 + int(stat[cv2.CC_STAT_WIDTH]), y0 + int(stat[cv2.CC_STAT_HEIGHT])
    # Zero padding makes the crop's border (and so the image's) count as the region's edge.
    crop = np.pad(region[y0:y1, x0:x1].astype(np.uint8), 1)
    depth = cv2.distanceTransform(crop, cv2.DIST_L2, 5)
    # The deepest pixels often form a ridge (a rectangle's middle line): take its middle one.
    ys, xs = np.nonzero(depth >= depth.max() - 1e-6)
    nearest = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    y, x = int(ys[nearest]), int(xs[nearest])
    return Click(x0 + x - 1 + 0.5, y0 + y - 1 + 0.5, positive)


# ----------------------------------------------------------------------------- models


@dataclass
class ObjectLoop:
    """One object's loop so far: its prompt and the IoU after each interaction."""

    gt: np.ndarray
    box_xyxy: np.ndarray | None
    clicks: list[Click] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)
    mask: np.ndarray | None = None
    exact: bool = False  # the mask equals the object: nowhere left to click

    def prompt_arrays(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        if not self.clicks:
            return None, None
        xy = np.array([[c.x, c.y] for c in self.clicks], dtype=np.float32)
        return xy, np.array([int(c.positive) for c in self.clicks], dtype=np.int64)


class LoopModel:
    """Answers one interaction for several objects of one image at once."""

    key: str

    def begin_image(self, image: np.ndarray) -> None:
        raise NotImplementedError

    def step(self, objects: list[ObjectLoop]) -> list[np.ndarray]:
        """The masks (H, W) bool for the objects' current prompts (all have as many clicks)."""
        raise NotImplementedError


class SamLoop(LoopModel):
    """SAM or Stable-SAM through the predictor, optionally refining with the last answer."""

    def __init__(
        self,
        key: str,
        predictor: StableSamPredictor,
        plugins: StableSamPlugins | None = None,
        refine: bool = False,
    ) -> None:
        self.key = key
        self.predictor = predictor
        self.plugins = plugins
        self.refine = refine
        self.memory = ClickMemory(max_bytes=256 * 1024 * 1024)
        self._embedding = None

    def begin_image(self, image: np.ndarray) -> None:
        self._embedding = self.predictor.embed(image)
        self.memory.clear()

    def step(self, objects: list[ObjectLoop]) -> list[np.ndarray]:
        keys, arrays = [], []
        for obj in objects:
            points, labels = obj.prompt_arrays()
            keys.append(PromptKey.of(points, labels, obj.box_xyxy))
            arrays.append((points, labels))
        boxes = None
        if objects[0].box_xyxy is not None:
            boxes = np.stack([o.box_xyxy for o in objects]).astype(np.float32)
        points = labels = None
        if arrays[0][0] is not None:
            points = np.stack([a[0] for a in arrays])
            labels = np.stack([a[1] for a in arrays])
        mask_input = None
        image_key = self._embedding.key
        if self.refine:
            recalled = [
                self.memory.recall(image_key, id(o), k) for o, k in zip(objects, keys, strict=True)
            ]
            if all(r is not None for r in recalled):
                mask_input = np.stack(recalled)
        batch = self.predictor.predict_batch(
            embedding=self._embedding,
            boxes_xyxy=boxes,
            point_coords=points,
            point_labels=labels,
            mask_input=mask_input,
            multimask_output=None,  # the served policy
            plugins=self.plugins,
        )
        for i, (obj, key) in enumerate(zip(objects, keys, strict=True)):
            self.memory.remember(image_key, id(obj), key, batch.low_res_logits[i, 0])
        return [batch.masks[i, 0] for i in range(len(objects))]


class GrabCutLoop(LoopModel):
    """OpenCV's GrabCut driven by the same interactions: the box as its rectangle (outside sure
    background, inside probably foreground; without a box, everything probably background),
    clicks as sure foreground / background disks. Runs at most ``max_side`` px on the long side
    (``training.box_baselines.GrabCut``: its cost grows with the pixels), masks scaled back."""

    def __init__(self, key: str = "grabcut", max_side: int = GRABCUT_MAX_SIDE) -> None:
        self.key = key
        self.max_side = max_side
        self._grabcut: GrabCut | None = None

    def begin_image(self, image: np.ndarray) -> None:
        self._grabcut = GrabCut(image, GRABCUT_ITERATIONS, self.max_side)

    def step(self, objects: list[ObjectLoop]) -> list[np.ndarray]:
        return [self._one(obj) for obj in objects]

    def _one(self, obj: ObjectLoop) -> np.ndarray:
        grabcut = self._grabcut
        assert grabcut is not None
        points = np.array([(c.x, c.y) for c in obj.clicks], np.float64).reshape(-1, 2)
        labels = np.array([c.positive for c in obj.clicks], bool)
        return grabcut.segment_clicks(points, labels, obj.box_xyxy)


# ----------------------------------------------------------------------------- the loop


def run_image(
    model: LoopModel,
    sample: Sample,
    objects: Sequence[int],
    first_prompt: FirstPrompt,
    max_clicks: int = MAX_CLICKS,
) -> list[list[float]]:
    """The IoU after each interaction (up to ``max_clicks``) for ``objects`` of one image."""
    from stable_sam import prompts

    model.begin_image(sample.image)
    loops = []
    for o in objects:
        gt = np.asarray(sample.masks[o], dtype=bool)
        box = prompts.gt_box(gt).astype(np.float32) if first_prompt == "box" else None
        loops.append(ObjectLoop(gt=gt, box_xyxy=box))
    empty = np.zeros_like(loops[0].gt) if loops else None
    for step in range(max_clicks):
        active = [o for o in loops if not _done(o)]
        if not active:
            break
        asked = []
        for obj in active:
            if step > 0 or obj.box_xyxy is None:  # else the first interaction is the box
                click = next_click(obj.gt, obj.mask if obj.mask is not None else empty)
                if click is None:  # exact: it stays so, whatever more clicks would do
                    obj.exact = True
                    continue
                obj.clicks.append(click)
            asked.append(obj)
        if not asked:
            break
        for obj, mask in zip(asked, model.step(asked), strict=True):
            obj.mask = mask
            obj.ious.append(metrics.mask_iou(mask, obj.gt))
    return [o.ious for o in loops]


def _done(obj: ObjectLoop) -> bool:
    if obj.exact:
        return True
    return len(obj.ious) >= max(REPORT_AFTER) and max(obj.ious) >= max(THRESHOLDS)


def summarize(curves: Sequence[Sequence[float]], max_clicks: int = MAX_CLICKS) -> dict:
    """NoC@t and NoF@t (percent) per threshold and mIoU@k (percent) over objects' IoU curves.
    A curve shorter than k (the object stopped early, exact or past every threshold) counts
    its last IoU."""
    out: dict[str, float | int] = {"objects": len(curves)}
    for t in THRESHOLDS:
        nocs = [next((i + 1 for i, v in enumerate(c) if v >= t), max_clicks) for c in curves]
        fails = [not any(v >= t for v in c) for c in curves]
        out[f"noc{round(t * 100)}"] = round(float(np.mean(nocs)), 2)
        out[f"nof{round(t * 100)}"] = round(100 * float(np.mean(fails)), 1)
    for k in REPORT_AFTER:
        out[f"miou@{k}"] = round(100 * float(np.mean([_iou_after(c, k) for c in curves])), 2)
    out["worse"] = worse_share(curves)
    return out


def worse_share(curves: Sequence[Sequence[float]], upto: int = max(REPORT_AFTER)) -> float:
    """Percent of the interactions 2..``upto`` (those that happened) whose IoU is below the
    previous one's."""
    worse = [c[i] < c[i - 1] for c in curves for i in range(1, min(len(c), upto))]
    return round(100 * float(np.mean(worse)), 1) if worse else 0.0


def _iou_after(curve: Sequence[float], k: int) -> float:
    return curve[k - 1] if len(curve) >= k else curve[-1]


def evaluate(
    models: Sequence[LoopModel],
    dataset: Sequence[Sample],
    first_prompts: Sequence[FirstPrompt] = FIRST_PROMPTS,
    max_objects: int | None = None,
    seed: int = 0,
    max_clicks: int = MAX_CLICKS,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run every model's loop on every object; ``{rows: {first prompt: {model: summary}},
    curves: ...}``. The objects of an image (all, or ``max_objects`` drawn with ``(seed,
    index)``) are the same for every model."""
    rows: dict[str, dict[str, dict]] = {fp: {} for fp in first_prompts}
    curves: dict[str, dict[str, list[list[float]]]] = {
        fp: {m.key: [] for m in models} for fp in first_prompts
    }
    wall: dict[str, float] = {m.key: 0.0 for m in models}
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample.num_instances == 0:
            continue
        objects = np.arange(sample.num_instances)
        if max_objects is not None and objects.size > max_objects:
            rng = np.random.default_rng([seed, index])
            objects = np.sort(rng.choice(objects, max_objects, replace=False))
        for fp in first_prompts:
            for model in models:
                started = time.perf_counter()
                curves[fp][model.key].extend(run_image(model, sample, objects, fp, max_clicks))
                wall[model.key] += time.perf_counter() - started
        if progress is not None:
            progress(f"image {index + 1}/{len(dataset)}")
    for fp in first_prompts:
        for model in models:
            rows[fp][model.key] = summarize(curves[fp][model.key], max_clicks)
    return {"rows": rows, "wall_s": {k: round(v, 1) for k, v in wall.items()}}


# ----------------------------------------------------------------------------- report

TITLES = {"synthetic": "synthetic scenes", "composites": "real-picture composites"}
ROW_TITLES = {
    "sam": "SAM (frozen base)",
    "sam+refine": "SAM, refining with the last mask",
    "stable_sam": "Stable-SAM (shipped plugins)",
    "stable_sam+refine": "Stable-SAM, refining with the last mask",
    "grabcut": "GrabCut (clicks as seeds)",
}


def markdown_report(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# The click loop: NoC with a simulated annotator",
        "",
        f"Held-out {TITLES.get(meta.get('data', 'synthetic'), meta.get('data'))}: "
        f"{meta['images']} images, {meta['objects']} objects; at most "
        f"{meta['max_clicks']} interactions; IoU at the original resolution.",
        "",
        f"- Command: `{meta['command']}`",
        "",
    ]
    for fp, table in result["rows"].items():
        lines += [f"## First prompt: {fp}", ""]
        head = ["NoC@85", "NoC@90", "NoF@90 %"] + [f"mIoU@{k}" for k in REPORT_AFTER]
        head.append(f"worse % (2-{max(REPORT_AFTER)})")
        lines.append("| model | " + " | ".join(head) + " |")
        lines.append("|---|" + "---|" * len(head))
        for key, row in table.items():
            cells = (
                [row["noc85"], row["noc90"], row["nof90"]]
                + [row[f"miou@{k}"] for k in REPORT_AFTER]
                + [row["worse"]]
            )
            lines.append(
                f"| {ROW_TITLES.get(key, key)} | "
                + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells)
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def model_files(args: argparse.Namespace) -> tuple[str, Path, Path]:
    """The model type, base and plugin files the rows use: the arguments, else the shipped
    files of ``--model-type`` (the embedded default without it)."""
    from stable_sam import default_model_paths
    from stable_sam.build import SHIPPED_FILES

    model_type = args.model_type or default_model_paths().model_type
    paths = default_model_paths(model_type if model_type in SHIPPED_FILES else None)
    base = Path(args.base) if args.base else paths.base_checkpoint
    plugins = Path(args.plugins) if args.plugins else paths.plugin_checkpoint
    return model_type, base, plugins


def uses_plugins(args: argparse.Namespace) -> bool:
    return any(key.partition("+")[0] == "stable_sam" for key in args.models)


def build_models(args: argparse.Namespace) -> list[LoopModel]:
    from stable_sam import StableSamPredictor, build_stable_sam
    from stable_sam.checkpoint import read_plugins

    model_type, base, plugin_file = model_files(args)
    stable = build_stable_sam(model_type, base, plugins=True, device=args.device)
    predictor = StableSamPredictor(stable)  # the served multimask policy ("auto")
    # Read only when a row decodes with them: a base without plugins of its own has SAM rows.
    plugins = read_plugins(stable, plugin_file)[0] if uses_plugins(args) else None
    sam = build_stable_sam(model_type, base, plugins=False, device=args.device)
    sam_predictor = StableSamPredictor(sam, cache=predictor.cache)
    models: list[LoopModel] = []
    for key in args.models:
        if key == "grabcut":
            models.append(GrabCutLoop(max_side=args.grabcut_side))
            continue
        name, _, refine = key.partition("+")
        if name == "sam":
            models.append(SamLoop(key, sam_predictor, None, refine=bool(refine)))
        elif name == "stable_sam":
            models.append(SamLoop(key, predictor, plugins, refine=bool(refine)))
        else:
            raise SystemExit(f"unknown model {key!r}; expected one of {sorted(ROW_TITLES)}")
    return models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the .md and .json")
    parser.add_argument("--base", default=None, help="SAM base (default: the shipped one)")
    parser.add_argument("--model-type", default=None)
    parser.add_argument("--plugins", default=None, help="Stable-SAM plugins (default: shipped)")
    parser.add_argument("--data", choices=["synthetic", "composites"], default="synthetic",
                        help="held-out synthetic scenes, or held-out real-picture composites "
                             "(training.composites; needs its Debian packages)")  # fmt: skip
    parser.add_argument("--n-images", type=int, default=30, help="held-out images")
    parser.add_argument("--max-objects", type=int, default=3, help="objects per image")
    parser.add_argument("--max-clicks", type=int, default=MAX_CLICKS)
    parser.add_argument("--first-prompts", nargs="*", default=list(FIRST_PROMPTS))
    parser.add_argument("--models", nargs="*", default=list(ROW_TITLES))
    parser.add_argument(
        "--grabcut-side", type=int, default=GRABCUT_MAX_SIDE, help="GrabCut's long side, px"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    import sys

    import torch

    from runtime.logs import configure_logging
    from training.scenes import SceneDataset

    configure_logging("INFO")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = build_models(args)
    if args.data == "composites":
        from training.composites import CompositeDataset

        dataset = CompositeDataset("heldout", args.n_images)
    else:
        dataset = SceneDataset("heldout", args.n_images)
    started = time.perf_counter()
    result = evaluate(
        models, dataset, args.first_prompts, args.max_objects, args.seed, args.max_clicks,
        progress=logger.info,
    )  # fmt: skip
    some_row = next(iter(next(iter(result["rows"].values())).values()))
    model_type, base, plugin_file = model_files(args)
    result["meta"] = {
        "data": args.data,
        "model_type": model_type,
        "base": base.name,
        "plugins": plugin_file.name if uses_plugins(args) else None,
        "images": len(dataset),
        "objects": some_row["objects"],
        "max_objects_per_image": args.max_objects,
        "max_clicks": args.max_clicks,
        "grabcut_side": args.grabcut_side,
        "seed": args.seed,
        "total_wall_s": round(time.perf_counter() - started, 1),
        "command": "python -m training.click_loop "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "click_loop" if args.data == "synthetic" else f"click_loop_{args.data}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown_report(result) + "\n")
    benchmark = args.out / "benchmark.json"
    if benchmark.is_file():  # the benchmark JSON carries the click-loop rows too
        table = json.loads(benchmark.read_text())
        table[name] = {"rows": result["rows"], "meta": result["meta"]}
        benchmark.write_text(json.dumps(table, indent=2) + "\n")
    print(markdown_report(result))
    return result


__all__ = [
    "Click",
    "GrabCutLoop",
    "LoopModel",
    "SamLoop",
    "evaluate",
    "main",
    "next_click",
    "run_image",
    "summarize",
]

if __name__ == "__main__":
    main()
