"""Fused QKV split + bias + RoPE: the reference against an explicit split, its backward, and its
dispatch on CPU."""

import pytest
import torch

from megatron_jp.ops.qkv_rope import (QkvRopeFunction, qkv_rope, qkv_rope_backward_op,
                                      qkv_rope_backward_reference, qkv_rope_op, qkv_rope_reference)
from megatron_jp.ops.rope import rope_reference

B, S, HQ, HK, D = 3, 37, 8, 2, 16


def make_inputs(dtype=torch.float32, bias=True, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, S, (HQ + 2 * HK) * D, generator=gen).to(dtype).requires_grad_(requires_grad)
    b = torch.randn((HQ + 2 * HK) * D, generator=gen).to(dtype).requires_grad_(requires_grad) if bias else None
    positions = torch.cat((torch.arange(20), torch.arange(17))).expand(B, S)  # two packed documents
    return qkv, b, positions


def explicit_split(qkv, bias, positions, theta):
    """Head by head: q head h is columns [h*D, (h+1)*D), k heads follow all q heads, v heads all k heads;
    each head of q and k is rotated on its own."""
    x = qkv if bias is None else qkv + bias
    def head(i):
        return x[:, :, i * D:(i + 1) * D]  # (B, S, D)
    def rotate(h):
        return h if positions is None else rope_reference(h[:, :, None], h[:, :, None], positions, theta)[0][:, :, 0]
    q = torch.stack([rotate(head(h)) for h in range(HQ)], dim=1)
    k = torch.stack([rotate(head(HQ + h)) for h in range(HK)], dim=1)
    v = torch.stack([head(HQ + HK + h) for h in range(HK)], dim=1)
    return q, k, v


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("rotary", [True, False])
def test_qkv_rope_reference_matches_an_explicit_split(with_bias, rotary):
    qkv, bias, positions = make_inputs(bias=with_bias)
    positions = positions if rotary else None
    got = qkv_rope_reference(qkv, bias, positions, 10000.0, HQ, HK, D)
    for g, w, heads in zip(got, explicit_split(qkv, bias, positions, 10000.0), (HQ, HK, HK)):
        assert g.shape == (B, heads, S, D)
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_qkv_rope_backward_reference_matches_autograd_of_the_reference():
    qkv, bias, positions = make_inputs(requires_grad=True)
    outputs = qkv_rope_reference(qkv, bias, positions, 10000.0, HQ, HK, D)
    grads = [torch.randn_like(o) for o in outputs]
    want_qkv, want_bias = torch.autograd.grad(outputs, (qkv, bias), grads)
    got_qkv = qkv_rope_backward_reference(*grads, positions, 10000.0)
    # q and k gradients: the same fp32 rotation by -angle, rounded in a different order
    torch.testing.assert_close(got_qkv, want_qkv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_qkv.sum(dim=(0, 1)), want_bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_rope_on_cpu_is_the_reference_bit_for_bit(dtype):
    qkv, bias, positions = make_inputs(dtype)
    got = qkv_rope(qkv, bias, positions, 10000.0, HQ, HK, D)
    for g, w in zip(got, qkv_rope_reference(qkv, bias, positions, 10000.0, HQ, HK, D)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("entry", ["function", "custom_op"])
def test_qkv_rope_autograd_entries_fall_back_to_the_reference_on_cpu(entry):
    qkv, bias, positions = make_inputs(requires_grad=True)
    call = QkvRopeFunction.apply if entry == "function" else qkv_rope_op
    got = call(qkv, bias, positions, 10000.0, HQ, HK, D)
    want = qkv_rope_reference(qkv, bias, positions, 10000.0, HQ, HK, D)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    upstream = [torch.randn_like(w) for w in want]
    for g, w in zip(torch.autograd.grad(got, (qkv, bias), upstream), torch.autograd.grad(want, (qkv, bias), upstream)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)  # same rotation, different rounding order


@pytest.mark.parametrize("entry", ["function", "custom_op"])
@pytest.mark.parametrize("rotary", [True, False])
def test_qkv_rope_autograd_entries_pass_gradcheck_in_float64(entry, rotary):
    gen = torch.Generator().manual_seed(3)
    hq, hk, d = 2, 1, 4
    qkv = torch.randn(2, 3, (hq + 2 * hk) * d, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn((hq + 2 * hk) * d, generator=gen, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[0, 1, 0], [5, 6, 7]]) if rotary else None
    call = QkvRopeFunction.apply if entry == "function" else qkv_rope_op
    # With rotary the reference rotates in fp32; a rotation is linear, so a large eps still gives the
    # exact derivative and only fp32 rounding (~1e-7) / eps (1e-2) is left. Without it, all is float64.
    eps, atol = (1e-2, 1e-4) if rotary else (1e-6, 1e-5)
    assert torch.autograd.gradcheck(lambda x, b: call(x, b, positions, 100.0, hq, hk, d), (qkv, bias),
                                    eps=eps, atol=atol)


@pytest.mark.parametrize("token_major", [False, True], ids=["head_major", "token_major"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_qkv_rope_custom_ops_pass_opcheck(with_bias, token_major):
    qkv, bias, positions = make_inputs(bias=with_bias, requires_grad=True)
    torch.library.opcheck(qkv_rope_op, (qkv, bias, positions, 10000.0, HQ, HK, D, token_major))
    grads = [torch.randn((B, S, h, D) if token_major else (B, h, S, D)) for h in (HQ, HK, HK)]
    torch.library.opcheck(qkv_rope_backward_op, (*grads, positions, 10000.0, token_major))


@pytest.mark.parametrize("with_bias", [True, False])
def test_qkv_rope_token_major_is_the_head_major_layout_transposed_forward_and_backward(with_bias):
    """What varlen_attn takes, (B, S, H, D), holds the same values, and its gradients come back the same."""
    qkv, bias, positions = make_inputs(bias=with_bias, requires_grad=True)
    head_major = qkv_rope_reference(qkv, bias, positions, 10000.0, HQ, HK, D)
    token_major = QkvRopeFunction.apply(qkv, bias, positions, 10000.0, HQ, HK, D, True)
    for h, t in zip(head_major, token_major):
        torch.testing.assert_close(t, h.transpose(1, 2), rtol=0, atol=0)
    grads = [torch.randn_like(h) for h in head_major]
    inputs = (qkv,) if bias is None else (qkv, bias)
    want = torch.autograd.grad(head_major, inputs, grads)
    got = torch.autograd.grad(token_major, inputs, [g.transpose(1, 2) for g in grads])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_qkv_rope_custom_op_compiles_in_one_graph_with_its_backward():
    qkv, bias, positions = make_inputs(requires_grad=True)

    def loss(qkv, bias):
        q, k, v = qkv_rope_op(qkv, bias, positions, 10000.0, HQ, HK, D)
        return (q.square().sum() + (k * v).sum())

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    got = torch.autograd.grad(compiled(qkv, bias), (qkv, bias))
    want = torch.autograd.grad(loss(qkv, bias), (qkv, bias))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_kernel_slower_than_its_compiled_reference_stops_being_the_default():
    """bench/fused_kernels.py's figures feed ops.kernel_is_default: unmeasured kernels stay the default,
    measured ones need MIN_SPEEDUP over torch.compile of their reference."""
    from megatron_jp.ops import KERNEL_SPEEDUP_VS_COMPILED, MIN_SPEEDUP, kernel_is_default

    assert set(KERNEL_SPEEDUP_VS_COMPILED) == {"rope", "qkv_rope", "glu"}
    assert kernel_is_default("glu", {"glu": None}) and kernel_is_default("glu", {"glu": MIN_SPEEDUP})
    assert not kernel_is_default("glu", {"glu": MIN_SPEEDUP - 0.01})
    assert kernel_is_default("rope", {"glu": 0.5})  # another kernel's figure says nothing of this one
