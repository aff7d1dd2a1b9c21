"""Tensor-parallel layers with local shapes: column/row-parallel linears, the fused QKV projection of
a rank's heads and the vocabulary-parallel embedding (the vocabulary-parallel loss is in loss.py).

The layers know only their local shard and their group; which rows of the full weight a shard holds
is recorded separately (parallel/sharding.py), so a fused [gate; up] or [q; k; v] weight is sharded
by part without the layer noticing. Parameter names stay `weight` and `bias`, as in nn.Linear and
nn.Embedding, so full names (checkpoints, initialisation seeds) do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_jp.models.config import ModelConfig
from megatron_jp.models.encoder import QKVProjection
from megatron_jp.parallel.mappings import (copy_to_tensor_parallel_region, gather_from_sequence_parallel_region,
                                           reduce_from_tensor_parallel_region,
                                           reduce_scatter_to_sequence_parallel_region)


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local; W is split along its output rows. The output stays sharded.

    Input: replicated x (f: all-reduce of its gradient), or with sequence parallelism a sequence
    shard that is all-gathered first (its gradient reduce-scattered back).
    """

    def __init__(self, in_features: int, out_local: int, bias: bool, group, sequence_parallel: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_local, in_features))
        self.bias = nn.Parameter(torch.empty(out_local)) if bias else None
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x):
        x = column_parallel_input(x, self.group, self.sequence_parallel)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum_ranks x_local W_local^T + b; W is split along its input columns and x arrives sharded.

    The partial products are all-reduced (g), or reduce-scattered over the sequence with sequence
    parallelism. The bias is added once, after the reduction.
    """

    def __init__(self, in_local: int, out_features: int, bias: bool, group, sequence_parallel: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_local))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = reduce_from_tensor_parallel_region(y, self.group)
        return y if self.bias is None else y + self.bias


class ColumnParallelQKV(QKVProjection):
    """The fused q/k/v projection of this rank's heads: its weight holds the rank's rows of [q; k; v]
    (tensor_parallel.qkv_pieces), so the inherited forward projects, adds the bias, splits and
    rotates just those heads. Query heads are split evenly; key/value heads too, or, with more ranks
    than KV heads, each rank keeps the one KV head its query heads attend with."""

    def __init__(self, cfg: ModelConfig, layer: int, tp_size: int, group, sequence_parallel: bool = False):
        super().__init__(cfg, layer, cfg.num_heads // tp_size, max(cfg.num_kv_heads // tp_size, 1))
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x, positions, token_major: bool = False):
        return super().forward(column_parallel_input(x, self.group, self.sequence_parallel), positions, token_major)


def column_parallel_input(x, group, sequence_parallel: bool):
    """What enters a column-parallel matmul: f, or the sequence all-gather of sequence parallelism."""
    if sequence_parallel:
        return gather_from_sequence_parallel_region(x, group, tensor_parallel_output_grad=True)
    return copy_to_tensor_parallel_region(x, group)


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + rows) of the table; other ids contribute zeros, and the
    partial lookups are summed over the group (g), so every rank gets the full embedding."""

    def __init__(self, rows: int, dim: int, vocab_start: int, group):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
        self.vocab_start, self.group = vocab_start, group

    def forward(self, ids):
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, S, H)
        h = h.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(h, self.group)
