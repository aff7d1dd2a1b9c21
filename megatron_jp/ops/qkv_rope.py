"""From a fused QKV projection output to attention-layout q, k, v with RoPE applied.

`qkv` is [B, S, (Hq + 2*Hk) * D] laid out [all q heads; all k heads; all v heads] (ModernBERT's Wqkv
order). Returns q [B, Hq, S, D], k and v [B, Hk, S, D], the layout torch SDPA and flex_attention take,
or with `token_major` q [B, S, Hq, D], k and v [B, S, Hk, D]: varlen_attn's [B * S, H, D] as a free
view, which spares the varlen path a transpose copy of q, k and v per layer.
"""

from typing import Optional

import torch

from megatron_jp.ops import KERNEL_DTYPES, cuda_stream, kernel_is_default, load_extension
from megatron_jp.ops.rope import cached_inverse_frequencies, rope_reference

_EXT = load_extension("qkv_rope")


def qkv_rope_reference(qkv: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor | None,
                       theta: float, n_heads: int, n_kv_heads: int, head_dim: int, token_major: bool = False):
    if bias is not None:
        qkv = qkv + bias
    B, S, _ = qkv.shape
    q, k, v = qkv.view(B, S, n_heads + 2 * n_kv_heads, head_dim).split([n_heads, n_kv_heads, n_kv_heads], dim=2)
    if positions is not None:  # None: no rotary embedding (learned absolute positions)
        q, k = rope_reference(q, k, positions, theta)
    if token_major:
        return q, k, v  # (B, S, H, D)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def qkv_rope_backward_reference(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor,
                                positions: torch.Tensor | None, theta: float,
                                token_major: bool = False) -> torch.Tensor:
    """grad_qkv [B, S, (Hq + 2 Hk) * D] from the [B, H, S, D] gradients ([B, S, H, D] token-major): q and
    k rotated back (by -positions, exactly -angle), the three concatenated in [q; k; v] order."""
    gq, gk, gv = grad_q, grad_k, grad_v
    if not token_major:
        gq, gk, gv = grad_q.transpose(1, 2), grad_k.transpose(1, 2), grad_v.transpose(1, 2)  # (B, S, H, D)
    B, S = gq.shape[:2]
    if positions is not None:
        gq, gk = rope_reference(gq, gk, -positions, theta)
    return torch.cat((gq.reshape(B, S, -1), gk.reshape(B, S, -1), gv.reshape(B, S, -1)), dim=-1)


# ---- fused kernel path -------------------------------------------------------------------------

def _kernel_ready(x: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor | None) -> bool:
    # a bias of another dtype (autocast) promotes the reference's output: leave that to the reference
    return (_EXT is not None and x.is_cuda and x.dtype in KERNEL_DTYPES
            and (bias is None or bias.dtype == x.dtype)
            and (positions is None or not positions.is_floating_point()))


def _inv_freq(positions, head_dim, theta, device):
    return None if positions is None else cached_inverse_frequencies(head_dim, theta, device)


def qkv_rope_forward(qkv, bias, positions, theta, n_heads, n_kv_heads, head_dim, token_major=False):
    """q, k, v as contiguous [B, H, S, D] ([B, S, H, D] token-major): the kernel where it applies, else
    the reference."""
    if _kernel_ready(qkv, bias, positions):
        if positions is not None and positions.shape != qkv.shape[:2]:
            positions = positions.expand(qkv.shape[:2])  # the reference broadcasts positions too
        inv_freq = _inv_freq(positions, head_dim, theta, qkv.device)
        return _EXT.forward(qkv, bias, positions, inv_freq, n_heads, n_kv_heads, head_dim, token_major,
                            cuda_stream(qkv))
    q, k, v = qkv_rope_reference(qkv, bias, positions, theta, n_heads, n_kv_heads, head_dim, token_major)
    return q.contiguous(), k.contiguous(), v.contiguous()


def qkv_rope_backward(grad_q, grad_k, grad_v, positions, theta, token_major=False):
    """grad_qkv from the q, k, v gradients (the bias gradient is its sum over tokens)."""
    if _kernel_ready(grad_q, None, positions) and grad_k.dtype == grad_v.dtype == grad_q.dtype:
        tokens = (grad_q.shape[0], grad_q.shape[1 if token_major else 2])
        if positions is not None and positions.shape != tokens:
            positions = positions.expand(tokens)
        inv_freq = _inv_freq(positions, grad_q.shape[-1], theta, grad_q.device)
        return _EXT.backward(grad_q, grad_k, grad_v, positions, inv_freq, token_major, cuda_stream(grad_q))
    return qkv_rope_backward_reference(grad_q, grad_k, grad_v, positions, theta, token_major)


