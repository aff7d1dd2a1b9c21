"""The MLM loss fused with its vocabulary projection: vocabulary-parallel and chunked.

With ~80k predicted tokens per micro-batch and a 100k vocabulary, the logits alone are 32 GB in
fp32, and softmax plus its gradient hold two more copies. Here the decoder runs on a chunk of
tokens at a time: its (chunk, V/tp) fp32 logits give the chunk's cross-entropy through three
(chunk,) reductions over the tensor-parallel group (max, target logit, sum of exponentials), and in
the same pass the gradients with respect to the features, the weight and the bias (Liger-Kernel's
fused linear cross-entropy); backward only scales them by the incoming gradient of the loss. No more
than one chunk of logits exists at any time, and the decoder's matmuls run once.

Targets equal to IGNORE_INDEX (the padding of a fixed-size prediction index) count for nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_jp.models.encoder import IGNORE_INDEX
from megatron_jp.parallel.mappings import all_reduce, copy_to_tensor_parallel_region, group_size

CHUNK_ELEMENTS = 1 << 26  # fp32 logits per chunk: 256 MB, e.g. 655 tokens of a 102,400 vocabulary


def chunk_tokens(vocab_local: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab_local, 1))


def _softmax_and_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group):
    """fp32 logits (n, V_local) -> (per-token loss (n,), softmax (n, V_local) in place of the logits,
    local target index, target-on-this-shard mask). Rows of IGNORE_INDEX targets get loss 0 and a
    zero softmax, hence a zero gradient."""
    logits_max = logits.max(dim=-1).values
    if group_size(group) > 1:
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
    logits.sub_(logits_max.unsqueeze(-1))
    local = targets - vocab_start
    valid = targets != IGNORE_INDEX
    inside = (local >= 0) & (local < logits.shape[-1]) & valid
    local = local.masked_fill(~inside, 0)
    target_logit = logits.gather(1, local.unsqueeze(1)).squeeze(1) * inside
    softmax = logits.exp_()
    both = all_reduce(torch.stack([target_logit, softmax.sum(dim=-1)]), group)
    loss = (both[1].log() - both[0]) * valid
    softmax.mul_((valid / both[1]).unsqueeze(-1))  # normalised, and zero on ignored rows, in one pass
    return loss, softmax, local, inside


def _subtract_one_hot(softmax: torch.Tensor, local: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """d loss / d logit = softmax - one_hot(target), in place (targets on this shard only)."""
    softmax[torch.arange(softmax.shape[0], device=softmax.device), local] -= inside.to(softmax.dtype)
    return softmax


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, vocab_start, group, chunk):
        grad_x = torch.empty_like(x)
        grad_w = grad_b = None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[0], chunk):
            xc, tc = x[start:start + chunk], targets[start:start + chunk]
            loss, softmax, local, inside = _softmax_and_loss(F.linear(xc, weight, bias).float(), tc, vocab_start,
                                                             group)
            total += loss.sum()
            grad = _subtract_one_hot(softmax, local, inside)
            g = grad.to(x.dtype)
            grad_x[start:start + chunk] = g @ weight
            if ctx.needs_input_grad[1]:  # fp32 accumulation of the weight gradient over chunks
                part = g.t() @ xc
                grad_w = part.float() if grad_w is None else grad_w.add_(part)
            if bias is not None and ctx.needs_input_grad[2]:
                part = grad.sum(dim=0)
                grad_b = part if grad_b is None else grad_b.add_(part)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grad_x, grad_w, grad_b = ctx.saved_tensors  # used once: scaled in place
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_total.to(torch.float32)
        return (grad_x.mul_(scale.to(grad_x.dtype)),
                None if grad_w is None else grad_w.mul_(scale).to(w_dtype),
                None if grad_b is None else grad_b.mul_(scale).to(b_dtype),
                None, None, None, None)


def linear_cross_entropy(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, vocab_start: int = 0, group=None,
                         chunk: int | None = None) -> torch.Tensor:
    """sum over tokens of CE(features @ weight^T + bias, targets), fp32, for a decoder holding vocabulary
    rows [vocab_start, vocab_start + rows) on each rank of `group`. features (N, H) replicated over the
    group (their gradient is summed over it, as a column-parallel input's)."""
    x = copy_to_tensor_parallel_region(features, group)
    return _LinearCrossEntropy.apply(x, weight, bias, targets, vocab_start, group,
                                     chunk or chunk_tokens(weight.shape[0]))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits split over the vocabulary (unfused: the logits exist)."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group):
        ctx.logits_dtype = logits.dtype
        loss, softmax, local, inside = _softmax_and_loss(logits.float().clone(), targets, vocab_start, group)
        ctx.save_for_backward(softmax, local, inside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, inside = ctx.saved_tensors
        grad = _subtract_one_hot(softmax, local, inside).mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group):
    """Per-token cross-entropy (N,) in fp32 of logits (N, V_local) holding vocabulary rows
    [vocab_start, vocab_start + V_local); every rank of the group gets the same losses."""
    return _VocabParallelCrossEntropy.apply(logits, targets, vocab_start, group)


def vocab_parallel_argmax(logits: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
    """Global vocabulary id of the largest logit (N,), from logits split over the vocabulary."""
    value, index = logits.float().max(dim=-1)
    index = index + vocab_start
    size = group_size(group)
    if size == 1:
        return index
    values = [torch.empty_like(value) for _ in range(size)]
    indices = [torch.empty_like(index) for _ in range(size)]
    dist.all_gather(values, value, group=group)
    dist.all_gather(indices, index, group=group)
    best = torch.stack(values).argmax(dim=0)  # first maximum: the lowest id, as torch.argmax
    return torch.stack(indices).gather(0, best.unsqueeze(0)).squeeze(0)


@torch.no_grad()
def linear_cross_entropy_eval(features, weight, bias, targets, vocab_start: int = 0, group=None,
                              chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, correct argmax predictions) over the valid targets, chunk by chunk, no gradients."""
    chunk = chunk or chunk_tokens(weight.shape[0])
    loss_sum = torch.zeros((), dtype=torch.float64, device=features.device)
    correct = torch.zeros((), dtype=torch.float64, device=features.device)
    for start in range(0, features.shape[0], chunk):
        logits = F.linear(features[start:start + chunk], weight, bias).float()
        tc = targets[start:start + chunk]
        predicted = vocab_parallel_argmax(logits, vocab_start, group)
        loss, *_ = _softmax_and_loss(logits, tc, vocab_start, group)
        loss_sum += loss.sum().double()
        correct += ((predicted == tc) & (tc != IGNORE_INDEX)).sum()
    return loss_sum, correct
