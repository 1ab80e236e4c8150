"""The pretraining loop: one step's SAM loss over every prompt round, and the loop around it.

Each step decodes all prompts of a kind, over every image of the batch, in one decoder call
(``decode_batched``). The loop runs on a step or wall-time budget, writes a checkpoint every
``ckpt_minutes`` (scoring the monitor scenes then), and resumes from the state file.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from tqdm import tqdm

from stable_sam.build import build_sam, file_sha256
from training import engine
from training.data import Sample
from training.pretrain.checkpoint import export_fp16, load_state, save_state, warm_start
from training.pretrain.config import MODEL_TYPE, PretrainConfig
from training.pretrain.data import PretrainBatch, batch_stream
from training.pretrain.provenance import git_commit, hardware_name
from training.pretrain.schedule import focal_weight_at, lr_at
from training.scenes import SceneDataset

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- one step


def decode_batched(
    sam: Sam,
    embeddings: torch.Tensor,
    points: tuple[torch.Tensor, torch.Tensor] | None,
    boxes: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    multimask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt encoder + mask decoder for M prompts on M possibly different images in one
    decoder call: ``embeddings`` (M,256,16,16) holds each prompt's image embedding. Returns
    low-res logits (M,C,4h,4w) and IoU predictions (M,C).

    SAM's decoder adds the dense prompt embedding to the image embedding it repeats once per
    prompt; passing a zero image embedding and (embedding + dense) as the dense prompt gives
    the same sum, so the official forward runs unchanged (tested against per-image decoding)."""
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
    return sam.mask_decoder(
        image_embeddings=embeddings.new_zeros((1, *embeddings.shape[1:])),
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=embeddings + dense,
        multimask_output=multimask,
    )


