"""RoPE reference (the CPU path and the kernels' oracle) and its dispatch on CPU."""

import pytest
import torch

from megatron_jp.ops.rope import (RopeFunction, apply_rope, inverse_frequencies, rope_op, rope_reference,
                                  rope_rotate)


def naive_complex_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE from its definition, in float64: element i of the first half and element i of
    the second half are one complex number, multiplied by exp(1j * position * theta^(-2i/D))."""
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = positions.double()[..., None, None] * inv_freq  # (..., 1, D/2): same angle for every head
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)


def packed_positions(lengths, batch=1):
    return torch.cat([torch.arange(n) for n in lengths]).expand(batch, -1)


@pytest.mark.parametrize("head_dim", [8, 64])
def test_rope_reference_matches_complex_rotation(head_dim):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 37, 5, head_dim, generator=gen)
    k = torch.randn(2, 37, 3, head_dim, generator=gen)
    positions = packed_positions([20, 17], batch=2)
    q_rot, k_rot = rope_reference(q, k, positions, 10000.0)
    # the reference rotates in fp32: inv_freq, angle (position <= 19 times a float) and cos/sin each
    # carry ~1e-7 relative error, times |x| <= ~5
    torch.testing.assert_close(q_rot.double(), naive_complex_rope(q, positions, 10000.0), rtol=0, atol=5e-6)
    torch.testing.assert_close(k_rot.double(), naive_complex_rope(k, positions, 10000.0), rtol=0, atol=5e-6)


def test_rope_reference_restarts_rotation_at_each_packed_document():
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 11, 3]
    q = torch.randn(sum(lengths), 4, 16, generator=gen)  # [tokens, heads, head_dim]
    packed, _ = rope_reference(q, q, packed_positions(lengths)[0], 500.0)
    separate = [rope_reference(doc, doc, torch.arange(len(doc)), 500.0)[0] for doc in q.split(lengths)]
    torch.testing.assert_close(packed, torch.cat(separate), rtol=0, atol=0)


def test_rope_reference_gradient_is_the_inverse_rotation():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, 7, 4, 32, generator=gen, requires_grad=True)
    k = torch.randn(3, 7, 2, 32, generator=gen, requires_grad=True)
    positions = torch.randint(0, 4096, (3, 7), generator=gen)
    grad_q, grad_k = torch.randn_like(q), torch.randn_like(k)
    q_rot, k_rot = rope_reference(q, k, positions, 10000.0)
    auto_q, auto_k = torch.autograd.grad((q_rot, k_rot), (q, k), (grad_q, grad_k))
    inverse_q, inverse_k = rope_rotate(grad_q, grad_k, positions, 10000.0, inverse=True)
    # both are fp32 rotations by the same fp32 angle, evaluated with different roundings
    torch.testing.assert_close(inverse_q, auto_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inverse_k, auto_k, rtol=1e-5, atol=1e-6)


def test_rope_inverse_rotation_undoes_the_rotation():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 9, 3, 64, generator=gen)
    positions = torch.randint(0, 8192, (2, 9), generator=gen)
    rotated, _ = rope_rotate(q, q, positions, 160000.0, inverse=False)
    back, _ = rope_rotate(rotated, rotated, positions, 160000.0, inverse=True)
    # two fp32 rotations: ~2 roundings of 2^-24 relative each, times |x| <= ~5
    torch.testing.assert_close(back, q, rtol=0, atol=2e-6)


def test_inverse_frequencies_are_theta_to_minus_2i_over_d():
    expected = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    torch.testing.assert_close(inverse_frequencies(64, 10000.0).double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_on_cpu_is_the_reference_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 13, 4, 16, generator=gen).to(dtype)
    k = torch.randn(2, 13, 2, 16, generator=gen).to(dtype)
    positions = torch.arange(13).expand(2, 13)
    for got, want in zip(apply_rope(q, k, positions, 10000.0), rope_reference(q, k, positions, 10000.0)):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("entry", ["function", "custom_op"])
def test_rope_autograd_entries_fall_back_to_the_reference_on_cpu(entry):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 11, 4, 16, generator=gen, requires_grad=True)
    k = torch.randn(3, 11, 2, 16, generator=gen, requires_grad=True)
    positions = torch.randint(0, 100, (3, 11), generator=gen)
    call = RopeFunction.apply if entry == "function" else lambda *a: rope_op(*a, False)
    got = call(q, k, positions, 500.0)
    want = rope_reference(q, k, positions, 500.0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    upstream = (torch.randn_like(q), torch.randn_like(k))
    got_grads = torch.autograd.grad(got, (q, k), upstream)
    want_grads = torch.autograd.grad(want, (q, k), upstream)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)  # same rotation, different rounding order


@pytest.mark.parametrize("entry", ["function", "custom_op"])
def test_rope_autograd_entries_pass_gradcheck_in_float64(entry):
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 5, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 1, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    positions = torch.randint(0, 50, (2, 5), generator=gen)
    call = RopeFunction.apply if entry == "function" else lambda *a: rope_op(*a, False)
    # The reference rotates in fp32 whatever the input dtype. A rotation is linear, so a large eps still
    # gives the exact derivative; only fp32 output rounding (~1e-7) / eps (1e-2) is left: atol 1e-4.
    assert torch.autograd.gradcheck(lambda a, b: call(a, b, positions, 100.0), (q, k), eps=1e-2, atol=1e-4)


def test_rope_custom_op_passes_opcheck():
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 5, 3, 8, generator=gen, requires_grad=True)
    k = torch.randn(2, 5, 1, 8, generator=gen, requires_grad=True)
    positions = torch.randint(0, 50, (2, 5), generator=gen)
    torch.library.opcheck(rope_op, (q, k, positions, 100.0, False))


def test_rope_custom_op_compiles_in_one_graph_with_its_backward():
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, 5, 3, 8, generator=gen, requires_grad=True)
    k = torch.randn(2, 5, 1, 8, generator=gen, requires_grad=True)
    positions = torch.randint(0, 50, (2, 5), generator=gen)

    def loss(q, k):
        q_rot, k_rot = rope_op(q, k, positions, 100.0, False)
        return (q_rot.sum(-1) * k_rot.sum(-1).mean(-1, keepdim=True)).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    got = torch.autograd.grad(compiled(q, k), (q, k))
    want = torch.autograd.grad(loss(q, k), (q, k))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