def _bias_grad(grad_qkv: torch.Tensor, needed: bool):
    return grad_qkv.sum(dim=(0, 1)) if needed else None


class QkvRopeFunction(torch.autograd.Function):
    """Eager autograd around the kernels: saves only the positions."""

    @staticmethod
    def forward(ctx, qkv, bias, positions, theta, n_heads, n_kv_heads, head_dim, token_major=False):
        ctx.save_for_backward(positions)
        ctx.theta, ctx.token_major = theta, token_major
        return qkv_rope_forward(qkv, bias, positions, theta, n_heads, n_kv_heads, head_dim, token_major)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q, grad_k, grad_v):
        (positions,) = ctx.saved_tensors
        grad_qkv = qkv_rope_backward(grad_q, grad_k, grad_v, positions, ctx.theta, ctx.token_major)
        return grad_qkv, _bias_grad(grad_qkv, ctx.needs_input_grad[1]), None, None, None, None, None, None


@torch.library.custom_op("megatron_jp::qkv_rope", mutates_args=())
def qkv_rope_op(qkv: torch.Tensor, bias: Optional[torch.Tensor], positions: Optional[torch.Tensor], theta: float,
                n_heads: int, n_kv_heads: int, head_dim: int,
                token_major: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.compile's view of the forward kernel."""
    return qkv_rope_forward(qkv, bias, positions, theta, n_heads, n_kv_heads, head_dim, token_major)


def _attention_shape(B, S, heads, head_dim, token_major):
    return (B, S, heads, head_dim) if token_major else (B, heads, S, head_dim)


@qkv_rope_op.register_fake
def _qkv_rope_fake(qkv, bias, positions, theta, n_heads, n_kv_heads, head_dim, token_major=False):
    B, S = qkv.shape[:2]
    return (qkv.new_empty(_attention_shape(B, S, n_heads, head_dim, token_major)),
            qkv.new_empty(_attention_shape(B, S, n_kv_heads, head_dim, token_major)),
            qkv.new_empty(_attention_shape(B, S, n_kv_heads, head_dim, token_major)))


@torch.library.custom_op("megatron_jp::qkv_rope_backward", mutates_args=())
def qkv_rope_backward_op(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor,
                         positions: Optional[torch.Tensor], theta: float, token_major: bool = False) -> torch.Tensor:
    """torch.compile's view of the backward kernel (first-order only)."""
    return qkv_rope_backward(grad_q, grad_k, grad_v, positions, theta, token_major)


@qkv_rope_backward_op.register_fake
def _qkv_rope_backward_fake(grad_q, grad_k, grad_v, positions, theta, token_major=False):
    B, S, Hq, D = grad_q.shape if token_major else grad_q.transpose(1, 2).shape
    Hk = grad_k.shape[2 if token_major else 1]
    return grad_q.new_empty((B, S, (Hq + 2 * Hk) * D))


def _qkv_rope_setup_context(ctx, inputs, output):
    positions, theta = inputs[2], inputs[3]
    ctx.save_for_backward(positions)
    ctx.theta, ctx.token_major = theta, (inputs[7] if len(inputs) > 7 else False)


def _qkv_rope_op_backward(ctx, grad_q, grad_k, grad_v):
    (positions,) = ctx.saved_tensors
    grad_qkv = qkv_rope_backward_op(grad_q, grad_k, grad_v, positions, ctx.theta, ctx.token_major)
    return grad_qkv, _bias_grad(grad_qkv, ctx.needs_input_grad[1]), None, None, None, None, None, None


qkv_rope_op.register_autograd(_qkv_rope_op_backward, setup_context=_qkv_rope_setup_context)


def qkv_rope(qkv, bias, positions, theta, n_heads, n_kv_heads, head_dim, token_major=False):
    """The fused kernel where available (and the default: ops.kernel_is_default), else the reference."""
    args = (qkv, bias, positions, theta, n_heads, n_kv_heads, head_dim, token_major)
    if _EXT is None or not qkv.is_cuda or not kernel_is_default("qkv_rope"):
        return qkv_rope_reference(*args)
    if torch.compiler.is_compiling():
        return qkv_rope_op(*args)
    return QkvRopeFunction.apply(*args)
