"""Rotary position embedding, rotate-half (GPT-NeoX / Llama / ModernBERT) layout.

`x` is [..., seq, heads, head_dim] (or [tokens, heads, head_dim]); `positions` has x's leading shape
without the last two dims, so packed documents can restart at 0.
"""

import torch

from megatron_jp.ops import KERNEL_DTYPES, cuda_stream, kernel_is_default, load_extension

_EXT = load_extension("rope")


def inverse_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/d), computed in fp32 as transformers does."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponent)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos and sin of shape positions.shape + (head_dim,), fp32."""
    freqs = positions.float()[..., None] * inverse_frequencies(head_dim, theta, positions.device)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float):
    """Rotate q [..., Hq, D] and k [..., Hk, D] by their token positions."""
    cos, sin = rope_cos_sin(positions, q.shape[-1], theta)
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads

    def rotate(x):
        return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)

    return rotate(q), rotate(k)


# ---- fused kernel path -------------------------------------------------------------------------

_INV_FREQ: dict = {}


def cached_inverse_frequencies(head_dim: int, theta: float, device) -> torch.Tensor:
    """inverse_frequencies on `device`, computed once per (head_dim, theta, device): the kernels read
    the reference's own fp32 values so their angles match it bit for bit."""
    key = (head_dim, float(theta), device)
    inv_freq = _INV_FREQ.get(key)
    if inv_freq is None:
        inv_freq = _INV_FREQ[key] = inverse_frequencies(head_dim, theta, device)
    return inv_freq


def _kernel_ready(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> bool:
    return (_EXT is not None and q.is_cuda and q.dtype in KERNEL_DTYPES and k.dtype == q.dtype
            and q.dim() >= 3 and not positions.is_floating_point())


def rope_rotate(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float, inverse: bool):
    """Rotate q and k by +angle (inverse=False) or -angle (the backward pass: a rotation's gradient is
    its inverse). The kernel where it applies, else the reference; no autograd of its own."""
    if _kernel_ready(q, k, positions):
        if positions.shape != q.shape[:-2]:
            positions = positions.expand(q.shape[:-2])  # the reference broadcasts positions too
        inv_freq = cached_inverse_frequencies(q.shape[-1], theta, q.device)
        return _EXT.rope(q, k, positions, inv_freq, inverse, cuda_stream(q))
    # -positions gives exactly -angle: negating the int position negates the fp32 product exactly
    q_out, k_out = rope_reference(q, k, -positions if inverse else positions, theta)
    return q_out.contiguous(), k_out.contiguous()


class RopeFunction(torch.autograd.Function):
    """Eager autograd around the kernel: saves only the positions, backward rotates back."""

    @staticmethod
    def forward(ctx, q, k, positions, theta):
        ctx.save_for_backward(positions)
        ctx.theta = theta
        return rope_rotate(q, k, positions, theta, inverse=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q, grad_k):
        (positions,) = ctx.saved_tensors
        grad_q, grad_k = rope_rotate(grad_q, grad_k, positions, ctx.theta, inverse=True)
        return grad_q, grad_k, None, None


@torch.library.custom_op("megatron_jp::rope", mutates_args=())
def rope_op(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float,
            inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.compile's view of the kernel: one opaque node with a fake and an autograd formula."""
    return rope_rotate(q, k, positions, theta, inverse)


@rope_op.register_fake
def _rope_fake(q, k, positions, theta, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup_context(ctx, inputs, output):
    _, _, positions, theta, inverse = inputs
    ctx.save_for_backward(positions)
    ctx.theta, ctx.inverse = theta, inverse


def _rope_backward(ctx, grad_q, grad_k):
    (positions,) = ctx.saved_tensors
    grad_q, grad_k = rope_op(grad_q, grad_k, positions, ctx.theta, not ctx.inverse)
    return grad_q, grad_k, None, None, None


rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float):
    """The fused kernel where available (and the default: ops.kernel_is_default), else the reference."""
    if _EXT is None or not q.is_cuda or not kernel_is_default("rope"):
        return rope_reference(q, k, positions, theta)
    if torch.compiler.is_compiling():
        return rope_op(q, k, positions, theta, False)
    return RopeFunction.apply(q, k, positions, theta)
