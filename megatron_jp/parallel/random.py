"""Dropout masks inside tensor-parallel regions: different on tensor-parallel peers, reproducibly.

Tensor-parallel peers share one seed (dims.dropout_seed), so dropout in replicated regions (the
residual stream after a row-parallel sum) drops the same elements on every peer, as it must. Inside a
tensor-parallel region each rank holds different heads (attention dropout) or, under sequence
parallelism, different tokens (the blocks' output dropout): there the same seed would give every
shard the same mask pattern. Megatron keeps a second, per-rank CUDA generator for these regions; here
a region draws one number from the shared generator (the same draw on every peer, so their shared
states stay equal), seeds a forked generator with it and the rank, and restores the shared state on
exit. Activation recomputation restores the shared state before it reruns a region, so the rerun
draws the same seed and the same masks.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def tensor_parallel_rng(tp_rank: int, device: torch.device):
    """Random draws inside differ per tensor-parallel rank; outside, nothing changes but one draw."""
    seed = int(torch.randint(0, 2**62, (1,)).item()) + 1_000_003 * tp_rank
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.default_generators[device.index or 0].manual_seed(seed)
        yield


class TensorParallelRandom(nn.Module):
    """`inner` (a parameter-free module: dropout, core attention) run under tensor_parallel_rng."""

    def __init__(self, inner: nn.Module, tp_rank: int):
        super().__init__()
        self.inner, self.tp_rank = inner, tp_rank

    def forward(self, x, *args):
        if not self.training:
            return self.inner(x, *args)
        with tensor_parallel_rng(self.tp_rank, x.device):
            return self.inner(x, *args)


def fork_dropout_rng(block: nn.Module, cfg, tp_rank: int, tp_size: int, sequence_parallel: bool):
    """Wrap the block's tensor-parallel dropout sites (parameter names do not change)."""
    if tp_size > 1 and cfg.attention_dropout:
        block.attn.core = TensorParallelRandom(block.attn.core, tp_rank)
    if sequence_parallel and cfg.hidden_dropout:
        block.drop = TensorParallelRandom(block.drop, tp_rank)
