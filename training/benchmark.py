"""The paper's evaluation protocol on our model (Stable-SAM, ICLR 2025, Tables 1, 5 and 6).

On the held-out synthetic split, through ``training.evaluation`` (prompts, decoding, scoring):
per object and prompt type, ``n_prompts`` (20) random prompts — GT box (deterministic: one
prompt), noisy box (noise scale 0.4, IoU ≥ 0.5 to the GT box), 1, 3, 5 and 10 positive points.
Metrics at the original image size, in percent: mIoU, mBIoU (boundary IoU, HQ-SAM's definition)
and ST (stability over the prompts of one object). Every model sees the same prompts; all share
the frozen base encoder, so each image is embedded once.

Rows: SAM (the frozen base, by default the embedded one), Stable-SAM (the shipped plugins), the
ablations of paper Table 5 (DSP without RTS, DSP + RTS, DSP + DRP + RTS), DT-SAM (decoder
fine-tuned with RTS), PT-SAM, HQ-SAM and PA-SAM (``training.baselines``), all with the decoder's
single-mask output; the mean routing weight α1 per prompt type (appendix Table 6); and a
multimask study: SAM and Stable-SAM through predictors with each ``multimask_policy`` (single
output, best of 3, the served default ``auto``).

    python -m training.benchmark --out docs/benchmark --n-images 40 --train-missing

Trained ablation models are cached under ``runs/benchmark/`` (gitignored), named by variant,
number of training images and base hash, so a re-run only evaluates.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from runtime.logs import configure_logging
from stable_sam import (
    PluginMismatchError,
    StableSamPredictor,
    build_stable_sam,
    default_model_paths,
    file_sha256,
)
from stable_sam.predictor import MultimaskPolicy
from training import evaluation
from training.baselines import VARIANTS
from training.data import Sample
from training.evaluation import KIND_TITLES, PROMPT_KINDS, EvalModel, ModelScores, summarize

logger = logging.getLogger(__name__)

# JSON key -> (table title, training variant or None for models not trained here).
MODEL_ROWS = {
    "sam": ("SAM (frozen base)", None),
    "stable_sam": ("Stable-SAM (DSP+DRP+RTS, shipped plugins)", None),
    "dsp_no_rts": ("DSP w/o RTS (Table 5)", "dsp-no-rts"),
    "dsp_rts": ("DSP + RTS (Table 5)", "dsp"),
    "dsp_drp_rts": ("DSP + DRP + RTS (Table 5)", "stable"),
    "dt_sam": ("DT-SAM (decoder fine-tuned, RTS)", "dt-sam"),
    "pt_sam": ("PT-SAM (tokens fine-tuned, RTS)", "pt-sam"),
    "hq_sam": ("HQ-SAM (its recipe, 12 epochs)", "hq-sam"),
    "hq_sam_rts": ("HQ-SAM (RTS, 1 epoch)", "hq-sam-rts"),
    "pa_sam": ("PA-SAM (prompt adapter, RTS, 1 epoch)", "pa-sam"),
}
MULTIMASK_POLICIES: tuple[MultimaskPolicy, ...] = ("single", "best", "auto")


def evaluate(
    models: Sequence[EvalModel],
    dataset: Sequence[Sample],
    n_prompts: int = 20,
    max_objects: int | None = None,
    seed: int = 0,
    multimask_study: Sequence[str] = (),
    progress: bool = False,
) -> dict:
    """Run the protocol; returns the benchmark JSON (``models``, ``alpha1``, ``multimask``, ``meta``).

    The ``models`` rows decode with their predictors' multimask policy (``build_rows``: single
    output). ``multimask_study`` lists model keys that are also decoded through predictors
    with each of ``MULTIMASK_POLICIES``; all rows share the first model's image embeddings.
    """
    rows = list(models)
    study: dict[str, dict[str, str]] = {}  # model key -> policy -> row key
    for key in multimask_study:
        model = next(m for m in models if m.key == key)
        study[key] = {}
        for policy in MULTIMASK_POLICIES:
            if policy == model.predictor.multimask_policy:
                study[key][policy] = key
            else:
                rows.append(model.with_policy(policy, f"{key}/{policy}"))
                study[key][policy] = rows[-1].key
    start = time.perf_counter()
    scores = evaluation.evaluate(
        rows, dataset, PROMPT_KINDS, n_prompts, max_objects, seed, progress
    )
    wall = time.perf_counter() - start
    first = scores[models[0].key].objects
    return {
        "models": {m.key: _percent_table(scores[m.key]) for m in models},
        "alpha1": {
            m.key: {k: round(float(np.mean(v)), 4) for k, v in scores[m.key].alpha1.items()}
            for m in models
            if scores[m.key].alpha1
        },
        "multimask": {
            key: {policy: _percent_table(scores[row]) for policy, row in policies.items()}
            for key, policies in study.items()
        },
        "meta": {
            "images": len(dataset),
            "objects": len(first[PROMPT_KINDS[0]]) if first else 0,
            "prompts_per_object_and_type": n_prompts,
            "max_objects_per_image": max_objects,
            "seed": seed,
            "wall_s": round(wall, 1),
        },
    }


def _percent_table(scores: ModelScores) -> dict[str, dict[str, float]]:
    """mIoU, mBIoU and ST in percent (2 decimals) per prompt kind."""
    out = {}
    for kind in PROMPT_KINDS:
        if kind in scores.objects:
            summary = summarize(scores.objects[kind])
            out[kind] = {m: round(100 * summary[m], 2) for m in ("miou", "mbiou", "st")}
    return out


# ----------------------------------------------------------------------------- reports


def markdown_report(result: dict, notes: Sequence[str] = ()) -> str:
    """The benchmark JSON as markdown tables (values in percent)."""
    meta = result["meta"]
    on = f"the {meta['model_type']} SAM" if "model_type" in meta else "a frozen SAM base"
    lines = [f"# Benchmark: the Stable-SAM paper's protocol on {on}", ""]
    lines.append(
        f"Held-out synthetic scenes: {meta['images']} images, {meta['objects']} objects; "
        f"{meta['prompts_per_object_and_type']} prompts per object and prompt type "
        f"(GT box: 1); metrics in percent at the original resolution."
    )
    lines += ["", *notes, ""] if notes else [""]
    kinds = [k for k in PROMPT_KINDS if any(k in t for t in result["models"].values())]
    for metric, title in (("miou", "mIoU"), ("mbiou", "mBIoU"), ("st", "ST")):
        lines += [f"## {title}", ""]
        lines.append("| model | " + " | ".join(KIND_TITLES[k] for k in kinds) + " |")
        lines.append("|---|" + "---|" * len(kinds))
        for key, table in result["models"].items():
            name = MODEL_ROWS.get(key, (key, None))[0]
            cells = [f"{table[k][metric]:.1f}" if k in table else "–" for k in kinds]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if result.get("alpha1"):
        lines += ["## Mean routing weight α1 (appendix Table 6)", ""]
        lines.append("| model | " + " | ".join(KIND_TITLES[k] for k in kinds) + " |")
        lines.append("|---|" + "---|" * len(kinds))
        for key, a in result["alpha1"].items():
            name = MODEL_ROWS.get(key, (key, None))[0]
            lines.append(
                f"| {name} | " + " | ".join(f"{a[k]:.3f}" if k in a else "–" for k in kinds) + " |"
            )
        lines.append("")
    for key, policies in result.get("multimask", {}).items():
        name = MODEL_ROWS.get(key, (key, None))[0]
        lines += [f"## Multimask policy study: {name} (mIoU / ST)", ""]
        lines.append("| policy | " + " | ".join(KIND_TITLES[k] for k in kinds) + " |")
        lines.append("|---|" + "---|" * len(kinds))
        for policy, table in policies.items():
            cells = [
                f"{table[k]['miou']:.1f} / {table[k]['st']:.1f}" if k in table else "–"
                for k in kinds
            ]
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- models


def variant_path(cache_dir: Path, variant: str, n_train: int, base_sha: str) -> Path:
    kind = VARIANTS[variant].file_kind
    return cache_dir / f"{variant}-n{n_train}-{base_sha[:12]}.{kind}.safetensors"


def train_variant(
    variant: str,
    base: Path,
    model_type: str,
    n_train: int,
    out: Path,
    max_steps: int | None,
    seed: int = 0,
    device: str | None = None,
) -> None:
    """Train one ablation variant on ``n_train`` synthetic train scenes into ``out``: the file
    ``python -m training.train --variant VARIANT --data synthetic --n N_TRAIN`` writes."""
    from training.scenes import SceneDataset

    setup = VARIANTS[variant]
    dataset = SceneDataset("train", n_train)
    model = setup.build_model(model_type, base, device, seed=seed)
    config = setup.train_config(seed=seed, max_steps=max_steps, device=device)
    result = setup.train(model, dataset, config)
    result.summary.update({"variant": variant, "data": "synthetic", "base": base.name})
    setup.save(model, out, {"version": f"{variant}-seed{seed}", "training_summary": result.summary})


def build_rows(args: argparse.Namespace) -> tuple[list[EvalModel], list[str]]:
    """The model rows that exist (training missing ablations when asked); notes for the table."""
    from stable_sam.checkpoint import read_plugins

    base = Path(args.base)
    base_sha = file_sha256(base)
    device = args.device
    notes: list[str] = []
    sam = build_stable_sam(args.model_type, base, plugins=False, device=device)
    # The paper's tables are the decoder's single-mask output; the multimask study adds the rest.
    sam_pred = StableSamPredictor(sam, multimask_policy="single")
    rows = [EvalModel("sam", sam_pred)]
    stable = build_stable_sam(args.model_type, base, plugins=True, device=device)
    stable_pred = StableSamPredictor(stable, cache=sam_pred.cache, multimask_policy="single")

    def plugin_row(key: str, path: Path) -> None:
        try:
            plugins, meta = read_plugins(stable, path)
        except PluginMismatchError as exc:
            notes.append(f"- `{key}` skipped: {exc}")
            return
        summary = json.loads(meta.get("training_summary", "{}"))
        notes.append(
            f"- `{key}`: `{path.name}` trained on {summary.get('images', '?')} images, "
            f"{summary.get('steps', '?')} steps"
        )
        rows.append(EvalModel(key, stable_pred, plugins))

    plugin_file = Path(args.plugins) if args.plugins else default_model_paths().plugin_checkpoint
    if plugin_file.is_file():
        plugin_row("stable_sam", plugin_file)
    else:
        notes.append(f"- `stable_sam` skipped: no plugin file {plugin_file}")

    cache_dir = Path(args.cache_dir)
    for key, (_title, variant) in MODEL_ROWS.items():
        if variant is None or key not in args.models:
            continue
        path = variant_path(cache_dir, variant, args.ablation_n, base_sha)
        if not path.is_file():
            if not args.train_missing:
                notes.append(f"- `{key}` skipped: not trained ({path}; use --train-missing)")
                continue
            logger.info("training missing variant %s -> %s", variant, path)
            train_variant(
                variant,
                base,
                args.model_type,
                args.ablation_n,
                path,
                args.train_max_steps,
                device=device,
            )
        if not VARIANTS[variant].plugins:
            dt = VARIANTS[variant].build_model(args.model_type, base, device)
            meta = VARIANTS[variant].load(dt, path)
            summary = json.loads(meta.get("training_summary", "{}"))
            notes.append(
                f"- `{key}`: `{path.name}` trained on {summary.get('images', '?')} images, "
                f"{summary.get('steps', '?')} steps"
            )
            dt_pred = StableSamPredictor(dt, cache=sam_pred.cache, multimask_policy="single")
            rows.append(EvalModel(key, dt_pred))
        else:
            plugin_row(key, path)
    return rows, notes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    paths = default_model_paths()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the .md and .json")
    parser.add_argument("--base", default=str(paths.base_checkpoint))
    parser.add_argument("--model-type", default=paths.model_type)
    parser.add_argument("--plugins", default=None, help="Stable-SAM plugins (default: shipped)")
    parser.add_argument("--n-images", type=int, default=40, help="held-out images")
    parser.add_argument("--n-prompts", type=int, default=20, help="prompts per object and type")
    parser.add_argument("--max-objects", type=int, default=None, help="objects per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--cache-dir", default="runs/benchmark")
    parser.add_argument("--ablation-n", type=int, default=300, help="training images per variant")
    parser.add_argument("--train-missing", action="store_true")
    parser.add_argument("--train-max-steps", type=int, default=None)
    parser.add_argument(
        "--models",
        nargs="*",
        default=[k for k, (_t, v) in MODEL_ROWS.items() if v is not None],
        help="ablation rows to include",
    )
    parser.add_argument("--multimask-study", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see docs)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_images, args.n_prompts, args.max_objects = 2, 3, 2
        args.ablation_n = min(args.ablation_n, 4)
        args.train_max_steps = 1
    return args


def main(argv: list[str] | None = None) -> dict:
    configure_logging("INFO")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from training.scenes import SceneDataset

    rows, notes = build_rows(args)
    dataset = SceneDataset("heldout", args.n_images)
    study = ("sam", "stable_sam") if args.multimask_study else ()
    study = tuple(k for k in study if any(r.key == k for r in rows))
    result = evaluate(
        rows,
        dataset,
        n_prompts=args.n_prompts,
        max_objects=args.max_objects,
        seed=args.seed,
        multimask_study=study,
        progress=not args.no_progress,
    )
    result["meta"]["base"] = Path(args.base).name
    result["meta"]["model_type"] = args.model_type
    result["meta"]["command"] = "python -m training.benchmark " + " ".join(
        argv if argv is not None else _argv()
    )
    notes = [*notes, f"- Command: `{result['meta']['command']}`"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    report = markdown_report(result, notes)
    (args.out / "benchmark.md").write_text(report + "\n")
    print(report)
    return result


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


__all__ = [
    "MODEL_ROWS",
    "MULTIMASK_POLICIES",
    "build_rows",
    "evaluate",
    "main",
    "markdown_report",
]

if __name__ == "__main__":
    main()
