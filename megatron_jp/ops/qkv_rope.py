"""From a fused QKV projection output to attention-layout q, k, v with RoPE applied.

`qkv` is [B, S, (Hq + 2*Hk) * D] laid out [all q heads; all k heads; all v heads] (ModernBERT's Wqkv
order). Returns q [B, Hq, S, D], k and v [B, Hk, S, D], the layout torch SDPA takes.
"""

import torch

from megatron_jp.ops.rope import rope_reference


def qkv_rope_reference(qkv: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor | None,
                       theta: float, n_heads: int, n_kv_heads: int, head_dim: int):
    if bias is not None:
        qkv = qkv + bias
    B, S, _ = qkv.shape
    q, k, v = qkv.view(B, S, n_heads + 2 * n_kv_heads, head_dim).split([n_heads, n_kv_heads, n_kv_heads], dim=2)
    if positions is not None:  # None: no rotary embedding (learned absolute positions)
        q, k = rope_reference(q, k, positions, theta)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def qkv_rope(qkv, bias, positions, theta, n_heads, n_kv_heads, head_dim):
    """The fused kernel where available, else the reference."""
    return qkv_rope_reference(qkv, bias, positions, theta, n_heads, n_kv_heads, head_dim)