def correction_points(
    pred: np.ndarray, target: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One SAM-style correction click per prompt: uniform from the error region; positive on
    a false negative, negative on a false positive. pred/target (M,S,S) bool -> (M,1,2) xy at
    pixel centres (as ``stable_sam.prompts`` places points), (M,1) labels. A perfect prediction
    gets a positive point inside the target."""
    coords = np.zeros((len(pred), 1, 2), np.float32)
    labels = np.ones((len(pred), 1), np.float32)
    for i, (p, t) in enumerate(zip(pred, target, strict=True)):
        err = p ^ t
        region = err if err.any() else t
        ys, xs = np.nonzero(region)
        j = int(rng.integers(len(ys)))
        coords[i, 0] = (xs[j] + 0.5, ys[j] + 0.5)
        labels[i, 0] = 1.0 if t[ys[j], xs[j]] else 0.0
    return coords, labels


def train_step_loss(
    sam: Sam,
    batch: PretrainBatch,
    rng: np.random.Generator,
    cfg: PretrainConfig,
    focal_weight: float = engine.FOCAL_WEIGHT,
) -> torch.Tensor:
    """Loss of one batch. All prompts of a kind, over all images of the batch, go through the
    decoder in one call: the GT box; 1..k positive points (one k per step; a single point uses
    the multimask outputs); ``correction_rounds`` correction rounds for a ``correction_prob``
    share of the objects, each adding one error-region click to the points so far (with the
    previous logits as the mask prompt for a ``correction_mask_prob`` share of the rounds); box
    + 1..2 points for a ``box_points_prob`` share."""
    device = sam.pixel_mean.device
    with torch.set_grad_enabled(torch.is_grad_enabled() and not cfg.freeze_encoder):
        embeddings = sam.image_encoder(engine.preprocess(sam, batch.images, batch.valid_hw))
    if len(batch.masks) == 0:
        return embeddings.sum() * 0.0
    emb = embeddings[torch.from_numpy(batch.image_index).to(device)]
    tgt = torch.from_numpy(batch.masks).to(device).float()
    boxes = torch.from_numpy(batch.boxes).to(device)

    def loss_of(
        sel: torch.Tensor | slice,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        with_boxes: bool,
        mask_input: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        low, iou = decode_batched(
            sam, emb[sel], points, boxes[sel] if with_boxes else None, mask_input, multimask
        )
        return engine.sam_loss(low, iou, tgt[sel], cfg.mask_loss, focal_weight)

    everyone = slice(None)
    # 1) GT box.
    losses = [loss_of(everyone, None, True, None, False)[0]]
    # 2) 1..k positive points.
    k = int(rng.integers(1, cfg.max_points + 1))
    coords = torch.from_numpy(np.ascontiguousarray(batch.points[:, :k])).to(device)
    labels = torch.ones(coords.shape[:2], device=device)
    loss, picked = loss_of(everyone, (coords, labels), False, None, k == 1)
    losses.append(loss)
    # 3) SAM-style correction rounds: an error-region click each, the previous logits as mask
    # prompt (for a correction_mask_prob share of the rounds).
    sel = np.flatnonzero(rng.random(len(batch.masks)) < cfg.correction_prob)
    if len(sel):
        sel_t = torch.from_numpy(sel).to(device)
        previous, coords_r, labels_r = picked[sel_t], coords[sel_t], labels[sel_t]
        for _ in range(cfg.correction_rounds):
            c2, l2 = correction_points((previous > 0).cpu().numpy(), batch.masks[sel], rng)
            coords_r = torch.cat([coords_r, torch.from_numpy(c2).to(device)], dim=1)
            labels_r = torch.cat([labels_r, torch.from_numpy(l2).to(device)], dim=1)
            mask_in = None  # a draw only when it is a choice: the 1-round recipe is unchanged
            if cfg.correction_mask_prob >= 1.0 or rng.random() < cfg.correction_mask_prob:
                mask_in = F.interpolate(previous[:, None], scale_factor=0.25, mode="bilinear")
            loss, previous = loss_of(sel_t, (coords_r, labels_r), False, mask_in, False)
            losses.append(loss)
    # 4) box + 1..2 positive points.
    sel = np.flatnonzero(rng.random(len(batch.masks)) < cfg.box_points_prob)
    if len(sel):
        kb = int(rng.integers(1, 3))
        sel_t = torch.from_numpy(sel).to(device)
        ptsb = torch.from_numpy(np.ascontiguousarray(batch.box_points[sel, :kb])).to(device)
        labelsb = torch.ones(ptsb.shape[:2], device=device)
        losses.append(loss_of(sel_t, (ptsb, labelsb), True, None, False)[0])
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- the loop


def heldout_metrics(
    sam: Sam, scenes: Sequence[Sample], device: torch.device, model_type: str = MODEL_TYPE
) -> dict:
    """Held-out mIoU (percent) of ``sam`` on ``scenes`` by the evaluation protocol
    (``training.evaluation``, one prompt per object): the GT box (``box_miou``), one positive
    point with the best of SAM's 3 outputs (``point1_miou``: SAM's rule, the predictor's
    ``auto``) and with the single output (``point1_single_miou``); and ``objects``.

    Pretraining's one evaluator call (the monitor at each checkpoint and the final held-out
    score). It scores a copy: ``StableSam`` freezes what it wraps, and the weights in training
    must stay trainable. ``device`` is where ``sam`` is; the copy stays there.
    """
    from stable_sam import StableSam, StableSamPredictor
    from training.evaluation import EvalModel, evaluate, summarize

    frozen = StableSam(copy.deepcopy(sam).to(device), model_type, "pretraining in progress")
    # A new predictor, so no embedding cached from earlier weights is used.
    auto = EvalModel("auto", StableSamPredictor(frozen, multimask_policy="auto"))
    rows = [auto, auto.with_policy("single", "single")]
    scores = evaluate(rows, scenes, ("gt_box", "points_1"), n_prompts=1)

    def miou(row: str, kind: str) -> float:
        value = summarize(scores[row].objects.get(kind, []))["miou"]
        return float("nan") if value is None else 100 * value

    return {
        "box_miou": miou("auto", "gt_box"),
        "point1_miou": miou("auto", "points_1"),
        "point1_single_miou": miou("single", "points_1"),
        "objects": len(scores["auto"].objects.get("gt_box", [])),
    }


def cpu_threads(requested: int) -> int:
    """Torch CPU threads for the next steps. ``requested`` > 0 is used as is; 0 adapts: two
    threads when the machine is idle enough, else one, because OpenMP threads that wait on
    each other on an oversubscribed CPU slow a step down several times (measured here: 0.1
    images/s with 2 threads vs 0.6 with 1 at a load average of 9 on 2 cores)."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    return min(2, cores) if os.getloadavg()[0] < cores + 0.5 else 1


def adopt_saved_start(cfg: PretrainConfig, state_path: Path) -> None:
    """Before a resume: the run's model type and warm-start file are the saved state's. A
    command line that names other ones is refused (``ValueError``, naming both); one that
    leaves ``init_from`` out takes the saved one, so the provenance still names the start."""
    saved = torch.load(state_path, map_location="cpu", weights_only=True).get("config", {})
    saved_type = saved.get("model_type", MODEL_TYPE)
    if cfg.model_type != saved_type:
        raise ValueError(
            f"{state_path} is a {saved_type} run; resume it with --model-type {saved_type} "
            f"(not {cfg.model_type})"
        )
    saved_init = saved.get("init_from")
    if cfg.init_from and saved_init and cfg.init_from != saved_init:
        raise ValueError(f"{state_path} started from {saved_init}, not --init-from {cfg.init_from}")
    cfg.init_from = cfg.init_from or saved_init


