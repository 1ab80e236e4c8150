"""The pretraining schedule: learning rate and focal-loss weight over the step or time budget."""

from __future__ import annotations

import math

from training.engine import FOCAL_WEIGHT
from training.pretrain.config import PretrainConfig


def budget_fraction(cfg: PretrainConfig, step: int, elapsed_s: float) -> float:
    """How much of the step or wall-time budget is spent, in [0, 1]."""
    if cfg.steps is not None:
        frac = step / max(1, cfg.steps)
    else:
        frac = elapsed_s / (60.0 * (cfg.minutes or 1.0))
    return min(1.0, max(0.0, frac))


def focal_weight_at(cfg: PretrainConfig, step: int, elapsed_s: float) -> float:
    """The focal-loss weight: ramps linearly from 0 to SAM's 20 over ``focal_ramp`` of the
    budget. From scratch and with a short budget, 20 x focal from the first step drives the
    decoder to a constant low logit (the focal optimum for empty masks) and it stays there for
    hundreds of steps: measured on one scene, box IoU stayed 0 after 40 decoder steps with
    20:1, while dice alone reached IoU 0.7 in 30. Dice first teaches localization; focal then
    calibrates, as in SAM."""
    if cfg.focal_ramp <= 0:
        return FOCAL_WEIGHT
    return FOCAL_WEIGHT * min(1.0, budget_fraction(cfg, step, elapsed_s) / cfg.focal_ramp)


def lr_at(cfg: PretrainConfig, step: int, elapsed_s: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` over the
    step budget (``steps``) or the wall-time budget (``minutes``)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.steps is not None:
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    else:
        frac = elapsed_s / (60.0 * (cfg.minutes or 1.0))
    frac = min(1.0, max(0.0, frac))
    cos = 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)
