"""The GLU kernels (SwiGLU, GeGLU erf and tanh) against the reference, forward and backward."""

import pytest
import torch
from kernel_checks import tolerance

from megatron_jp.ops import glu as glu_module
from megatron_jp.ops.glu import GLU_ACTIVATIONS, GluFunction, glu, glu_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_forward_and_backward(x, activation):
    """GluFunction on CUDA (the kernels) against the reference in fp32 on upcast inputs."""
    x = x.detach().requires_grad_(True)
    got = GluFunction.apply(x, activation)
    x32 = x.detach().float().requires_grad_(True)
    want = glu_reference(x32, activation)
    tol = tolerance(x.dtype)
    assert got.dtype == x.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, **tol)
    grad = torch.randn_like(got)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    (want_grad,) = torch.autograd.grad(want, x32, grad.float())
    torch.testing.assert_close(got_grad.float(), want_grad, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", GLU_ACTIVATIONS)
@pytest.mark.parametrize("shape", [(3, 37, 2 * 136), (111, 2 * 128)], ids=["batch_seq", "tokens"])
def test_glu_kernel_matches_reference(built, shape, activation, dtype):
    built(glu_module)
    gen = torch.Generator(device="cuda").manual_seed(0)
    check_forward_and_backward(torch.randn(shape, device="cuda", generator=gen).to(dtype), activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", GLU_ACTIVATIONS)
def test_glu_kernel_scalar_path_handles_odd_widths(built, activation, dtype):
    built(glu_module)
    gen = torch.Generator(device="cuda").manual_seed(1)
    # ffn 75: not a multiple of the 16-byte vector -> the scalar kernel
    check_forward_and_backward(torch.randn(3, 37, 2 * 75, device="cuda", generator=gen).to(dtype), activation)


@pytest.mark.parametrize("activation", GLU_ACTIVATIONS)
def test_glu_kernel_saturates_like_the_reference_at_large_inputs(built, activation):
    built(glu_module)
    # |a| up to 30: exp overflows / tanh and erf saturate; the kernel must give the limits, not NaN
    a = torch.linspace(-30, 30, 1001, device="cuda")
    x = torch.cat((a, torch.ones_like(a)))[None]
    check_forward_and_backward(x, activation)


def test_glu_uses_the_kernel_on_cuda(built, monkeypatch):
    built(glu_module)
    x = torch.randn(3, 37, 2 * 136, device="cuda", dtype=torch.bfloat16)
    calls = []
    real = glu_module._EXT.forward
    monkeypatch.setattr(glu_module, "_EXT", type("Spy", (), {"forward": lambda *a: calls.append(1) or real(*a)}))
    glu(x, "swiglu")
    assert calls == [1]


def test_glu_compiles_to_one_graph_holding_the_custom_op(built):
    built(glu_module)
    x = torch.randn(3, 37, 2 * 136, device="cuda", dtype=torch.bfloat16)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    got = torch.compile(glu, backend=record, fullgraph=True)(x, "geglu")
    assert len(graphs) == 1 and "megatron_jp.glu" in graphs[0]
    torch.testing.assert_close(got, glu(x, "geglu"), rtol=0, atol=0)  # the same kernel either way