def make_optimizer(sam: Sam, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases and positional terms."""
    decay, no_decay = [], []
    for name, p in sam.named_parameters():
        (no_decay if p.ndim < 2 or "pos_embed" in name or "rel_pos" in name else decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.999),
    )


def pretrain(
    cfg: PretrainConfig,
    out: Path,
    state_path: Path,
    resume: bool = False,
    command: str = "",
    device: torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Train (or continue training) the mini SAM; export fp16 weights to ``out``.

    Returns a summary dict: steps, images, train wall time (s), images/s, final loss and the
    held-out metrics of ``heldout_metrics``.
    """
    torch.set_num_threads(cpu_threads(cfg.threads))
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    # Model and optimiser.
    if resume:
        adopt_saved_start(cfg, state_path)
    sam = build_sam(cfg.model_type)
    start: dict[str, str] = {}  # the first run's warm start, recorded in its history entry
    if cfg.init_from and not resume:
        warm_start(sam, Path(cfg.init_from))
        start = {"init_from": cfg.init_from, "init_sha256": file_sha256(cfg.init_from)}
        logger.info("warm start from %s", cfg.init_from)
    sam = sam.to(device)
    opt = make_optimizer(sam, cfg)
    step, elapsed = 0, 0.0
    history: list[dict] = []  # one entry per invocation (run, resumes)
    if resume:
        step, elapsed, history = load_state(state_path, sam, opt, device)
        logger.info("resumed from %s at step %d (%.1f min trained)", state_path, step, elapsed / 60)

    # Data.
    size = sam.image_encoder.img_size
    batches = batch_stream(cfg, size, step)
    monitor = SceneDataset("heldout", n=cfg.monitor_n, size_range=cfg.heldout_size_range)
    use_amp = device.type == "cuda"

    def done() -> bool:
        if cfg.steps is not None:
            return step >= cfg.steps
        return elapsed >= 60.0 * (cfg.minutes or 0.0)

    bar = tqdm(
        total=cfg.steps if cfg.steps is not None else round(60 * (cfg.minutes or 0)),
        initial=step if cfg.steps is not None else round(elapsed),
        unit="step" if cfg.steps is not None else "s",
        disable=not progress,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
        dynamic_ncols=True,
    )
    last_ckpt = elapsed
    images_seen = 0
    run_start_elapsed = elapsed
    history.append(
        {
            "command": command,
            "commit": git_commit(),
            "hardware": hardware_name(),
            "from_step": step,
            "to_step": step,
            "train_min": 0.0,
            **start,
        }
    )

    def checkpoint() -> None:
        history[-1].update(to_step=step, train_min=round((elapsed - run_start_elapsed) / 60, 1))
        save_state(state_path, sam, opt, step, elapsed, cfg, history)
        export_fp16(sam, out, {"step": str(step), "model_type": cfg.model_type})

    # The loop.
    loss_ema = None
    sam.train()
    while not done():
        t0 = time.perf_counter()
        batch = next(batches)
        rng = np.random.default_rng((cfg.seed, step, 1))  # the prompts that depend on the model
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step, elapsed)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = train_step_loss(sam, batch, rng, cfg, focal_weight_at(cfg, step, elapsed))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        engine.clip_and_step(opt, list(sam.parameters()), cfg.grad_clip)
        dt = time.perf_counter() - t0
        elapsed += dt
        step += 1
        images_seen += cfg.batch_size
        loss_v = float(loss.detach())
        loss_ema = loss_v if loss_ema is None else 0.98 * loss_ema + 0.02 * loss_v
        bar.update(1 if cfg.steps is not None else round(elapsed) - bar.n)
        bar.set_postfix(
            refresh=False,
            loss=f"{loss_ema:.3f}",
            lr=f"{opt.param_groups[0]['lr']:.2e}",
            ips=f"{cfg.batch_size / dt:.1f}",
        )
        if step % 25 == 0:
            torch.set_num_threads(cpu_threads(cfg.threads))
            logger.info(
                "step %d loss %.4f (ema %.4f) lr %.2e focal w %.1f %.2f img/s elapsed %.1f min threads %d",
                step,
                loss_v,
                loss_ema,
                opt.param_groups[0]["lr"],
                focal_weight_at(cfg, step, elapsed),
                cfg.batch_size / dt,
                elapsed / 60,
                torch.get_num_threads(),
            )
        # Checkpoint (and the monitor scenes' score) every ``ckpt_minutes`` of training.
        if elapsed - last_ckpt >= 60.0 * cfg.ckpt_minutes:
            last_ckpt = elapsed
            checkpoint()
            metrics = heldout_metrics(sam, monitor, device, cfg.model_type)
            sam.train()
            logger.info(
                "checkpoint step %d: monitor (%d held-out imgs) %s", step, cfg.monitor_n, metrics
            )
    bar.close()
    checkpoint()
    run_time = elapsed - run_start_elapsed
    summary = {
        "steps": step,
        "images": step * cfg.batch_size,
        "train_wall_s": round(elapsed, 1),
        "images_per_s_this_run": round(images_seen / run_time, 2) if run_time > 0 else None,
        "final_loss_ema": loss_ema,
        "history": history,
    }
    # Held-out metrics of the exported fp16 weights, exactly as shipped.
    shipped = build_sam(cfg.model_type, out).to(device)
    scenes = SceneDataset("heldout", n=cfg.heldout_n, size_range=cfg.heldout_size_range)
    summary["heldout"] = heldout_metrics(shipped, scenes, device, cfg.model_type)
    return summary
