"""Gated linear units on a fused fc1 output laid out as [activated half; linear half].

SwiGLU: silu(a) * b (Llama's gate_proj is `a`, up_proj is `b`); GeGLU: gelu(a) * b with exact erf
GELU (ModernBERT's Wi = [input; gate]), or the tanh approximation.
"""

import torch
import torch.nn.functional as F

from megatron_jp.config_fields import GLU_ACTIVATIONS
from megatron_jp.ops import KERNEL_DTYPES, cuda_stream, kernel_is_default, load_extension

_EXT = load_extension("glu")


def glu_reference(x: torch.Tensor, activation: str) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    if activation == "swiglu":
        return F.silu(a) * b
    if activation == "geglu":
        return F.gelu(a) * b
    if activation == "geglu_tanh":
        return F.gelu(a, approximate="tanh") * b
    raise ValueError(f"unknown GLU activation {activation!r}")


def glu_backward_reference(grad: torch.Tensor, x: torch.Tensor, activation: str) -> torch.Tensor:
    """grad_x = [grad * b * act'(a); grad * act(a)]: the formulas the kernel evaluates (torch's own
    silu / gelu / gelu-tanh derivatives), in fp32 (fp64 for fp64 inputs), rounded once to x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    a, b = x.to(compute).chunk(2, dim=-1)
    g = grad.to(compute)
    if activation == "swiglu":
        s = torch.sigmoid(a)
        value, slope = a * s, s * (1 + a * (1 - s))
    elif activation == "geglu":
        cdf = 0.5 * (1 + torch.erf(a * 0.5**0.5))
        value, slope = a * cdf, cdf + a * torch.exp(-0.5 * a * a) * (2 * torch.pi) ** -0.5
    elif activation == "geglu_tanh":
        beta, kappa = (2 / torch.pi) ** 0.5, 0.044715
        t = torch.tanh(beta * (a + kappa * a**3))
        value = 0.5 * a * (1 + t)
        slope = 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * beta * (1 + 3 * kappa * a * a)
    else:
        raise ValueError(f"unknown GLU activation {activation!r}; expected one of {GLU_ACTIVATIONS}")
    return torch.cat((g * b * slope, g * value), dim=-1).to(x.dtype)


# ---- fused kernel path -------------------------------------------------------------------------

def _kernel_ready(x: torch.Tensor) -> bool:
    return _EXT is not None and x.is_cuda and x.dtype in KERNEL_DTYPES


def glu_forward(x: torch.Tensor, activation: str) -> torch.Tensor:
    """y = act(a) * b: the kernel where it applies, else the reference; no autograd of its own."""
    if activation not in GLU_ACTIVATIONS:
        raise ValueError(f"unknown GLU activation {activation!r}; expected one of {GLU_ACTIVATIONS}")
    if _kernel_ready(x):
        return _EXT.forward(x, activation, cuda_stream(x))
    return glu_reference(x, activation).contiguous()


def glu_backward(grad: torch.Tensor, x: torch.Tensor, activation: str) -> torch.Tensor:
    """grad_x from grad_y and x (the activation is recomputed, nothing else is saved)."""
    if _kernel_ready(x) and grad.dtype == x.dtype:
        return _EXT.backward(grad, x, activation, cuda_stream(x))
    return glu_backward_reference(grad, x, activation)


class GluFunction(torch.autograd.Function):
    """Eager autograd around the kernel: saves only x, the fc1 output."""

    @staticmethod
    def forward(ctx, x, activation):
        ctx.save_for_backward(x)
        ctx.activation = activation
        return glu_forward(x, activation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return glu_backward(grad, x, ctx.activation), None


@torch.library.custom_op("megatron_jp::glu", mutates_args=())
def glu_op(x: torch.Tensor, activation: str) -> torch.Tensor:
    """torch.compile's view of the forward kernel."""
    return glu_forward(x, activation)


@glu_op.register_fake
def _glu_fake(x, activation):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("megatron_jp::glu_backward", mutates_args=())
def glu_backward_op(grad: torch.Tensor, x: torch.Tensor, activation: str) -> torch.Tensor:
    """torch.compile's view of the backward kernel (first-order only)."""
    return glu_backward(grad, x, activation)


@glu_backward_op.register_fake
def _glu_backward_fake(grad, x, activation):
    return x.new_empty(x.shape)


def _glu_setup_context(ctx, inputs, output):
    x, activation = inputs
    ctx.save_for_backward(x)
    ctx.activation = activation


def _glu_op_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return glu_backward_op(grad, x, ctx.activation), None


glu_op.register_autograd(_glu_op_backward, setup_context=_glu_setup_context)


def glu(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The fused kernel where available (and the default: ops.kernel_is_default), else the reference."""
    if _EXT is None or not x.is_cuda or not kernel_is_default("glu"):
        return glu_reference(x, activation)
    if torch.compiler.is_compiling():
        return glu_op(x, activation)
    return GluFunction.apply(x, activation)
