"""Dropout seeds inside tensor-parallel regions (parallel/random.py), on one process."""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_jp.models.config import preset
from megatron_jp.models.encoder import Block
from megatron_jp.parallel.random import TensorParallelRandom, fork_dropout_rng, tensor_parallel_rng


def draws(tp_rank: int):
    torch.manual_seed(3)
    with tensor_parallel_rng(tp_rank, torch.device("cpu")):
        inside = torch.rand(8)
    return inside, torch.rand(8)


def test_draws_inside_depend_on_the_rank_and_leave_the_shared_state_alike():
    (in0, out0), (in1, out1) = draws(0), draws(1)
    assert not torch.equal(in0, in1)
    assert torch.equal(out0, out1)  # every peer consumed the same one number from the shared generator
    assert torch.equal(draws(1)[0], in1)  # reproducible


def test_recomputation_redraws_the_same_dropout_mask():
    dropout = TensorParallelRandom(nn.Dropout(0.5), tp_rank=1).train()
    x = torch.randn(64, requires_grad=True)
    torch.manual_seed(4)
    (dropout(x) * x).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    torch.manual_seed(4)
    (checkpoint(dropout, x, use_reentrant=False) * x).sum().backward()
    assert torch.equal(x.grad, plain)


def test_only_tensor_parallel_dropout_sites_are_wrapped():
    cfg = preset("tiny", vocab_size=128, attention_dropout=0.1, hidden_dropout=0.1)
    block = Block(cfg, 0)
    fork_dropout_rng(block, cfg, tp_rank=1, tp_size=2, sequence_parallel=False)
    assert isinstance(block.attn.core, TensorParallelRandom) and isinstance(block.drop, nn.Dropout)
    names = {n for n, _ in Block(cfg, 0).named_parameters()}
    fork_dropout_rng(block, cfg, tp_rank=1, tp_size=2, sequence_parallel=True)
    assert isinstance(block.drop, TensorParallelRandom)
    assert {n for n, _ in block.named_parameters()} == names  # parameter names do not change
