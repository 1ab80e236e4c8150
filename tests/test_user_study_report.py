"""User-study evaluator: ground-truth loaders, the report files, the CLI, models, demo, collect."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from training.user_study.cli import command_line, main
from training.user_study.collect import highlight, plan_targets
from training.user_study.ground_truth import load_coco, load_mask_folder


def write_png(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), arr)


def tiny_study(tmp_path):
    """A 32x48 image with two square objects, a mask folder, and an export with 2 annotators."""
    image = np.zeros((32, 48, 3), np.uint8)
    image[4:14, 4:14] = (200, 30, 30)
    image[16:28, 24:44] = (30, 200, 30)
    write_png(tmp_path / "gt/images/pic.png", image)
    m0 = np.zeros((32, 48), np.uint8)
    m0[4:14, 4:14] = 255
    m1 = np.zeros((32, 48), np.uint8)
    m1[16:28, 24:44] = 255
    write_png(tmp_path / "gt/masks/pic_0.png", m0)
    write_png(tmp_path / "gt/masks/pic_1.png", m1)

    def region(x0, y0, x1, y1):
        return {
            "type": "rectanglelabels",
            "original_width": 48,
            "original_height": 32,
            "value": {
                "x": 100 * x0 / 48,
                "y": 100 * y0 / 32,
                "width": 100 * (x1 - x0) / 48,
                "height": 100 * (y1 - y0) / 32,
                "rotation": 0,
                "rectanglelabels": ["target"],
            },
        }

    def t(tid, target, anns):
        data = {"image": f"/data/upload/1/abcdef12-pic__target_{target}.png"}
        data.update({"image_name": "pic.png", "target_id": target})
        return {"id": tid, "data": data, "annotations": anns}

    tasks = [
        t(
            1,
            "0",
            [  # GT box [4, 4, 14, 14]
                {"id": 1, "completed_by": 1, "result": [region(4, 4, 14, 14)], "lead_time": 2.0},
                {"id": 2, "completed_by": 2, "result": [region(9, 4, 19, 14)], "lead_time": 4.0},
            ],
        ),
        t(
            2,
            "1",
            [  # GT box [24, 16, 44, 28]
                {"id": 3, "completed_by": 1, "result": [region(24, 16, 44, 28)]},
                {"id": 4, "completed_by": 2, "result": [], "was_cancelled": True},
            ],
        ),
    ]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    return export, tmp_path / "gt"


def test_mask_folder_with_one_png_per_instance(tmp_path):
    _, gt_dir = tiny_study(tmp_path)
    gt = load_mask_folder(gt_dir)
    assert list(gt) == ["pic"] and sorted(gt["pic"].objects) == ["0", "1"]
    np.testing.assert_allclose(gt["pic"].objects["1"].box_xyxy, [24, 16, 44, 28])
    assert gt["pic"].image_path.name == "pic.png"


def test_mask_folder_with_instance_label_pngs(tmp_path):
    labels = np.zeros((10, 12), np.uint8)
    labels[1:3, 2:5] = 3
    labels[6:9, 0:2] = 7
    write_png(tmp_path / "masks/photo.png", labels)
    gt = load_mask_folder(tmp_path)
    assert sorted(gt["photo"].objects) == ["3", "7"]
    np.testing.assert_allclose(gt["photo"].objects["3"].box_xyxy, [2, 1, 5, 3])


def test_coco_ground_truth(tmp_path):
    coco = {
        "images": [{"id": 5, "file_name": "sub/cat.jpg", "height": 10, "width": 12}],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [
            {
                "id": 42,
                "image_id": 5,
                "category_id": 1,
                "segmentation": [[2, 1, 6, 1, 6, 5, 2, 5]],
                "area": 16,
                "bbox": [2, 1, 4, 4],
                "iscrowd": 0,
            }
        ],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    gt = load_coco(path)
    obj = gt["cat"].objects["42"]
    assert obj.label == "cat" and gt["cat"].height == 10
    assert obj.mask[3, 4] and not obj.mask[8, 10]


def test_evaluate_cli_box_quality_only_writes_every_file(tmp_path):
    export, gt_dir = tiny_study(tmp_path)
    out = tmp_path / "out"
    argv = ["evaluate", "--export", str(export), "--gt", str(gt_dir), "--models", "none"]
    assert main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # IoUs: user1 1.0 and 1.0, user2 [9,4,19,14] vs [4,4,14,14] = 50/150; the skip is counted
    assert summary["counts"]["skipped"] == 1 and summary["counts"]["matched"] == 3
    assert summary["box_quality"]["overall"]["mean"] == pytest.approx((2 + 1 / 3) / 3)
    assert summary["box_quality"]["overall"]["median"] == pytest.approx(1.0)
    assert summary["box_quality"]["per_annotator"]["user2"]["mean"] == pytest.approx(1 / 3)
    assert summary["box_quality"]["lead_time_s"]["mean"] == pytest.approx(3.0)
    assert summary["box_quality"]["lead_time_s"]["share_within_5s"] == pytest.approx(1.0)
    assert summary["box_quality"]["histogram"]["counts"][3] == 1
    assert summary["box_quality"]["histogram"]["counts"][9] == 2
    assert summary["simulated"] is None
    report = (out / "report.md").read_text()
    assert command_line([*argv, "--out", str(out)]) in report
    assert "SIMULATED" not in report
    rows = (out / "per_object.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("pic,0,,2,user1;user2,0.6667")
    assert (out / "box_iou_histogram.png").stat().st_size > 1000


def test_command_line_in_the_report_never_shows_the_api_key():
    shown = command_line(["evaluate", "--api-key", "s3cret", "--project", "3", "--api-key=x"])
    assert "s3cret" not in shown and "--api-key=REDACTED" in shown and "--api-key REDACTED" in shown


@pytest.mark.slow  # builds a randomly initialised mini SAM (~2-5 s on a busy 2-core CPU)
def test_evaluate_with_real_models_fills_the_table(tmp_path):
    from stable_sam import StableSamPredictor, build_stable_sam
    from training.evaluation import EvalModel
    from training.user_study.evaluate import EvaluationConfig, evaluate_study
    from training.user_study.ground_truth import load_mask_folder
    from training.user_study.images import OriginalImages
    from training.user_study.ls_export import parse_export, read_export_file
    from training.user_study.report import write_report

    export_path, gt_dir = tiny_study(tmp_path)
    gt = load_mask_folder(gt_dir)
    export = parse_export(read_export_file(export_path))
    model = build_stable_sam("mini", None, plugins=True, device="cpu")  # random weights
    random = EvalModel("random", StableSamPredictor(model), description="mini, random weights")
    config = EvaluationConfig(noisy_per_object=2)
    result = evaluate_study(export, gt, {"random": random}, OriginalImages(gt), config)
    assert result.models == {"random": "mini, random weights"}
    row = result.table["random"]
    assert row["gt_box"]["objects"] == 2 and row["gt_box"]["prompts"] == 2
    assert row["user"]["prompts"] == 3 and row["noisy"]["prompts"] == 4
    assert 0.0 <= row["user"]["miou"] <= 1.0 and row["user"]["st"] is not None
    # object 0 was boxed by two annotators, object 1 by one
    assert result.consensus["random"]["objects"] == 1
    assert result.consensus["random"]["single_box_objects"] == 1
    report = write_report(result, tmp_path / "out", "cmd")
    assert "| random |" in report.read_text()
    assert (tmp_path / "out" / "miou_by_model.png").is_file()


def test_report_compares_the_consensus_with_one_annotator(tmp_path):
    from user_study_support import BoxFiller

    from training.evaluation import EvalModel
    from training.user_study.evaluate import evaluate_study
    from training.user_study.images import OriginalImages
    from training.user_study.ls_export import parse_export, read_export_file
    from training.user_study.report import write_report

    export_path, gt_dir = tiny_study(tmp_path)
    gt = load_mask_folder(gt_dir)
    export = parse_export(read_export_file(export_path))
    models = {"box": EvalModel("box", BoxFiller())}
    result = evaluate_study(export, gt, models, OriginalImages(gt))
    report = write_report(result, tmp_path / "out", "cmd").read_text()
    # Object 0: user1's box is the GT box [4,4,14,14] (IoU 1), user2's [9,4,19,14] (1/3). With two
    # masks the majority ("at least half") is their union, [4,4,19,14]: IoU 100/150, agreement
    # 2/3. Object 1 has one box (user2 skipped it): left out and counted.
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    row = summary["consensus_vs_single"]["box"]
    assert row["single_miou"] == pytest.approx(2 / 3)
    assert row["consensus_miou"] == pytest.approx(2 / 3)
    assert row["agreement"] == pytest.approx(2 / 3)
    assert (row["objects"], row["boxes"], row["single_box_objects"]) == (1, 2, 1)
    assert "### Consensus of 2 annotators vs one annotator" in report
    assert "Objects with a single box are left out: 1." in report
    assert "| box | 1 | 2 | 66.7 | 66.7 | +0.0 |" in report
    header, first, second = (tmp_path / "out" / "per_object.csv").read_text().splitlines()
    assert header.endswith("box:consensus:iou,box:consensus:biou,box:consensus:agreement")
    iou, _, agreement = first.split(",")[-3:]
    assert (iou, agreement) == ("0.6667", "0.6667")
    assert second.endswith(",,,")  # one box: no consensus


def test_unknown_model_name_is_refused():
    from training.user_study.models import build_models

    with pytest.raises(ValueError, match="unknown model"):
        build_models(["sam2"], base_type="mini")
    with pytest.raises(ValueError, match="hq-checkpoint"):
        build_models(["hq-sam"], base_type="mini")


def test_models_option_is_a_comma_list_or_none():
    from training.user_study.models import build_models, model_names

    assert model_names(" sam, stable-sam ,") == ["sam", "stable-sam"]
    assert model_names("none") == [] and model_names("") == []
    # No models: nothing is built or looked up (box quality only, even without weights).
    assert build_models([], base_checkpoint="/no/such/base.pth", allow_random_base=False) == {}


def test_demo_report_says_it_is_simulated(tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--images", "2", "--size", "128", "--models", "none"]
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    assert "SIMULATED STUDY" in report and "careful@demo 0.1" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["simulated"] and summary["counts"]["skipped"] == 1
    assert summary["counts"]["duplicates"] == 1
    per = summary["box_quality"]["per_annotator"]
    assert per["careful@demo"]["mean"] > per["sloppy@demo"]["mean"]
    assert (out / "demo_data" / "export.json").is_file()


def test_highlight_outlines_the_target_only():
    image = np.full((40, 40, 3), 100, np.uint8)
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    out = highlight(image, mask, "outline")
    red = (out == (255, 40, 40)).all(axis=2)
    assert red[10, 20] and red[20, 10] and not red[20, 20] and not red[2, 2]
    tinted = highlight(image, mask, "tint")
    assert tinted[20, 20, 0] > 100 and (tinted[2, 2] == 100).all()
    assert (highlight(image, mask, "none") == image).all()


def test_plan_targets_renders_the_largest_targets_first(tmp_path):
    _, gt_dir = tiny_study(tmp_path)
    gt = load_mask_folder(gt_dir)
    targets = plan_targets(gt, tmp_path / "work", max_targets=1)
    assert [(t.image_key, t.object_id, t.image_name) for t in targets] == [("pic", "1", "pic.png")]
    assert targets[0].highlighted_path.name == "t00000__pic__1.png"
    assert targets[0].highlighted_path.is_file()


def test_ground_truth_loads_only_the_study_images(tmp_path):
    _, gt_dir = tiny_study(tmp_path)
    write_png(gt_dir / "images/unused.png", np.zeros((8, 8, 3), np.uint8))
    write_png(gt_dir / "masks/unused_0.png", np.full((8, 8), 255, np.uint8))
    assert sorted(load_mask_folder(gt_dir)) == ["pic", "unused"]
    assert sorted(load_mask_folder(gt_dir, only={"pic"})) == ["pic"]


def test_images_are_fetched_from_label_studio_when_not_on_disk():
    from backend_support import FakeLabelStudio

    from training.user_study.ground_truth import GtImage
    from training.user_study.images import OriginalImages
    from training.user_study.loaders import study_client

    image = np.zeros((6, 9, 3), np.uint8)
    image[1, 2] = (250, 10, 10)
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    with FakeLabelStudio() as ls, study_client(ls.url, ls.legacy_token) as client:
        ls.files["bb-x.png"] = png.tobytes()
        data = {
            1: {
                "image": "/data/upload/1/aa-x__target_1.png",
                "original_image": "/data/upload/1/bb-x.png",
                "image_name": "x.png",
            }
        }
        images = OriginalImages({"x": GtImage("x", 6, 9)}, None, client, data)
        np.testing.assert_array_equal(images("x"), image)
        # the original, with Label Studio's token; not the highlighted copy
        assert ls.requests["/data/upload/1/bb-x.png"] == 1
        assert ls.requests["/data/upload/1/aa-x__target_1.png"] == 0
        assert ls.auth_headers == [f"Token {ls.legacy_token}"]
        with pytest.raises(FileNotFoundError):
            images("missing")


@pytest.mark.slow  # builds three randomly initialised mini models (~5-15 s on a busy CPU)
def test_models_from_names_sam_hq_sam_and_project_versions(tmp_path):
    import torch

    from stable_sam import build_sam, build_stable_sam, save_plugins
    from training.evaluation import decode
    from training.user_study.models import build_models

    base = tmp_path / "mini.pth"
    torch.save(build_sam("mini").state_dict(), base)
    hq = tmp_path / "hq_mini.pth"
    torch.save(build_sam("hq_mini").state_dict(), hq)
    plugin_file = tmp_path / "v1.safetensors"
    save_plugins(build_stable_sam("mini", base, plugins=True, device="cpu"), plugin_file)

    from runtime.versions import LocalVersionStore

    store = LocalVersionStore(tmp_path / "versions")
    version = store.write("7", plugin_file, {}, {}, promote=True, reason="test")
    project_dir = tmp_path / "versions" / "7"  # means: project 7's current version
    from training.baselines import VARIANTS, save_decoder, save_hq, save_tokens

    plain = build_stable_sam("mini", base, plugins=False, device="cpu")
    with torch.no_grad():
        plain.sam.mask_decoder.mask_tokens.weight.add_(0.5)  # as if trained
    save_decoder(plain, tmp_path / "dt.safetensors")
    save_tokens(plain, tmp_path / "pt.safetensors")
    hq_params = VARIANTS["hq-sam"].build_model("mini", base, "cpu", seed=2)
    save_hq(hq_params, tmp_path / "hq.safetensors")
    baselines = [f"dt-sam:{tmp_path / 'dt.safetensors'}", f"pt-sam:{tmp_path / 'pt.safetensors'}"]
    names = ["sam", "hq-sam", f"project:{plugin_file}", f"project:{project_dir}", *baselines]
    models = build_models(
        names,
        base_type="mini",
        base_checkpoint=base,
        hq_checkpoint=hq,
        hq_model_type="hq_mini",
        device="cpu",
    )
    assert list(models) == names
    assert "HQ-SAM hq_mini" in models["hq-sam"].description
    assert "v1.safetensors" in models[f"project:{plugin_file}"].description
    assert version.path.name in models[f"project:{project_dir}"].description
    for name in baselines:  # the file was loaded: its tokens, not the base's
        tokens = models[name].predictor.model.sam.mask_decoder.mask_tokens.weight
        assert torch.equal(tokens, plain.sam.mask_decoder.mask_tokens.weight)
        assert name.split(":")[0].upper() in models[name].description
    hq_name = f"hq-sam:{tmp_path / 'hq.safetensors'}"
    hq_model = build_models([hq_name], base_type="mini", base_checkpoint=base)[hq_name]
    assert torch.equal(
        hq_model.predictor.model.sam.mask_decoder.hf_token.weight,
        hq_params.sam.mask_decoder.hf_token.weight,
    )
    assert "HQ-SAM parameters trained" in hq_model.description
    with pytest.raises(FileNotFoundError):
        build_models(["project:/no/such/file"], base_type="mini", base_checkpoint=base)
    image = np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    for name, model in models.items():
        assert model.key == name
        boxes = np.array([[2.0, 3, 20, 18], [0, 0, 40, 24]])
        masks, _ = decode(model, model.predictor.embed(image), boxes)
        assert masks.shape == (2, 24, 40) and masks.dtype == bool


def test_evaluate_cli_with_brush_ground_truth_in_the_export(tmp_path):
    from label_studio_sdk.converter.brush import mask2rle

    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 10:20] = 255
    brush = {
        "type": "brushlabels",
        "original_width": 30,
        "original_height": 20,
        "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["thing"]},
    }

    def box(x0, y0, x1, y1):
        value = {"x": x0 / 0.3, "y": y0 / 0.2, "width": (x1 - x0) / 0.3, "height": (y1 - y0) / 0.2}
        return {
            "type": "rectanglelabels",
            "original_width": 30,
            "original_height": 20,
            "value": value,
        }

    tasks = [
        {
            "id": 1,
            "data": {"image": "/data/upload/1/12345678-shot.png"},  # no target named
            "annotations": [
                {"id": 1, "completed_by": 9, "result": [brush]},
                {"id": 2, "completed_by": 1, "result": [box(10, 5, 20, 15)]},
                {"id": 3, "completed_by": 2, "result": [box(10, 5, 20, 10)]},  # IoU 0.5
                {
                    "id": 4,
                    "completed_by": 2,
                    "result": [box(0, 0, 3, 3)],
                },  # an older try, see below
            ],
        }
    ]
    tasks[0]["annotations"][2]["updated_at"] = "2026-01-02"
    tasks[0]["annotations"][3]["updated_at"] = "2026-01-01"  # the older duplicate of user2
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    out = tmp_path / "out"
    argv = ["evaluate", "--export", str(export), "--gt", "brush", "--gt-annotator", "user9"]
    assert main([*argv, "--models", "none", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ground_truth_annotations"] == 1
    assert summary["counts"]["duplicates"] == 1 and summary["counts"]["matched"] == 2
    assert summary["box_quality"]["per_annotator"]["user1"]["mean"] == pytest.approx(1.0)
    assert summary["box_quality"]["per_annotator"]["user2"]["mean"] == pytest.approx(0.5)


def test_an_export_without_annotations_lists_is_refused_with_a_hint(tmp_path):
    from training.user_study.ls_export import read_export_file

    path = tmp_path / "min.json"
    path.write_text(json.dumps([{"image": "/data/upload/1/a.png", "box": []}]))
    with pytest.raises(ValueError, match="JSON_MIN"):
        read_export_file(path)


def test_highlighted_file_names_are_safe_and_unique(tmp_path):
    from training.user_study.ground_truth import GtImage, GtObject

    image_path = tmp_path / "my photo (1).png"
    write_png(image_path, np.zeros((8, 8, 3), np.uint8))
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    gt = {"my photo (1)": GtImage("my photo (1)", 8, 8, {"a/b": GtObject("a/b", mask)}, image_path)}
    (target,) = plan_targets(gt, tmp_path / "work")
    assert target.highlighted_path.name == "t00000__my_photo_1___a_b.png"
    assert target.image_name == "my photo (1).png" and target.object_id == "a/b"


def test_evaluate_cli_with_coco_ground_truth_and_untargeted_tasks(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "street.jpg", "height": 40, "width": 50}],
        "categories": [{"id": 3, "name": "car"}],
        "annotations": [
            {
                "id": 11,
                "image_id": 1,
                "category_id": 3,
                "iscrowd": 0,
                "area": 100,
                "bbox": [0, 0, 10, 10],
                "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]],
            },
            {
                "id": 12,
                "image_id": 1,
                "category_id": 3,
                "iscrowd": 0,
                "area": 200,
                "bbox": [30, 20, 20, 10],
                "segmentation": [[30, 20, 50, 20, 50, 30, 30, 30]],
            },
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))

    def box(x0, y0, x1, y1):
        value = {"x": x0 * 2, "y": y0 * 2.5, "width": (x1 - x0) * 2, "height": (y1 - y0) * 2.5}
        return {
            "type": "rectanglelabels",
            "original_width": 50,
            "original_height": 40,
            "value": value,
        }

    # one rectangle project, no target named: boxes are matched by IoU
    tasks = [
        {
            "id": 5,
            "data": {"image": "/data/upload/2/0badf00d-street.jpg"},
            "annotations": [
                {
                    "id": 1,
                    "completed_by": 1,
                    "result": [box(30, 20, 50, 30), box(0, 0, 10, 10), box(20, 0, 25, 5)],
                }
            ],
        }
    ]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    out = tmp_path / "out"
    argv = [
        "evaluate",
        "--export",
        str(tmp_path / "export.json"),
        "--gt",
        str(tmp_path / "coco.json"),
    ]
    assert main([*argv, "--models", "none", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["matched"] == 2 and summary["counts"]["unmatched"] == 1
    # COCO's polygon 0..10 rasterises to pixels 0..9, whose box on pixel edges is 0..10 again
    assert summary["box_quality"]["overall"]["mean"] == pytest.approx(1.0)
    (unmatched,) = summary["unmatched"]
    assert unmatched["box_xyxy"] == pytest.approx([20, 0, 25, 5])
    rows = (out / "per_object.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in rows[1:]] == [
        ["street", "11", "car"],
        ["street", "12", "car"],
    ]
