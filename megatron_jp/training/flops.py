"""Model FLOPs of a bidirectional encoder and model FLOPs utilisation (MFU), docs/DESIGN.md §6.

Per trained token: 6 x (matmul parameters) + 12 x layers x (heads x head_dim) x s_eff, counting the
full attention matrix (no causal halving). s_eff is the window on local layers and sum(s_i^2)/sum(s_i)
over the packed documents of a batch on global layers. With sparse prediction the MLM head's
decoder only runs on the masked fraction of the tokens.
"""

from __future__ import annotations

import torch

from megatron_jp.models.config import ModelConfig
from megatron_jp.precision import H100_BF16_PEAK_FLOPS


def matmul_params(m: ModelConfig) -> tuple[int, int]:
    """(matmul parameters of the blocks, of the MLM head: transform + decoder, which see masked tokens only)."""
    d = m.head_dim
    attn = m.hidden_size * (m.num_heads + 2 * m.num_kv_heads) * d + m.num_heads * d * m.hidden_size
    mlp = m.hidden_size * m.ffn_hidden_size * (3 if m.gated else 2)
    head = m.hidden_size * m.hidden_size if m.head_type == "transform" else 0
    return m.num_layers * (attn + mlp), head + m.hidden_size * m.vocab_size


def effective_seq_length(segment_ids: torch.Tensor) -> float:
    """sum(s_i^2) / sum(s_i) over the documents (segments > 0) of a batch."""
    # one pass over the batch (the trainer calls this every step): (row, segment) keys never repeat
    # across rows, so runs of equal keys are the documents
    rows = torch.arange(segment_ids.shape[0], device=segment_ids.device).unsqueeze(1)
    keys = (rows * (int(segment_ids.max()) + 1) + segment_ids)[segment_ids > 0]
    _, lengths = torch.unique_consecutive(keys, return_counts=True)
    lengths = lengths.double()
    return float((lengths ** 2).sum() / lengths.sum().clamp(min=1))


def flops_per_token(m: ModelConfig, s_eff: float, predicted_fraction: float) -> float:
    """Forward + backward model FLOPs per input token."""
    blocks, decoder = matmul_params(m)
    attention = 0.0
    for layer in range(m.num_layers):
        span = s_eff if m.is_global_layer(layer) else min(m.sliding_window + 1, s_eff)
        attention += 12 * m.num_heads * m.head_dim * span
    return 6 * blocks + 6 * decoder * predicted_fraction + attention


def mfu(tokens_per_second_per_device: float, flops_token: float, peak: float = H100_BF16_PEAK_FLOPS) -> float:
    """Model FLOPs per second over `peak` (Precision.peak_flops: an FP8 run against the FP8 peak)."""
    return tokens_per_second_per_device * flops_token / peak
