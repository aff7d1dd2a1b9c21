"""varlen and compiled flex attention on CUDA against the dense-mask SDPA oracle, forward and
backward, on packed layouts (tests/unit/test_attention_masks.py holds the layouts themselves to their
definitions on CPU). bf16 kernels against an fp32 oracle: differences of a few bf16 ulps of O(1)
outputs, 2e-2 absolute; gradients likewise, relative to their scale."""

import pytest
import torch

from megatron_jp.models import attention
from megatron_jp.models.attention import VarlenLayout, attend, block_mask, dense_mask, varlen_boundaries
from megatron_jp.parallel.testing import packed_segments

pytestmark = pytest.mark.gpu


def inputs(B, S, heads, kv_heads, D, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda h: torch.randn(B, h, S, D, device="cuda", generator=gen).to(dtype).requires_grad_()  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def outputs_and_grads(q, k, v, mask, grad):
    out = attend(q, k, v, mask)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def oracle(q, k, v, seg, S, window, grad):
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    return outputs_and_grads(q32, k32, v32, dense_mask(seg, S, window, "cuda"), grad.float())


def assert_near(got, want):
    for g, w in zip(got, want):
        assert (g.float() - w).abs().max() <= 2e-2 * max(1.0, w.abs().max().item())


@pytest.mark.parametrize("window", [0, 128])
@pytest.mark.parametrize("kernel", ["varlen", "flex"])
def test_packed_attention_kernels_match_dense_masked_sdpa(kernel, window):
    if kernel == "varlen" and attention.varlen_attn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    B, S = 3, 1000
    seg = packed_segments(torch.Generator().manual_seed(window), B, S).cuda()
    q, k, v = inputs(B, S, 8, 4, 64, torch.bfloat16, seed=1)
    grad = torch.randn(B, S, 8, 64, device="cuda").to(torch.bfloat16)
    mask = (VarlenLayout(varlen_boundaries(seg).cuda(), S, window) if kernel == "varlen"
            else block_mask(seg, S, window, torch.device("cuda")))
    assert_near(outputs_and_grads(q, k, v, mask, grad), oracle(q, k, v, seg, S, window, grad))


def test_auto_picks_a_maskless_kernel_on_cuda():
    assert attention.resolve_backend("auto", torch.device("cuda")) in ("varlen", "flex")
