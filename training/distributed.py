"""Data-parallel training over processes started by ``torchrun`` (PyTorch DDP).

``torchrun --nproc_per_node=N -m training.train ...`` starts N processes with ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` set; ``start`` joins them into one process group (NCCL on CUDA, one
GPU per ``LOCAL_RANK``; gloo on CPU). Each step of ``training.engine.fit`` then gives every
rank its own share of the step's images (``Ranks.shard``): the rank loads, augments and encodes
only those (frozen encoder, no gradients), decodes their prompts and DistributedDataParallel
averages the plugins' gradients. The randomness of every image is its own (seeded by run, step
and position), so N processes compute what one process computes with the same total batch.
A plain ``python -m training.train`` is a world of one: nothing here changes it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``world`` processes, this one ``rank``."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The rank that logs, reports progress and writes the output file."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's positions among a step's ``n`` images: a contiguous block, one longer on
        the first ``n % world`` ranks, empty on some when ``n < world``. Contiguous because an
        image's occlusion donor is the step's next image: a block loads one image past itself,
        where every ``world``-th position would load twice its share."""
        size, longer = divmod(n, self.world)
        first = self.rank * size + min(self.rank, longer)
        return range(first, first + size + (self.rank < longer))

    def sum(self, value: float, device: torch.device | str) -> float:
        """``value`` summed over every rank (itself in a world of one)."""
        if not self.distributed:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return float(total.item())


def from_env() -> Ranks:
    """The ranks ``torchrun`` set in the environment (a world of one without it)."""
    return Ranks(
        world=int(os.environ.get("WORLD_SIZE", "1")),
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def start(device: str | None) -> tuple[Ranks, str | None]:
    """Join the process group when started by ``torchrun``; returns the ranks and the device
    this rank trains on (``cuda:LOCAL_RANK`` on a GPU host unless ``device`` says otherwise)."""
    ranks = from_env()
    if not ranks.distributed:
        return ranks, device
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(ranks.local_rank)
        device = f"cuda:{ranks.local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return ranks, device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class AdapterMasks(NamedTuple):
    """PA-SAM's masks beside the served ones, for its loss (``training.baselines``)."""

    sam_logits: Tensor  # (B, 1, S/4, S/4) M_SAM: SAM's mask with the adapter's residuals
    uncertainty_logits: Tensor  # (B, 1, S/4, S/4) logits of M_U


class DecodeStep(nn.Module):
    """The trained part of one decoder pass, as the module DDP wraps.

    Registers only ``trained`` (the plugins, the mask decoder for DT-SAM, PA-SAM's prompt
    adapter, ...), so DDP
    broadcasts and synchronises those and not the frozen encoder. Under DDP (``wrap``) every
    trainable parameter takes part in every forward (``0 * sum``), so a rank whose images have
    no prompt, or a parameter the loss does not reach (DT-SAM's IoU head), still joins the
    all-reduce; in one process that sum is not computed.
    """

    def __init__(self, model: nn.Module, trained: Sequence[nn.Module]) -> None:
        super().__init__()
        self.trained = nn.ModuleList(trained)
        self._model = [model]  # not a submodule: DDP must not own the frozen base
        self.touch_all = False  # set by ``wrap`` for DDP

    def forward(
        self,
        embedding: Tensor | None,
        prompts: Sequence[tuple[Tensor, Tensor]] = (),
        vit_features: Tensor | tuple[Tensor, ...] | None = None,
        detail: Tensor | None = None,
        noise_seed: int | None = None,
    ) -> Tensor | tuple[Tensor, AdapterMasks | None]:
        """One image's low-res logits (B, 1, S/4, S/4) for each (sparse, dense) prompt group,
        concatenated, and PA-SAM's ``AdapterMasks`` of them (``None`` for other models): one
        forward per backward, as DDP requires. ``embedding=None``: a zero loss (a scalar).
        ``vit_features``: HQ-SAM's early ViT features (``StableSam.encode_backbone``), fused
        here, inside the step, since HQ-SAM trains the fusion; SAM 2's high-resolution features,
        passed on as they are. ``detail``: PA-SAM's detail tensor of the image; ``noise_seed``
        seeds its Gumbel noise for this image, so that any number of ranks draws what one
        process draws."""
        touch = torch.zeros(())
        if self.touch_all:
            touch = sum((p.sum() for p in self.parameters() if p.requires_grad), touch) * 0.0
        if embedding is None:  # nothing to decode on this rank this step
            return touch
        model = self._model[0]
        masks = None
        if model.prompt_adapter is None:
            hq = model.decoder_features(embedding, vit_features)
            logits = torch.cat([model.decode(embedding, s, d, False, hq)[0] for s, d in prompts])
        else:
            generator = None if noise_seed is None else torch.Generator().manual_seed(noise_seed)
            outs = [
                model.decode_prompt_adapter(embedding, s, d, False, detail, generator)
                for s, d in prompts
            ]
            logits = torch.cat([o.masks for o in outs])
            masks = AdapterMasks(
                torch.cat([o.sam_masks for o in outs]),
                torch.cat([o.uncertainty_logits for o in outs]),
            )
        if self.touch_all:
            logits = logits + touch.to(logits.device)
        return logits, masks


def wrap(step: DecodeStep, ranks: Ranks, device: torch.device) -> nn.Module:
    """``step`` in DistributedDataParallel (itself in a world of one)."""
    if not ranks.distributed:
        return step
    step.touch_all = True
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(step, device_ids=device_ids, broadcast_buffers=False)
