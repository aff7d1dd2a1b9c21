"""The encoder gives the same loss and gradients with the fused kernels as with the references."""

import pytest
import torch

from megatron_jp.models.config import preset
from megatron_jp.models.encoder import build_encoder, masked_lm_loss
from megatron_jp.ops import glu as glu_module
from megatron_jp.ops import qkv_rope as qkv_module
from megatron_jp.ops import rope as rope_module

OP_MODULES = (rope_module, glu_module, qkv_module)


def loss_and_grads(model, ids, labels, segments):
    loss = masked_lm_loss(model(ids, labels=labels, segment_ids=segments))
    return loss, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("name, overrides", [
    ("tiny", dict(qkv_bias=True)),  # qkv_rope with bias, GQA 4/2, SwiGLU
    ("tiny-modernbert", {}),        # qkv_rope without bias, two thetas, GeGLU
])
def test_encoder_with_kernels_matches_encoder_with_references(built, monkeypatch, name, overrides):
    for module in OP_MODULES:
        built(module)
    cfg = preset(name, vocab_size=211, **overrides)
    model = build_encoder(cfg, seed=0, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(5, 211, (3, 64), device="cuda", generator=gen)
    labels = torch.where(torch.rand(ids.shape, device="cuda", generator=gen) < 0.3, ids, -100)
    segments = (torch.arange(64, device="cuda") >= 40).long().expand(3, 64)  # two documents a row
    loss_kernels, grads_kernels = loss_and_grads(model, ids, labels, segments)
    for module in OP_MODULES:
        monkeypatch.setattr(module, "_EXT", None)  # the dispatch now takes the references
    loss_reference, grads_reference = loss_and_grads(model, ids, labels, segments)
    # fp32 throughout: each op differs from its reference by <= 2e-5 (tests/gpu/test_*_kernel.py);
    # through 4-6 layers, attention and the loss that stays within 1e-4 relative
    torch.testing.assert_close(loss_kernels, loss_reference, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads_kernels, grads_reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
