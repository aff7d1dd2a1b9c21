"""One optimizer step and one evaluation pass over this data-parallel rank's micro-batches.

Loss normalisation (makes every layout agree): the loss of a step is the sum of token
cross-entropies over all predicted tokens of the global batch divided by their number. Each rank
counts the predicted tokens of its micro-batches, the count is summed over data-parallel ranks, and
each micro-batch's summed loss is divided by that total before backward; gradients are then summed
(not averaged) over data-parallel ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_jp.models.encoder import IGNORE_INDEX
from megatron_jp.parallel.dims import ParallelDims
from megatron_jp.parallel.layers import vocab_parallel_argmax, vocab_parallel_cross_entropy
from megatron_jp.parallel.pipeline import run_pipeline


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, identical on every rank."""

    loss: float  # global mean cross-entropy over the predicted tokens of the batch
    grad_norm: float  # global L2 norm before clipping
    num_tokens: int  # predicted tokens in the global batch
    skipped: bool  # a NaN/inf loss or norm: nothing was updated


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy over the predicted tokens
    accuracy: float  # of the argmax prediction
    num_tokens: int


def _to_device(micro_batches: list[dict], device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in micro_batches]


def _sum(value: torch.Tensor, *groups) -> torch.Tensor:
    for group in groups:
        if group is not None:
            dist.all_reduce(value, group=group)
    return value


def count_predicted(micro_batches: list[dict], dims: ParallelDims) -> int:
    """Predicted tokens of the global batch: local micro-batches, summed over data-parallel ranks."""
    local = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
    total = torch.tensor(local, dtype=torch.int64, device=dims.device)
    return int(_sum(total, dims.dp_group).item())


def token_losses(model, output) -> torch.Tensor:
    """Cross-entropy (N,) of the last chunk's vocabulary-parallel logits, fp32."""
    return vocab_parallel_cross_entropy(output.logits, output.targets, model.vocab_start, model.dims.tp_group)


def train_step(model, optimizer, micro_batches: list[dict], dims: ParallelDims, lr: float) -> StepResult:
    """Forward and backward over every micro-batch (pipelined), gradient sync, clipping, AdamW."""
    model.train()
    batches = _to_device(micro_batches, dims.device)
    optimizer.zero_grad()
    total = count_predicted(batches, dims)
    scale = 1.0 / max(total, 1)
    losses = []

    def forward_step(v, m, hidden):
        output = model.forward_chunk(v, batches[m], hidden)
        if not model.is_last_chunk(v):
            return output.hidden
        loss = token_losses(model, output).sum() * scale  # this micro-batch's share of the step loss
        losses.append(loss.detach())
        return loss

    run_pipeline(model, batches, forward_step, train=True)
    loss = torch.stack(losses).sum() if losses else torch.zeros((), device=dims.device)
    loss = _sum(loss.double(), dims.pp_group, dims.dp_group).item()  # only last stages hold losses
    grad_norm = optimizer.step(lr, skip=not math.isfinite(loss))
    return StepResult(loss, grad_norm, total, skipped=not (math.isfinite(loss) and math.isfinite(grad_norm)))


@torch.no_grad()
def eval_step(model, micro_batches: list[dict], dims: ParallelDims) -> EvalResult:
    """Forward only over every micro-batch (pipelined)."""
    was_training = model.training
    model.eval()
    batches = _to_device(micro_batches, dims.device)
    stats = torch.zeros(3, dtype=torch.float64, device=dims.device)  # loss sum, correct, tokens

    def forward_step(v, m, hidden):
        output = model.forward_chunk(v, batches[m], hidden)
        if not model.is_last_chunk(v):
            return output.hidden
        predicted = vocab_parallel_argmax(output.logits, model.vocab_start, dims.tp_group)
        stats[0] += token_losses(model, output).sum().double()
        stats[1] += (predicted == output.targets).sum()
        stats[2] += output.targets.numel()
        return None

    run_pipeline(model, batches, forward_step, train=False)
    _sum(stats, dims.pp_group, dims.dp_group)
    model.train(was_training)
    tokens = int(stats[2].item())
    return EvalResult(stats[0].item() / max(tokens, 1), stats[1].item() / max(tokens, 1), tokens)
