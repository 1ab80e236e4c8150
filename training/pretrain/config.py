"""The hyper-parameters of one pretraining run."""

from __future__ import annotations

from dataclasses import dataclass, field

MODEL_TYPE = "mini"  # the default; ``PretrainConfig.model_type`` picks another
# What pretraining trains: the project's own ViT minis (``stable_sam.build.ENCODER_SPECS``).
PRETRAIN_TYPES = ("mini", "mini_512")


@dataclass
class PretrainConfig:
    """Hyper-parameters of one pretraining run (saved in the checkpoint and PROVENANCE)."""

    seed: int = 0
    model_type: str = MODEL_TYPE  # one of PRETRAIN_TYPES: "mini" (256 px) or "mini_512"
    # A SAM file to start from instead of random weights, possibly of another input size (a
    # ``mini`` file for ``mini_512``: position tables resized, ``checkpoint.warm_start``).
    init_from: str | None = None
    minutes: float | None = 50.0  # training wall-time budget (None: use ``steps``)
    steps: int | None = None  # step budget (overrides ``minutes`` for the schedule)
    batch_size: int = 2  # images per step
    objects_per_image: int = 6  # prompted objects per image and prompt group
    max_points: int = 5  # positive points per point prompt: 1..max_points
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 30
    min_lr_ratio: float = 0.05
    scale_range: tuple[float, float] = (0.6, 1.5)  # LSJ-style jitter of the input's long side
    train_size_range: tuple[int, int] = (256, 640)  # scene sides (px) before resizing
    correction_prob: float = 0.3  # chance of SAM-style correction rounds on point prompts
    # Rounds of one error-region click each (SAM: 8, plus 2 without a new click); 1 is the
    # shipped bases' recipe.
    correction_rounds: int = 1
    # Chance, per round, that the previous logits go in as the mask prompt too (SAM: always).
    # The served Stable-SAM decodes later clicks without them (REFINE_MASKS=auto), so a base
    # meant for it sees both.
    correction_mask_prob: float = 1.0
    # Train the prompt encoder and mask decoder only, the image encoder frozen (a decoder
    # fine-tune: about twice the images per second at 512 px on a CPU).
    freeze_encoder: bool = False
    box_points_prob: float = 0.3  # chance of a box + points round
    grad_clip: float = 1.0
    mask_loss: str = "focal_dice"  # "focal_dice": 20 x focal + dice (SAM); "bce_dice": BCE + dice
    # Fraction of the budget over which the focal weight ramps from 0 to SAM's 20 (see
    # ``schedule.focal_weight_at``); 0 starts at 20 right away.
    focal_ramp: float = 0.4
    heldout_n: int = 100
    heldout_size_range: tuple[int, int] = (256, 1024)
    ckpt_minutes: float = 5.0
    monitor_n: int = 16  # held-out images scored at each checkpoint
    threads: int = 0  # torch CPU threads; 0 = adapt to the load average (see ``cpu_threads``)
    workers: int = 0  # data-loader processes rendering scenes (0: render in the training process)
    # Share of training images that are real-picture composites (training.composites, their
    # Debian packages installed: python -m training.real_pictures --install) instead of
    # synthetic scenes; 0 keeps the synthetic-only recipe of the shipped base.
    composite_fraction: float = 0.0
    composite_catalogue: str | None = None  # None: training.real_pictures' shipped catalogue
    extra: dict = field(default_factory=dict)
