"""The fused QKV split + bias + RoPE kernels against the reference: GQA, bias, packed positions,
no rotary, forward and backward (q, k, v and the bias gradient)."""

import pytest
import torch
from kernel_checks import tolerance

from megatron_jp.ops import qkv_rope as qkv_module
from megatron_jp.ops.qkv_rope import QkvRopeFunction, qkv_rope, qkv_rope_reference

B, S = 3, 37


def make(hq, hk, head_dim, dtype, with_bias, rotary, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    width = (hq + 2 * hk) * head_dim
    qkv = torch.randn(B, S, width, device="cuda", generator=gen).to(dtype)
    bias = torch.randn(width, device="cuda", generator=gen).to(dtype) if with_bias else None
    positions = (torch.arange(B * S, device="cuda") % 37).reshape(B, S)
    positions = torch.where(positions < 20, positions, positions - 20) if rotary else None  # 2 documents a row
    return qkv, bias, positions


def check_forward_and_backward(qkv, bias, positions, hq, hk, head_dim, theta=10000.0, token_major=False):
    qkv = qkv.detach().requires_grad_(True)
    bias = None if bias is None else bias.detach().requires_grad_(True)
    got = QkvRopeFunction.apply(qkv, bias, positions, theta, hq, hk, head_dim, token_major)
    qkv32 = qkv.detach().float().requires_grad_(True)
    bias32 = None if bias is None else bias.detach().float().requires_grad_(True)
    want = qkv_rope_reference(qkv32, bias32, positions, theta, hq, hk, head_dim, token_major)
    tol = tolerance(qkv.dtype)
    for g, w in zip(got, want):
        assert g.dtype == qkv.dtype and g.shape == w.shape
        torch.testing.assert_close(g.float(), w, **tol)
    grads = [torch.randn_like(g) for g in got]
    inputs, inputs32 = (qkv,) if bias is None else (qkv, bias), (qkv32,) if bias is None else (qkv32, bias32)
    got_grads = torch.autograd.grad(got, inputs, grads)
    want_grads = torch.autograd.grad(want, inputs32, [g.float() for g in grads])
    torch.testing.assert_close(got_grads[0].float(), want_grads[0], **tol)
    if bias is not None:
        # the bias gradient is torch's sum of the kernel's grad_qkv over the 111 tokens (fp32
        # accumulation, one rounding): checked against that sum, the kernel part being checked above
        own_sum = got_grads[0].float().sum(dim=(0, 1))
        torch.testing.assert_close(got_grads[1].float(), own_sum, rtol=2 * tol["rtol"], atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("hq, hk", [(5, 5), (8, 2)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_qkv_rope_kernel_matches_reference(built, with_bias, hq, hk, head_dim, dtype):
    built(qkv_module)
    qkv, bias, positions = make(hq, hk, head_dim, dtype, with_bias, rotary=True)
    check_forward_and_backward(qkv, bias, positions, hq, hk, head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq, hk", [(5, 5), (8, 2), (8, 1)])
def test_qkv_rope_kernel_writes_token_major_q_k_v_for_varlen(built, hq, hk, dtype):
    built(qkv_module)
    qkv, bias, positions = make(hq, hk, 64, dtype, with_bias=True, rotary=True, seed=4)
    check_forward_and_backward(qkv, bias, positions, hq, hk, 64, token_major=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_qkv_rope_kernel_without_positions_is_an_exact_split(built, with_bias, dtype):
    built(qkv_module)
    qkv, bias, _ = make(8, 2, 64, dtype, with_bias, rotary=False, seed=1)
    check_forward_and_backward(qkv, bias, None, 8, 2, 64)
    if not with_bias:  # a pure copy: bit-exact
        for g, w in zip(qkv_rope(qkv, None, None, 0.0, 8, 2, 64), qkv_rope_reference(qkv, None, None, 0.0, 8, 2, 64)):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_rope_kernel_scalar_path_handles_head_dim_72(built, dtype):
    built(qkv_module)
    qkv, bias, positions = make(5, 1, 72, dtype, with_bias=True, rotary=True, seed=2)  # 36 % 8 != 0
    check_forward_and_backward(qkv, bias, positions, 5, 1, 72)


def test_qkv_rope_kernel_matches_reference_at_positions_up_to_16k(built):
    built(qkv_module)
    qkv, bias, _ = make(8, 2, 64, torch.float32, with_bias=False, rotary=False, seed=3)
    positions = torch.randint(0, 16384, (B, S), device="cuda")
    check_forward_and_backward(qkv, bias, positions, 8, 2, 64, theta=160000.0)


def test_qkv_rope_compiles_to_one_graph_holding_the_custom_op(built):
    built(qkv_module)
    qkv, bias, positions = make(8, 2, 64, torch.bfloat16, with_bias=True, rotary=True)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(qkv_rope, backend=record, fullgraph=True)
    got = compiled(qkv, bias, positions, 10000.0, 8, 2, 64)
    assert len(graphs) == 1 and "megatron_jp.qkv_rope" in graphs[0]
    for g, w in zip(got, qkv_rope(qkv, bias, positions, 10000.0, 8, 2, 64)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)  # the same kernel either way
