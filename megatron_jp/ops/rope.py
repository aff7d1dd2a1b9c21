"""Rotary position embedding, rotate-half (GPT-NeoX / Llama / ModernBERT) layout.

`x` is [..., seq, heads, head_dim] (or [tokens, heads, head_dim]); `positions` has x's leading shape
without the last two dims, so packed documents can restart at 0.
"""

import torch


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


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float):
    """The fused kernel where available, else the reference."""
    return rope_reference(q, k, positions, theta)
