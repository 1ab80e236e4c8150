"""``python -m training.user_study {collect,evaluate,demo}``: the user-study command line."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from labelstudio.client import LabelStudioClient
from runtime.logs import configure_logging

if TYPE_CHECKING:
    from training.user_study.evaluate import StudyResult

logger = logging.getLogger(__name__)

API_KEY_ENV = "LABEL_STUDIO_API_KEY"


def command_line(argv: list[str]) -> str:
    """The command as typed (quoted), for the report; the API key never appears in it."""
    shown = []
    skip = False
    for arg in argv:
        if skip:
            shown.append("REDACTED")
            skip = False
            continue
        if arg == "--api-key":
            skip = True
        elif arg.startswith("--api-key="):
            arg = "--api-key=REDACTED"
        shown.append(arg)
    return "python -m training.user_study " + " ".join(shlex.quote(a) for a in shown)


def _add_ls_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ls-url", help="Label Studio URL, e.g. http://localhost:8080")
    p.add_argument(
        "--api-key",
        help=f"Label Studio personal access token or legacy token (default: ${API_KEY_ENV})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.user_study", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("collect", help="set up a study project in Label Studio")
    _add_ls_options(c)
    c.add_argument("--gt", required=True, help="mask folder or COCO JSON with the target objects")
    c.add_argument("--images", help="folder of the original images (default: from --gt)")
    c.add_argument("--title", default="Stable-SAM user study", help="project title")
    c.add_argument("--highlight", choices=("outline", "tint", "none"), default="outline")
    c.add_argument(
        "--max-targets", type=int, default=None, help="at most this many targets per image"
    )
    c.add_argument("--min-area", type=int, default=0, help="skip targets smaller than this (px)")
    c.add_argument("--work-dir", default=None, help="where highlighted images are written")

    e = sub.add_parser("evaluate", help="evaluate a study: box quality and segmentation quality")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--export", help="Label Studio JSON export file")
    src.add_argument("--project", type=int, help="project id, exported through --ls-url")
    _add_ls_options(e)
    e.add_argument(
        "--gt",
        required=True,
        help="mask folder, COCO JSON, or 'brush' (ground-truth brush annotations in the export)",
    )
    e.add_argument("--gt-annotator", help="with --gt brush: only this annotator's brushes are GT")
    e.add_argument("--images", help="folder of the original images")
    e.add_argument(
        "--models",
        default="sam,stable-sam",
        help="comma list: sam, stable-sam, hq-sam (official, --hq-checkpoint), project:<plugin "
        "file>, dt-sam:<file>, pt-sam:<file>, hq-sam:<file>, pa-sam:<file> (trained on the base); 'none' for "
        "box quality only",
    )
    e.add_argument("--base-type", help="SAM base model type (default: the embedded default)")
    e.add_argument("--base-checkpoint", help="SAM base checkpoint (default: the embedded default)")
    e.add_argument("--hq-checkpoint", help="HQ-SAM checkpoint, needed for hq-sam")
    e.add_argument("--hq-model-type", default="hq_vit_l")
    e.add_argument("--device", default=None)
    e.add_argument("--noisy-per-object", type=int, default=5)
    e.add_argument("--noise-scale", type=float, default=0.4)
    e.add_argument("--min-match-iou", type=float, default=0.1)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", required=True, help="output folder")

    d = sub.add_parser("demo", help="a simulated study on synthetic images, evaluated in one go")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--images", type=int, default=6, help="synthetic images")
    d.add_argument("--size", type=int, default=256, help="image side, px")
    d.add_argument("--targets-per-image", type=int, default=2)
    d.add_argument("--models", default="sam,stable-sam", help="as for evaluate; 'none' to skip")
    d.add_argument("--seed", type=int, default=0)
    return parser


def _api_key(args: argparse.Namespace) -> str:
    from runtime.settings import Settings

    configured = Settings().label_studio_api_key
    key = args.api_key or (configured.get_secret_value() if configured is not None else "")
    if not key:
        raise SystemExit(f"a Label Studio API key is needed: --api-key or ${API_KEY_ENV}")
    return key


def run_evaluate(args: argparse.Namespace, command: str) -> Path:
    """The ``evaluate`` command: inputs from the command line, outputs into ``--out``."""
    from training.user_study.loaders import study_client
    from training.user_study.report import write_report

    client = None
    if args.ls_url:
        client = study_client(args.ls_url, _api_key(args))
    elif args.project is not None:
        raise SystemExit("--project needs --ls-url")
    try:
        result = _evaluate(args, client)
    finally:
        if client is not None:
            client.close()
    return write_report(result, args.out, command)


def _evaluate(args: argparse.Namespace, client: LabelStudioClient | None) -> StudyResult:
    """Gather the inputs named on the command line and run the evaluation."""
    from training.user_study.evaluate import EvaluationConfig, evaluate_study
    from training.user_study.images import OriginalImages
    from training.user_study.loaders import load_ground_truth, load_tasks
    from training.user_study.ls_export import image_key_for, parse_export
    from training.user_study.models import build_models, model_names

    tasks, users = load_tasks(args.export, client, args.project)
    brush = args.gt == "brush"
    study_images = {image_key_for(t.get("data") or {}) for t in tasks}
    gt = None if brush else load_ground_truth(args.gt, args.images, only=study_images)
    sizes = None if gt is None else {k: (g.height, g.width) for k, g in gt.items()}
    export = parse_export(
        tasks, image_sizes=sizes, users=users, read_brush_gt=brush, gt_annotator=args.gt_annotator
    )
    if gt is None:
        from training.user_study.ground_truth import from_brush_masks

        gt = from_brush_masks(export.brush_masks)
    models = build_models(
        model_names(args.models),
        base_type=args.base_type,
        base_checkpoint=args.base_checkpoint,
        hq_checkpoint=args.hq_checkpoint,
        hq_model_type=args.hq_model_type,
        device=args.device,
    )
    loader = OriginalImages(gt, args.images, client, export.task_data)
    config = EvaluationConfig(
        noisy_per_object=args.noisy_per_object,
        noise_scale=args.noise_scale,
        min_match_iou=args.min_match_iou,
        seed=args.seed,
    )
    return evaluate_study(export, gt, models, loader, config, logger.info)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    configure_logging("DEBUG" if args.verbose else "INFO")
    command = command_line(argv)
    if args.command == "evaluate":
        report = run_evaluate(args, command)
    elif args.command == "collect":
        from training.user_study.collect import run_collect

        project = run_collect(args, _api_key(args))
        print(f"study project {project['id']} at {args.ls_url}/projects/{project['id']}")
        return 0
    else:
        from training.user_study.demo import run_demo

        report = run_demo(args, command)
    print(f"report: {report}")
    return 0
