"""The RoPE kernel against the reference on odd shapes, both layouts, GQA, packed positions."""

import pytest
import torch
from kernel_checks import tolerance

from megatron_jp.ops import rope as rope_module
from megatron_jp.ops.rope import RopeFunction, apply_rope, rope_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def packed_positions(lead_shape, device, large=False):
    """Packed documents restarting at 0 (lengths 20, 17, ...); `large`: random positions < 16384."""
    tokens = torch.Size(lead_shape).numel()
    if large:
        return torch.randint(0, 16384, lead_shape, device=device)
    starts = torch.arange(tokens, device=device) % 37
    return torch.where(starts < 20, starts, starts - 20).reshape(lead_shape)


def make(lead_shape, hq, hk, head_dim, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(*lead_shape, hq, head_dim, device="cuda", generator=gen).to(dtype)
    k = torch.randn(*lead_shape, hk, head_dim, device="cuda", generator=gen).to(dtype)
    return q, k


def check_forward_and_backward(q, k, positions, theta):
    """RopeFunction on CUDA (the kernel) against the fp32 reference on upcast inputs, both passes."""
    q = q.detach().requires_grad_(True)
    k = k.detach().requires_grad_(True)
    got_q, got_k = RopeFunction.apply(q, k, positions, theta)
    q32, k32 = q.detach().float().requires_grad_(True), k.detach().float().requires_grad_(True)
    want_q, want_k = rope_reference(q32, k32, positions, theta)
    tol = tolerance(q.dtype)
    torch.testing.assert_close(got_q.float(), want_q, **tol)
    torch.testing.assert_close(got_k.float(), want_k, **tol)
    grad_q, grad_k = torch.randn_like(got_q), torch.randn_like(got_k)
    got_grads = torch.autograd.grad((got_q, got_k), (q, k), (grad_q, grad_k))
    want_grads = torch.autograd.grad((want_q, want_k), (q32, k32), (grad_q.float(), grad_k.float()))
    for got, want in zip(got_grads, want_grads):
        assert got.dtype == q.dtype
        torch.testing.assert_close(got.float(), want, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("hq, hk", [(5, 5), (8, 2)])
@pytest.mark.parametrize("lead_shape", [(3, 37), (111,)], ids=["batch_seq", "tokens"])
def test_rope_kernel_matches_reference(built, lead_shape, hq, hk, head_dim, dtype):
    built(rope_module)
    q, k = make(lead_shape, hq, hk, head_dim, dtype)
    check_forward_and_backward(q, k, packed_positions(lead_shape, "cuda"), 10000.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("theta", [10000.0, 160000.0])
def test_rope_kernel_matches_reference_at_positions_up_to_16k(built, theta, dtype):
    built(rope_module)
    q, k = make((3, 37), 8, 2, 64, dtype, seed=1)
    check_forward_and_backward(q, k, packed_positions((3, 37), "cuda", large=True), theta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_reads_q_and_k_split_off_a_fused_projection(built, dtype):
    built(rope_module)
    gen = torch.Generator(device="cuda").manual_seed(2)
    fused = torch.randn(3, 37, 8 + 2 * 2, 64, device="cuda", generator=gen).to(dtype)
    q, k, _ = fused.split([8, 2, 2], dim=2)  # strided views: token stride 12 heads
    assert not q.is_contiguous()
    check_forward_and_backward(q, k, packed_positions((3, 37), "cuda"), 10000.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_scalar_path_handles_unaligned_rows(built, dtype):
    built(rope_module)
    gen = torch.Generator(device="cuda").manual_seed(3)
    # head_dim 72: half 36 is not a multiple of the 16-byte vector (8 bf16) -> the scalar kernel
    q, k = make((3, 37), 5, 1, 72, dtype, seed=3)
    check_forward_and_backward(q, k, packed_positions((3, 37), "cuda"), 10000.0)
    # a base pointer one element off 16-byte alignment -> the scalar kernel too
    buffer = torch.randn(3 * 37 * 5 * 64 + 1, device="cuda", generator=gen).to(dtype)
    q_off = buffer[1:].view(3, 37, 5, 64)
    check_forward_and_backward(q_off, q_off.clone(), packed_positions((3, 37), "cuda"), 10000.0)


def test_apply_rope_uses_the_kernel_on_cuda(built, monkeypatch):
    built(rope_module)
    q, k = make((3, 37), 8, 2, 64, torch.bfloat16)
    calls = []
    real = rope_module._EXT.rope
    monkeypatch.setattr(rope_module, "_EXT", type("Spy", (), {"rope": lambda *a: calls.append(1) or real(*a)}))
    apply_rope(q, k, packed_positions((3, 37), "cuda"), 10000.0)
    assert calls == [1]


def test_apply_rope_compiles_to_one_graph_holding_the_custom_op(built):
    built(rope_module)
    q, k = make((3, 37), 8, 2, 64, torch.bfloat16)
    positions = packed_positions((3, 37), "cuda")
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(apply_rope, backend=record, fullgraph=True)
    got = compiled(q, k, positions, 10000.0)
    assert len(graphs) == 1 and "megatron_jp.rope" in graphs[0]
    for g, w in zip(got, apply_rope(q, k, positions, 10000.0)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)  # the same kernel either way
