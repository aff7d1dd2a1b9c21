"""Tensor-parallel layers with local shapes: column/row-parallel linears (nn.Linear subclasses, built
by models/linear.linear like every projection) and the vocabulary-parallel embedding (the
vocabulary-parallel loss is in loss.py).

The layers know only their local shard and their group; which rows of the full weight a shard holds
is recorded separately (parallel/sharding.py), so a fused [gate; up] or [q; k; v] weight is sharded
by part without the layer noticing; the fused QKV projection is a column-parallel linear over the
rank's rows of [q; k; v]. Parameter names stay `weight` and `bias`, as in nn.Linear and
nn.Embedding, so full names (checkpoints, initialisation seeds) do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_jp.parallel.mappings import (copy_to_tensor_parallel_region, gather_from_sequence_parallel_region,
                                           reduce_from_tensor_parallel_region,
                                           reduce_scatter_to_sequence_parallel_region)


class ColumnParallelLinear(nn.Linear):
    """y_local = x W_local^T + b_local; W is split along its output rows. The output stays sharded.

    Input: replicated x (f: all-reduce of its gradient), or with sequence parallelism a sequence
    shard that is all-gathered first (its gradient reduce-scattered back). The matmul is the base
    class's forward: nn.Linear's, or that of a linear swapped in later (models/linear.swap_linears).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group=None, sequence_parallel: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x):
        return super().forward(column_parallel_input(x, self.group, self.sequence_parallel))


class RowParallelLinear(nn.Linear):
    """y = sum_ranks x_local W_local^T + b; W is split along its input columns and x arrives sharded.

    The partial products are all-reduced (g), or reduce-scattered over the sequence with sequence
    parallelism. Only tensor-parallel rank 0 holds the bias: its partial product carries it, so the
    sum adds it once, and the base class's forward (whatever linear it is) is the whole matmul. Rank
    0's bias gradient is already complete (the gradient of a reduction is the whole output gradient).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group=None, sequence_parallel: bool = False,
                 rank: int = 0):
        super().__init__(in_features, out_features, bias=bias and rank == 0)
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x):
        y = super().forward(x)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(y, self.group)
        return reduce_from_tensor_parallel_region(y, self.group)


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
