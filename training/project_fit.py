"""What fitting on a project's own annotations gains: the RTS job's training on part of the
held-out real-picture composites, scored on the rest against the plugins it started from.

A project here is ``training.composites``' held-out split (pictures none of the shipped
model's training composites use): its images ``[0, n_fit)`` play the annotated tasks, images
``[n_fit, n_fit + n_score)`` the images the project goes on to label. The training is the
queue job's (``training.jobs.run_training``): ``training.engine.train_plugins`` with
``TrainConfig(epochs=Settings().train_epochs)`` (``--epochs`` overrides), starting from the
plugins served before (``--plugins``, default the shipped ones), the base frozen. Both plugin
sets are then scored on the same prompts by ``training.evaluation.evaluate`` (single-mask
output): the GT box, ``n_prompts`` noisy boxes and ``n_prompts`` single clicks per object.

The fit and score images are different composites of one picture pool (the held-out split's
backgrounds and objects), so they share backgrounds and some objects, as a project's images
share a domain. ``training.real_benchmark`` scores held-out images from 0 on: those are among
the fit images here, so fitted plugins are never scored there.

    python -m training.project_fit --n-fit 40 --n-score 20 --out docs/benchmark

``--score-on-fit`` scores the fitted plugins on the very images they were trained on instead:
the best case of any fit (every scored object was seen in training, with the same kinds of
prompts), so an upper bound on what fitting, and the plugins themselves, can gain on this base.
``--decoder`` fits SAM's whole mask decoder instead (DT-SAM: ``training.baselines``, RTS,
50 times the plugins' parameters), scored against the plain base: whether a decoder of any
kind on this frozen encoder could gain what the plugins do not.

writes ``project_fit.json`` / ``.md`` in ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shlex
import sys
from pathlib import Path

import torch

from runtime.logs import configure_logging
from runtime.settings import Settings
from stable_sam import StableSamPredictor, build_stable_sam, default_model_paths
from stable_sam.build import file_sha256
from training import evaluation
from training.baselines import VARIANTS
from training.composites import CompositeDataset
from training.engine import TrainConfig, TrainResult, train_plugins
from training.evaluation import KIND_TITLES, EvalModel
from training.real_benchmark import KINDS, percent_table
from training.real_pictures import CATALOGUE_PATH

logger = logging.getLogger(__name__)

ROWS = {"served": "Plugins served before (start)", "fitted": "Plugins fitted on the project"}
DECODER_ROWS = {"served": "Plain base (start)", "fitted": "Decoder fitted on the project (DT-SAM)"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    paths = default_model_paths()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-type", default=paths.model_type)
    p.add_argument("--base", default=str(paths.base_checkpoint))
    p.add_argument("--plugins", default=str(paths.plugin_checkpoint), help="the starting plugins")
    p.add_argument("--n-fit", type=int, default=40, help="held-out images to train on")
    p.add_argument("--n-score", type=int, default=20, help="held-out images to score on")
    p.add_argument("--epochs", type=int, default=None, help="default: the job's (TRAIN_EPOCHS)")
    p.add_argument(
        "--score-on-fit", action="store_true",
        help="score on the training images themselves (the fit's upper bound); --n-score unused",
    )  # fmt: skip
    p.add_argument("--n-prompts", type=int, default=5, help="noisy boxes / clicks per object")
    p.add_argument("--max-objects", type=int, default=5)
    p.add_argument("--size-range", type=int, nargs=2, default=(256, 1024))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--decoder", action="store_true",
        help="fit SAM's mask decoder (DT-SAM) instead of plugins; scored against the plain base",
    )  # fmt: skip
    p.add_argument("--catalogue", type=Path, default=CATALOGUE_PATH, help="the pictures' catalogue")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def fit_plugins(
    args: argparse.Namespace, fit: CompositeDataset, epochs: int
) -> tuple[list[EvalModel], TrainResult]:
    """The queue job's fit: the plugins from ``--plugins`` trained on ``fit``; the rows score
    the plugins before and after, on one predictor."""
    model = build_stable_sam(
        args.model_type, args.base, plugin_checkpoint=args.plugins, device=args.device
    )
    served = copy.deepcopy(model.plugins).eval()
    config = TrainConfig(epochs=epochs, seed=args.seed, device=str(model.device))
    result = train_plugins(model, fit, config)
    model.plugins.eval()
    predictor = StableSamPredictor(model, multimask_policy="single")
    rows = [EvalModel("served", predictor, served), EvalModel("fitted", predictor, model.plugins)]
    return rows, result


def fit_decoder(
    args: argparse.Namespace, fit: CompositeDataset, epochs: int
) -> tuple[list[EvalModel], TrainResult]:
    """DT-SAM's fit: the whole mask decoder trained on ``fit``; the rows score the plain base
    (a second model, since a ``StableSam`` cannot be copied) and the fitted one."""
    variant = VARIANTS["dt-sam"]
    model = variant.build_model(args.model_type, args.base, args.device, seed=args.seed)
    config = variant.train_config(epochs=epochs, seed=args.seed, device=str(model.device))
    result = variant.train(model, fit, config)
    model.eval()
    start = build_stable_sam(args.model_type, args.base, plugins=False, device=args.device)
    plain = StableSamPredictor(start, multimask_policy="single")
    fitted = StableSamPredictor(model, cache=plain.cache, multimask_policy="single")
    return [EvalModel("served", plain), EvalModel("fitted", fitted)], result


def main(argv: list[str] | None = None) -> dict:
    configure_logging("INFO")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    size_range = tuple(args.size_range)
    fit = CompositeDataset("heldout", args.n_fit, size_range, catalogue=args.catalogue)
    if args.score_on_fit:
        score_range = (0, args.n_fit)
        score = [fit[i] for i in range(args.n_fit)]
    else:
        score_range = (args.n_fit, args.n_fit + args.n_score)
        rest = CompositeDataset(
            "heldout", args.n_score, size_range, offset=args.n_fit, catalogue=args.catalogue
        )
        score = [rest[i] for i in range(args.n_score)]
    epochs = Settings().train_epochs if args.epochs is None else args.epochs
    rows, result = (fit_decoder if args.decoder else fit_plugins)(args, fit, epochs)
    train_s = result.wall_s  # the training's own clock, not the models' building
    scores = evaluation.evaluate(rows, score, KINDS, args.n_prompts, args.max_objects, args.seed)
    tables = {key: percent_table(s) for key, s in scores.items()}
    gain = {k: round(tables["fitted"][k]["miou"] - tables["served"][k]["miou"], 2) for k in KINDS}
    objects = len(scores["served"].objects.get("gt_box", []))
    result_json = {
        "models": tables,
        "gain_miou": gain,
        "meta": {
            "fit_images": args.n_fit,
            "score_images": score_range[1] - score_range[0],
            "scored_on_fit_images": args.score_on_fit,
            "score_objects": objects,
            "epochs": epochs,
            "train_steps": result.steps,
            "final_loss": round(result.final_loss, 4),
            "train_s": round(train_s, 1),
            "model_type": args.model_type,
            "base": Path(args.base).name,
            "base_sha256": file_sha256(args.base),
            "fitted": "SAM's mask decoder (DT-SAM)" if args.decoder else "the plugins",
            "plugins": None if args.decoder else Path(args.plugins).name,
            "prompts_per_object": args.n_prompts,
            "max_objects_per_image": args.max_objects,
            "command": "python -m training.project_fit "
            + shlex.join(argv if argv is not None else sys.argv[1:]),
        },
    }
    header = [f"{KIND_TITLES[k]} mIoU" for k in KINDS] + ["Noisy box ST"]
    lines = [
        f"Held-out composites: trained on images 0-{args.n_fit - 1} ({result.steps} RTS steps, "
        f"{epochs} epoch(s), {train_s / 60:.1f} min), scored on images {score_range[0]}-"
        f"{score_range[1] - 1} ({objects} objects"
        + ("; the training images themselves: the fit's upper bound" if args.score_on_fit else "")
        + "); percent.",
        "",
        ("| decoder | " if args.decoder else "| plugins | ") + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    for key, table in tables.items():
        cells = [f"{table[k]['miou']:.1f}" for k in KINDS] + [f"{table['noisy_box']['st']:.1f}"]
        title = (DECODER_ROWS if args.decoder else ROWS)[key]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines.append("| gain | " + " | ".join(f"{gain[k]:+.1f}" for k in KINDS) + " | |")
    lines += ["", f"Command: `{result_json['meta']['command']}`"]
    report = "\n".join(lines)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "project_fit.json").write_text(json.dumps(result_json, indent=2) + "\n")
        (args.out / "project_fit.md").write_text(report + "\n")
    print(report)
    return result_json


if __name__ == "__main__":
    main()
