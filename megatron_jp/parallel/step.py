"""One optimizer step and one evaluation pass over this data-parallel rank's micro-batches.

Loss normalisation (makes every layout agree): the loss of a step is the sum of token
cross-entropies over all predicted tokens of the global batch divided by their number. Each rank
counts the predicted tokens of its micro-batches, the count is summed over data-parallel ranks, and
each micro-batch's summed loss is divided by that total before backward; gradients are then summed
(not averaged) over data-parallel ranks.

Nothing in a step waits for the device until its end: what depends on the data (which positions
are predicted, how many, the documents' boundaries for varlen attention) is computed on the host
from the loader's CPU tensors before they are copied (pinned, non-blocking); the token total stays
a device tensor; the loss and the gradient norm come back together in one transfer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_jp.models.attention import varlen_boundaries
from megatron_jp.models.encoder import IGNORE_INDEX
from megatron_jp.parallel.dims import ParallelDims
from megatron_jp.parallel.loss import linear_cross_entropy, linear_cross_entropy_eval
from megatron_jp.parallel.pipeline import run_pipeline

PREDICTED_BUCKET = 256  # prediction indices are padded to a multiple: few distinct shapes per run


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


def on_host(batch: dict, varlen: bool) -> tuple[dict, int]:
    """A CPU micro-batch plus what the step derives from it: `predicted`, the flat positions whose
    labels are set, padded to a multiple of PREDICTED_BUCKET with a position whose label is
    IGNORE_INDEX (padding counts for nothing in the loss); with varlen attention `cu_seqlens`.
    Returns (batch, number of predicted tokens)."""
    flat = batch["labels"].reshape(-1)
    ignored = flat == IGNORE_INDEX
    index = torch.nonzero(~ignored).reshape(-1)
    count = index.numel()
    padding = -(-max(count, 1) // PREDICTED_BUCKET) * PREDICTED_BUCKET - count
    spare = torch.nonzero(ignored)[:1].reshape(-1)
    if padding and spare.numel():  # (every token predicted: no spare position, no padding)
        index = torch.cat([index, spare.expand(padding)])
    out = {**batch, "predicted": index}
    if varlen:
        out["cu_seqlens"] = varlen_boundaries(batch["segment_ids"])
    return out, count


def _to_device(batch: dict, device: torch.device) -> dict:
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def sum_over(value: torch.Tensor, *groups) -> torch.Tensor:
    """All-reduce `value` in place over each group in turn (None: a group of one)."""
    for group in groups:
        if group is not None:
            dist.all_reduce(value, group=group)
    return value


def prepare(model, micro_batches: list[dict], dims: ParallelDims) -> tuple[list[dict], torch.Tensor]:
    """Device micro-batches and the global number of predicted tokens (a device tensor: no wait)."""
    prepared = [on_host(b, model.uses_varlen) for b in micro_batches]
    local = sum(count for _, count in prepared)
    total = sum_over(torch.full((), float(local), dtype=torch.float64, device=dims.device), dims.dp_group)
    return [_to_device(b, dims.device) for b, _ in prepared], total


def run_chunks(model, batches: list[dict], last, train: bool):
    """Every micro-batch through this rank's chunks (pipelined). `last(m, output)` turns the last
    chunk's output for micro-batch m into what backward starts from: the loss in training, None
    without gradients. A micro-batch's attention context is built once, shared by its chunks."""
    contexts = {}

    def forward_step(v, m, hidden):
        ctx = contexts.setdefault(m, model.attention_context(batches[m]))
        output = model.forward_chunk(v, batches[m], ctx, hidden)
        return last(m, output) if model.is_last_chunk(v) else output.hidden

    run_pipeline(model, batches, forward_step, train=train)


def micro_batch_loss(model, output) -> torch.Tensor:
    """Summed cross-entropy of the last chunk's predicted tokens, the decoder fused in."""
    decoder = model.decoder
    return linear_cross_entropy(output.features, decoder.weight, decoder.bias, output.targets, model.vocab_start,
                                model.dims.tp_group)


def train_step(model, optimizer, micro_batches: list[dict], dims: ParallelDims, lr: float) -> StepResult:
    """Forward and backward over every micro-batch (pipelined), gradient sync, clipping, AdamW."""
    model.train()
    batches, total = prepare(model, micro_batches, dims)
    optimizer.zero_grad()
    scale = 1.0 / total.clamp(min=1).float()
    losses = []

    def last(m, output):
        loss = micro_batch_loss(model, output) * scale  # this micro-batch's share of the step loss
        losses.append(loss.detach())
        return loss

    run_chunks(model, batches, last, train=True)
    loss = torch.stack(losses).sum() if losses else torch.zeros((), device=dims.device)
    loss = sum_over(loss.double(), dims.pp_group, dims.dp_group)  # only last stages hold losses
    grad_norm, loss, tokens = optimizer.step(lr, loss, total)
    return StepResult(loss, grad_norm, int(tokens), skipped=not (math.isfinite(loss) and math.isfinite(grad_norm)))


@torch.no_grad()
def eval_step(model, micro_batches: list[dict], dims: ParallelDims) -> EvalResult:
    """Forward only over every micro-batch (pipelined)."""
    was_training = model.training
    model.eval()
    batches, total = prepare(model, micro_batches, dims)
    stats = torch.zeros(2, dtype=torch.float64, device=dims.device)  # loss sum, correct

    def last(m, output):
        decoder = model.decoder
        loss_sum, correct = linear_cross_entropy_eval(output.features, decoder.weight, decoder.bias, output.targets,
                                                      model.vocab_start, dims.tp_group)
        stats[0] += loss_sum
        stats[1] += correct
        return None

    run_chunks(model, batches, last, train=False)
    sum_over(stats, dims.pp_group, dims.dp_group)
    model.train(was_training)
    loss_sum, correct, tokens = torch.cat([stats, total.reshape(1)]).tolist()
    return EvalResult(loss_sum / max(tokens, 1), correct / max(tokens, 1), int(tokens))
