"""GLU reference (the CPU path and the kernels' oracle), its backward formulas and its dispatch on CPU."""

import math

import pytest
import torch

from megatron_jp.ops.glu import (GLU_ACTIVATIONS, GluFunction, glu, glu_backward_op, glu_backward_reference,
                                 glu_op, glu_reference)


def hand_glu(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The formulas from the papers, elementwise in float64: act on the first half, times the second."""
    F = x.shape[-1] // 2
    a, b = x[..., :F].double(), x[..., F:].double()
    if activation == "swiglu":
        act = a / (1 + torch.exp(-a))  # silu(a) = a * sigmoid(a)
    elif activation == "geglu":
        act = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))  # exact GELU: a * Phi(a)
    else:
        act = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
    return act * b


def sample(shape, dtype=torch.float64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("activation", GLU_ACTIVATIONS)
def test_glu_reference_matches_hand_formulas(activation):
    x = sample((3, 37, 2 * 24))
    torch.testing.assert_close(glu_reference(x, activation), hand_glu(x, activation), rtol=1e-12, atol=1e-12)


def test_glu_reference_activates_the_first_half_and_gates_with_the_second():
    a = torch.tensor([[-2.0, 0.5, 3.0]], dtype=torch.float64)
    x = torch.cat((a, torch.ones_like(a)), dim=-1)  # linear half of ones: y is the activation alone
    torch.testing.assert_close(glu_reference(x, "swiglu"), torch.nn.functional.silu(a))
    swapped = torch.cat((torch.ones_like(a), a), dim=-1)  # activated half of ones: y = silu(1) * a
    torch.testing.assert_close(glu_reference(swapped, "swiglu"), torch.nn.functional.silu(torch.ones_like(a)) * a)


@pytest.mark.parametrize("activation", GLU_ACTIVATIONS)
def test_glu_backward_formulas_match_autograd_of_the_reference(activation):
    x = sample((3, 37, 2 * 24), requires_grad=True)
    grad = sample((3, 37, 24), seed=1)
    (want,) = torch.autograd.grad(glu_reference(x, activation), x, grad)
    torch.testing.assert_close(glu_backward_reference(grad, x, activation), want, rtol=1e-12, atol=1e-12)


def test_glu_rejects_an_unknown_activation():
    x = sample((2, 8))
    with pytest.raises(ValueError, match="unknown GLU activation 'relu'"):
        GluFunction.apply(x, "relu")
    with pytest.raises(ValueError, match="unknown GLU activation 'relu'"):
        glu_backward_reference(x[..., :4], x, "relu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", GLU_ACTIVATIONS)
def test_glu_on_cpu_is_the_reference_bit_for_bit(activation, dtype):
    x = sample((3, 37, 2 * 24), dtype=dtype)
    torch.testing.assert_close(glu(x, activation), glu_reference(x, activation), rtol=0, atol=0)


@pytest.mark.parametrize("entry", ["function", "custom_op"])
@pytest.mark.parametrize("activation", GLU_ACTIVATIONS)
def test_glu_autograd_entries_fall_back_to_the_reference_on_cpu(activation, entry):
    x = sample((3, 37, 2 * 24), dtype=torch.float32, requires_grad=True)
    call = GluFunction.apply if entry == "function" else glu_op
    got, want = call(x, activation), glu_reference(x, activation)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    grad = sample(got.shape, dtype=torch.float32, seed=1)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    # The same derivative formulas in a different fp32 evaluation order. Where tanh or erf saturate,
    # 1 +- t cancels to ~1e-7 absolute, scaled by |grad * b * a| up to ~300 for these 3-sigma inputs.
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("entry", ["function", "custom_op"])
@pytest.mark.parametrize("activation", GLU_ACTIVATIONS)
def test_glu_autograd_entries_pass_gradcheck_in_float64(activation, entry):
    x = sample((2, 3, 2 * 5), requires_grad=True)
    call = GluFunction.apply if entry == "function" else glu_op
    assert torch.autograd.gradcheck(lambda t: call(t, activation), (x,))


@pytest.mark.parametrize("activation", GLU_ACTIVATIONS)
def test_glu_custom_ops_pass_opcheck(activation):
    x = sample((2, 3, 2 * 8), dtype=torch.float32, requires_grad=True)
    torch.library.opcheck(glu_op, (x, activation))
    torch.library.opcheck(glu_backward_op, (sample((2, 3, 8), dtype=torch.float32, seed=1), x.detach(), activation))


def test_glu_custom_op_compiles_in_one_graph_with_its_backward():
    x = sample((2, 3, 2 * 8), dtype=torch.float32, requires_grad=True)
    compiled = torch.compile(lambda t: glu_op(t, "swiglu").square().sum(), backend="aot_eager", fullgraph=True)
    (got,) = torch.autograd.grad(compiled(x), x)
    (want,) = torch.autograd.grad(glu_reference(x, "swiglu").square().sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
