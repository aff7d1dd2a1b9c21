"""The conjugate collectives of tensor and sequence parallelism, named as in the Megatron papers.

Megatron-LM (Shoeybi et al. 2019) calls them f and g: f is the identity forward and an all-reduce
backward (it enters a tensor-parallel region whose ranks hold different shards of the weights), g is
its conjugate. Sequence parallelism (Korthikanti et al. 2022) replaces the all-reduce of g by a
reduce-scatter over the sequence and the identity of f by an all-gather, so the norm and dropout
regions in between hold 1/tp of the sequence.

Activations are (B, S, H): the sequence dimension is 1. A None group (or a group of one) makes every
function the identity, so the same model code runs unsharded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SEQ_DIM = 1

# newer torch deprecates reduce_scatter_tensor/all_gather_into_tensor for the *_single names; older
# torch (clusters) only has the former
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Out of place: autograd may share `x` with another consumer (a residual branch)."""
    if group_size(group) == 1:
        return x
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, op=op, group=group)
    return x


def split_seq(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's contiguous 1/tp of the sequence."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[SEQ_DIM] % size:
        raise ValueError(f"sequence parallelism needs the sequence length ({x.shape[SEQ_DIM]}) divisible "
                         f"by the tensor-parallel size ({size})")
    return x.chunk(size, dim=SEQ_DIM)[group_rank(group)].contiguous()


def all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    local = x.movedim(SEQ_DIM, 0).contiguous()  # (S/tp, B, H): gather along a contiguous leading dim
    out = local.new_empty((size * local.shape[0],) + tuple(local.shape[1:]))
    all_gather_single(out, local, group=group)
    return out.movedim(0, SEQ_DIM).contiguous()


def reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    full = x.movedim(SEQ_DIM, 0).contiguous()  # (S, B, H)
    if full.shape[0] % size:
        raise ValueError(f"sequence parallelism needs the sequence length ({full.shape[0]}) divisible "
                         f"by the tensor-parallel size ({size})")
    out = full.new_empty((full.shape[0] // size,) + tuple(full.shape[1:]))
    reduce_scatter_single(out, full, group=group)
    return out.movedim(0, SEQ_DIM).contiguous()


class _CopyToTensorParallelRegion(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Split the sequence forward, all-gather backward (enter a sequence-parallel region from a
    replicated one, e.g. after the embedding)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_seq(grad, ctx.group), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """All-gather the sequence forward. Backward: reduce-scatter when the consumer is tensor-parallel
    (each rank's gradient is a partial sum), split when it is replicated (gradients already whole)."""

    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group, ctx.reduce = group, tensor_parallel_output_grad
        return all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        out = reduce_scatter_seq(grad, ctx.group) if ctx.reduce else split_seq(grad, ctx.group)
        return out, None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """g of sequence parallelism: reduce-scatter forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_seq(grad, ctx.group), None


def copy_to_tensor_parallel_region(x, group):
    return x if group_size(group) == 1 else _CopyToTensorParallelRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x, group):
    return x if group_size(group) == 1 else _ReduceFromTensorParallelRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x, group):
    return x if group_size(group) == 1 else _ScatterToSequenceParallelRegion.apply(x, group)


def gather_from_sequence_parallel_region(x, group, tensor_parallel_output_grad: bool = True):
    if group_size(group) == 1:
        return x
    return _GatherFromSequenceParallelRegion.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x, group):
    return x if group_size(group) == 1 else _ReduceScatterToSequenceParallelRegion.apply(x, group)
