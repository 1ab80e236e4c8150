"""Specification of the fast forms of SAM layers (stable_sam/modeling/fast_ops.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from stable_sam import StableSam, build_sam
from stable_sam.modeling.fast_ops import PatchConvTranspose2d, use_patch_transposed_convs


@pytest.mark.parametrize("kernel", [2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_patch_transposed_conv_equals_pytorchs_in_values_and_gradients(kernel, bias) -> None:
    torch.manual_seed(0)
    reference = nn.ConvTranspose2d(6, 5, kernel_size=kernel, stride=kernel, bias=bias)
    fast = copy.deepcopy(reference)
    assert use_patch_transposed_convs(fast) == 1 and isinstance(fast, PatchConvTranspose2d)
    x = torch.randn(2, 6, 7, 3, requires_grad=True)
    x_fast = x.detach().clone().requires_grad_(True)
    expected, got = reference(x), fast(x_fast)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    expected.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(x_fast.grad, x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.weight.grad, reference.weight.grad, atol=1e-4, rtol=1e-4)


def test_only_patch_shaped_transposed_convs_are_converted() -> None:
    layers = nn.Sequential(
        nn.ConvTranspose2d(4, 4, kernel_size=3, stride=2, padding=1),
        nn.ConvTranspose2d(4, 4, kernel_size=2, stride=1),
        nn.ConvTranspose2d(4, 4, kernel_size=2, stride=2, groups=2),
        nn.ConvTranspose2d(4, 4, kernel_size=2, stride=2),
    )
    assert use_patch_transposed_convs(layers) == 1
    assert [type(m) for m in layers] == [nn.ConvTranspose2d] * 3 + [PatchConvTranspose2d]


@pytest.mark.parametrize("model_type", ["mini", "hq_mini"])
def test_stable_sams_decoder_equals_the_untouched_sam_decoder(model_type) -> None:
    torch.manual_seed(0)
    sam = build_sam(model_type)
    original = copy.deepcopy(sam)
    keys = set(sam.state_dict())
    model = StableSam(sam, model_type, "x", None)
    converted = [m for m in model.sam.mask_decoder.modules() if type(m) is PatchConvTranspose2d]
    assert len(converted) >= 2 and set(model.sam.state_dict()) == keys
    embedding = torch.randn(1, 256, 16, 16)
    boxes = torch.tensor([[10.0, 20, 200, 180]])
    extra = {}
    if model_type.startswith("hq_"):
        extra = {"hq_token_only": False, "interm_embeddings": [torch.randn(1, 16, 16, 192)]}
    with torch.no_grad():
        outputs = []
        for s in (original, model.sam):
            sparse, dense = s.prompt_encoder(points=None, boxes=boxes, masks=None)
            outputs.append(
                s.mask_decoder(
                    image_embeddings=embedding,
                    image_pe=s.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=True,
                    **extra,
                )
            )
    for a, b in zip(outputs[0], outputs[1], strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
