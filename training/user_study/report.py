"""Writing a user study's results: report.md, summary.json, per_object.csv, unmatched.csv, plots.

The report opens with the exact command line that produced it, so every number can be
regenerated. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from training.user_study.consensus import CONSENSUS
from training.user_study.evaluate import StudyResult
from training.user_study.segmentation import SOURCE_TITLES, SOURCES, ST_MIN_PROMPTS

logger = logging.getLogger(__name__)

HISTOGRAM_PNG = "box_iou_histogram.png"
MIOU_PNG = "miou_by_model.png"
MAX_LISTED_UNMATCHED = 50


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _csv(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def summary_dict(result: StudyResult, command: str, simulated: str | None) -> dict[str, Any]:
    """The JSON summary: inputs, counts, box quality, the Table-3 numbers and the consensus."""
    q = result.box_quality
    return {
        "command": command,
        "simulated": simulated,
        "config": dict(result.config.__dict__),
        "counts": result.counts,
        "box_quality": {
            "overall": q.overall,
            "histogram": q.histogram,
            "per_annotator": q.per_annotator,
            "lead_time_s": q.lead_time,
        },
        "models": result.models,
        "segmentation": result.table,
        "segmentation_by_annotator": result.by_annotator,
        "consensus_vs_single": result.consensus,
        "unmatched": [
            {
                "task": u.box.task_id,
                "annotator": u.box.annotator,
                "image": u.box.image_key,
                "target": u.box.target_id,
                "box_xyxy": [float(v) for v in u.box.box_xyxy],
                "reason": u.reason,
            }
            for u in result.matching.unmatched
        ],
        "objects_without_boxes": [list(k) for k in result.objects_without_boxes],
    }


def write_per_object_csv(result: StudyResult, path: Path) -> None:
    """One row per object drawn by someone: its box IoUs, every model/source's scores, and the
    consensus mask's (empty for an object with one box)."""
    columns = ["image", "object_id", "label", "n_boxes", "annotators"]
    columns += ["box_iou_mean", "box_iou_median", "box_iou_min", "box_iou_max"]
    for model in result.per_object:
        for source in SOURCES:
            columns += [f"{model}:{source}:iou", f"{model}:{source}:biou", f"{model}:{source}:st"]
        columns += [f"{model}:{CONSENSUS}:{k}" for k in ("iou", "biou", "agreement")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for obj in result.objects:
            key = (obj.image_key, obj.object_id)
            stats = result.box_quality.per_object[key]
            row: list[Any] = [obj.image_key, obj.object_id, result.labels.get(key) or ""]
            row += [stats["n"], ";".join(stats["annotators"])]
            row += [_csv(stats[k]) for k in ("mean", "median", "min", "max")]
            for rows in result.per_object.values():
                for source in SOURCES:
                    s = rows.get(key, {}).get(source)
                    if s is None:
                        row += ["", "", ""]
                        continue
                    st = s.st if s.n >= ST_MIN_PROMPTS else None
                    row += [_csv(s.iou), _csv(s.biou), _csv(st)]
                c = rows.get(key, {}).get(CONSENSUS)
                row += ["", "", ""] if c is None else [_csv(c.iou), _csv(c.biou), _csv(c.agreement)]
            writer.writerow(row)


def write_unmatched_csv(result: StudyResult, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "annotator", "image", "target", "x0", "y0", "x1", "y1", "reason"])
        for u in result.matching.unmatched:
            b = u.box
            writer.writerow(
                [
                    b.task_id,
                    b.annotator,
                    b.image_key,
                    b.target_id or "",
                    *(f"{v:.1f}" for v in b.box_xyxy),
                    u.reason,
                ]
            )


