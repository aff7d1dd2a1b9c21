"""Activation recomputation, applied to a model chunk from outside (the model file knows nothing of it).

"full" checkpoints whole blocks: only each block's input is kept, the rest is recomputed in backward.
"selective" checkpoints only core attention (Korthikanti et al. 2022): the S x S scores hold most of
the activation memory for little of the compute. torch.utils.checkpoint restores the RNG state before
recomputing, so dropout draws the same masks twice.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_recompute(chunk: nn.Module, mode: str):
    """mode: none, selective or full (train.recompute). Instance attributes shadow the modules'
    forward methods, so parameter names do not change."""
    for block in chunk.layers.values():
        if mode == "full":
            block.forward = functools.partial(_checkpointed, block.forward)
        elif mode == "selective":
            block.attn.core.forward = functools.partial(_checkpointed, block.attn.core.forward)


def _checkpointed(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)
