"""Pretrain the ``mini`` SAM from scratch on synthetic scenes, the way SAM was trained.

All of SAM trains (image encoder, prompt encoder, mask decoder) with clean prompts only: the GT
box, 1..k positive points sampled from the mask, box + points, and one SAM-style correction
round (a point from the error region plus the previous low-res logits as the mask prompt).
Single-point prompts use the three multimask outputs and back-propagate the best one (SAM §3).
Loss: 20 * focal + dice on the masks, plus MSE between predicted and actual IoU (SAM §A).
Optimiser: AdamW with linear warmup then cosine decay. Images: LSJ-style scale jitter around
the 256 px input, random crop or bottom-right padding, horizontal flips.

The model never sees poor prompts (noisy boxes, coarse masks); its weakness on them is SAM's,
not put in on purpose.

    python -m training.pretrain --out stable_sam/weights/sam_mini.safetensors --seed 0 --minutes 50

A checkpoint with the full training state is written every ``--ckpt-minutes`` next to
``--state`` (default ``.cache/pretrain/state.pt``) together with the fp16 export at ``--out``,
so an interrupted run leaves a usable model; ``--resume`` continues from the state file.
With ``--minutes`` the learning-rate schedule runs on training wall time (so it fits a time
budget); with ``--steps`` it runs on steps (reproducible across machines).

The package: ``config`` (hyper-parameters), ``data`` (scenes -> jittered, prompted batches),
``schedule`` (learning rate, focal weight), ``loop`` (the step loss, the loop, and the held-out
score through ``training.evaluation``), ``checkpoint`` (fp16 export, training state, resume),
``provenance`` (machine, commit, the PROVENANCE.md record) and ``__main__`` (the CLI).
"""