def plot_histogram(result: StudyResult, path: Path) -> None:
    """Box-IoU histogram: all boxes, and one line per annotator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = result.box_quality.histogram
    edges = np.asarray(hist["edges"])
    centres = 0.5 * (edges[:-1] + edges[1:])
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.bar(centres, hist["counts"], width=np.diff(edges) * 0.9, color="#4c72b0", label="all boxes")
    for who, stats in result.box_quality.per_annotator.items():
        ax.plot(centres, stats["histogram"], marker="o", linewidth=1, label=who)
    mean = result.box_quality.overall.get("mean")
    if mean is not None:
        ax.axvline(mean, color="k", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
    ax.set_xlabel("IoU of user box with ground-truth box")
    ax.set_ylabel("boxes")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Box quality")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_miou(result: StudyResult, path: Path) -> None:
    """Grouped bars: mIoU per model for each prompt source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result.table)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    width = 0.8 / max(1, len(models))
    x = np.arange(len(SOURCES))
    for i, model in enumerate(models):
        values = [result.table[model][s]["miou"] or 0.0 for s in SOURCES]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, values, width=width, label=model)
    ax.set_xticks(x, [SOURCE_TITLES[s] for s in SOURCES])
    ax.set_ylabel("mIoU")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Mask quality per model and prompt source")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render_markdown(result: StudyResult, command: str, simulated: str | None) -> str:
    """report.md text."""
    q = result.box_quality
    c = result.counts
    lines = ["# User study report", ""]
    if simulated:
        lines += [f"> **SIMULATED STUDY.** {simulated}", ""]
    lines += ["Made by:", "", "```", command, "```", ""]
    lines += ["## Inputs and what was set aside", "", "| | count |", "|---|---:|"]
    labels = {
        "tasks": "tasks",
        "tasks_without_annotations": "tasks without annotations",
        "annotations": "annotations",
        "ground_truth_annotations": "ground-truth (brush) annotations",
        "skipped": "skipped / cancelled annotations (ignored)",
        "empty": "annotations without a box (ignored)",
        "duplicates": "older duplicate annotations by the same annotator (ignored)",
        "extra_boxes": "extra boxes in a single-target annotation (last box kept)",
        "boxes": "user boxes kept",
        "clipped": "boxes reaching outside the image (clipped)",
        "outside": "boxes entirely outside the image (dropped)",
        "rotated": "rotated boxes (axis-aligned bounds used)",
        "unknown_size": "boxes without a known image size (dropped)",
        "malformed": "malformed rectangles (dropped)",
        "with_lead_time": "annotations with a lead time",
        "matched": "boxes matched to a ground-truth object",
        "unmatched": "boxes not matched (listed below)",
        "objects_with_boxes": "objects with at least one box",
        "objects_without_boxes": "ground-truth objects nobody drew",
    }
    for key, text in labels.items():
        lines.append(f"| {text} | {c.get(key, 0)} |")
    lines.append("")

    o = q.overall
    ens = o.get("equivalent_noise_scale") or {}
    lines += ["## Box quality (IoU of user box with ground-truth box)", ""]
    lines += [
        f"Overall: mean **{_fmt(o.get('mean'))}**, median {_fmt(o.get('median'))}, std "
        f"{_fmt(o.get('std'))}, n = {o.get('n', 0)} (the paper's study: mean 0.753).",
        "",
        f"Equivalent noise scale: **{_noise(ens)}** — `noisy_box` boxes (DESIGN §2 noise model, "
        "no IoU filter) at this scale have the same mean IoU with the ground truth "
        f"(simulated {_fmt(ens.get('simulated_mean_iou'))}). Training and the noisy-box prompts "
        f"below use scale {result.config.noise_scale}.",
        "",
    ]
    lt = q.lead_time
    if lt.get("n"):
        lines += [
            f"Annotation time (Label Studio lead_time, s): mean {_fmt(lt['mean'], 1)}, median "
            f"{_fmt(lt['median'], 1)}, n = {lt['n']}; {_pct(lt.get('share_within_5s'))}% of the "
            "boxes took at most 5 s (the paper's budget).",
            "",
        ]
    else:
        lines += ["Annotation time: the export has no lead_time.", ""]
    lines += [
        "| annotator | boxes | mean IoU | median IoU | equivalent noise scale | mean time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for who, s in q.per_annotator.items():
        lines.append(
            f"| {who} | {s['n']} | {_fmt(s['mean'])} | {_fmt(s['median'])} | "
            f"{_noise(s['equivalent_noise_scale'])} | {_fmt(s['lead_time']['mean'], 1)} |"
        )
    edges, counts = q.histogram["edges"], q.histogram["counts"]
    lines += ["", "Histogram of box IoU:", "", "| IoU bin | boxes |", "|---|---:|"]
    for i, n in enumerate(counts):
        closing = "]" if i == len(counts) - 1 else ")"
        lines.append(f"| [{edges[i]:.1f}, {edges[i + 1]:.1f}{closing} | {n} |")
    lines += ["", f"![box IoU histogram]({HISTOGRAM_PNG})", ""]

    lines += ["## Segmentation quality (layout of the paper's appendix Table 3)", ""]
    if result.table:
        lines += [
            "Each model is prompted, per object, with the ground-truth box, every annotator's box, "
            f"and {result.config.noisy_per_object} noisy boxes (noise scale "
            f"{result.config.noise_scale}, IoU >= 0.5 with the GT box; the same boxes for every "
            "model). mIoU / mBIoU: mean over objects of the per-object mean; ST: stability across "
            "one object's boxes, mean over objects with at least two boxes. Percent.",
            "",
        ]
        header = "| model |"
        rule = "|---|"
        for source in SOURCES:
            header += f" {SOURCE_TITLES[source]} mIoU | mBIoU | ST |"
            rule += "---:|---:|---:|"
        lines += [header, rule]
        for model, row in result.table.items():
            line = f"| {model} |"
            for source in SOURCES:
                s = row[source]
                line += f" {_pct(s['miou'])} | {_pct(s['mbiou'])} | {_pct(s['st'])} |"
            lines.append(line)
        lines += _by_annotator_table(result)
        lines += _consensus_table(result)
        lines += ["", "Models:", ""]
        lines += [f"- `{name}`: {text}" for name, text in result.models.items()]
        if any("RANDOM" in text for text in result.models.values()):
            lines += [
                "",
                "> **Warning:** some models above have RANDOM or untrained weights (the shipped "
                "weights were not found); their numbers say nothing about SAM or Stable-SAM.",
            ]
        lines += ["", f"![mIoU per model and prompt source]({MIOU_PNG})", ""]
    else:
        lines += ["No models were evaluated (box quality only).", ""]

    lines += ["## Unmatched boxes", ""]
    if result.matching.unmatched:
        lines += ["| task | annotator | image | target | reason |", "|---:|---|---|---|---|"]
        for u in result.matching.unmatched[:MAX_LISTED_UNMATCHED]:
            b = u.box
            lines.append(
                f"| {b.task_id} | {b.annotator} | {b.image_key} | {b.target_id or ''} | {u.reason} |"
            )
        if len(result.matching.unmatched) > MAX_LISTED_UNMATCHED:
            lines.append(f"\n… {len(result.matching.unmatched)} in all, see unmatched.csv.")
    else:
        lines.append("None.")
    lines += ["", "Files: summary.json, per_object.csv, unmatched.csv, the two PNG plots.", ""]
    return "\n".join(lines)


def _by_annotator_table(result: StudyResult) -> list[str]:
    """mIoU / mBIoU of every model from each annotator's boxes, next to their box IoU."""
    models = list(result.by_annotator)
    lines = ["", "Each model prompted with one annotator's boxes (percent):", ""]
    header = "| annotator | box IoU |" + "".join(f" {m} mIoU | mBIoU |" for m in models)
    lines += [header, "|---|---:|" + "---:|---:|" * len(models)]
    for who, stats in result.box_quality.per_annotator.items():
        line = f"| {who} | {_fmt(stats['mean'])} |"
        for model in models:
            row = result.by_annotator[model].get(who, {})
            line += f" {_pct(row.get('miou'))} | {_pct(row.get('mbiou'))} |"
        lines.append(line)
    return lines


def _consensus_table(result: StudyResult) -> list[str]:
    """Per model: the consensus of an object's annotator masks against one annotator's mask."""
    rows = result.consensus
    first = next(iter(rows.values()), {})
    lo, hi = first.get("min_boxes"), first.get("max_boxes")
    n = "several" if lo is None else str(lo) if lo == hi else f"{lo}–{hi}"
    lines = ["", f"### Consensus of {n} annotators vs one annotator", ""]
    excluded = first.get("single_box_objects", 0)
    if not first.get("objects"):
        lines.append(
            f"No object was boxed by two or more annotators ({excluded} with a single box): "
            "no consensus to compare."
        )
        return lines
    lines += [
        "For every object boxed by at least two annotators, each model's masks from those boxes "
        "are combined by pixel majority (a pixel is in when at least half the masks have it; "
        "`runtime.task_boxes.consensus_mask`, as the backend merges crowd boxes) and the "
        "consensus mask is scored against the ground truth. One annotator: on the same objects, "
        "the mean over objects of the mean over their annotators' masks. Gain: consensus minus "
        "one annotator mIoU, in points. Agreement: mean IoU of the masks with their consensus. "
        f"Objects with a single box are left out: {excluded}. Percent.",
        "",
        "| model | objects | boxes | one annotator mIoU | consensus mIoU | gain (points) "
        "| one annotator mBIoU | consensus mBIoU | agreement |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, c in rows.items():
        lines.append(
            f"| {model} | {c['objects']} | {c['boxes']} | {_pct(c['single_miou'])} | "
            f"{_pct(c['consensus_miou'])} | {c['gain_points']:+.1f} | {_pct(c['single_mbiou'])} | "
            f"{_pct(c['consensus_mbiou'])} | {_pct(c['agreement'])} |"
        )
    return lines


def _noise(ens: dict[str, Any]) -> str:
    if not ens or ens.get("scale") is None:
        return "–"
    if ens.get("bound") == ">max":
        return f"> {ens['scale']:.2f}"
    return f"{ens['scale']:.3f}"


def write_report(
    result: StudyResult, out_dir: str | Path, command: str, simulated: str | None = None
) -> Path:
    """Write every output file into ``out_dir``; returns the report.md path.

    ``simulated``: a sentence saying how the data was simulated (the demo), shown as a banner.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_dict(result, command, simulated)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    write_per_object_csv(result, out / "per_object.csv")
    write_unmatched_csv(result, out / "unmatched.csv")
    plot_histogram(result, out / HISTOGRAM_PNG)
    if result.table:
        plot_miou(result, out / MIOU_PNG)
    report = out / "report.md"
    report.write_text(render_markdown(result, command, simulated), encoding="utf-8")
    logger.info("user study report written to %s", report)
    return report
