"""Data parallelism: flat parameter and gradient buckets, gradient sums overlapped with backward.

Every local parameter is a view into a flat bucket (Megatron's param/grad buffers). Its gradient is
added by a post-accumulate hook into an fp32 view of the bucket (`main_grad`: fp32 accumulation over
micro-batches whatever the parameter dtype) and the autograd gradient is dropped at once.

Gradient accumulation without redundant syncs: the hooks only count a parameter as ready during the
backward of the last micro-batch of its model chunk (the pipeline schedule says which one). When
every parameter of a bucket is ready, the bucket's sum over data-parallel ranks is launched
asynchronously while backward goes on: an all-reduce, or under ZeRO-1 a reduce-scatter that leaves
each rank the 1/dp of the bucket it updates. Gradients are summed, not averaged: the loss is already
divided by the global number of predicted tokens.

Buckets follow reverse parameter order (roughly the order backward produces gradients), never mix
model chunks, and a tied embedding split over the first and last pipeline stage gets a bucket of its
own so both stages see the same layout when its gradients are summed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megatron_jp.parallel.dims import ParallelDims
from megatron_jp.parallel.mappings import reduce_scatter_single
from megatron_jp.parallel.sharding import ParamInfo

DEFAULT_BUCKET_SIZE = 40_000_000  # elements; Megatron's default order of magnitude


@dataclass
class BucketPlan:
    chunk: int
    members: list[tuple[int, int]]  # (index into the ParamInfo list, offset in the bucket)
    numel: int  # padded to a multiple of the data-parallel size (equal ZeRO-1 shards)
    isolated: bool = False


def _isolated(info: ParamInfo) -> bool:
    return any(r.kind == "embedding" for r in info.reductions)


def plan_buckets(infos: list[ParamInfo], dp: int, bucket_size: int = DEFAULT_BUCKET_SIZE) -> list[BucketPlan]:
    """Pure layout (also used by the memory estimate on meta parameters)."""
    plans: list[BucketPlan] = []
    current = None
    for index in reversed(range(len(infos))):
        info, numel = infos[index], infos[index].param.numel()
        isolated = _isolated(info)
        if current is None or current.chunk != info.chunk or isolated or current.isolated \
                or current.numel + numel > bucket_size:
            current = BucketPlan(info.chunk, [], 0, isolated)
            plans.append(current)
        current.members.append((index, current.numel))
        current.numel += numel
    for plan in plans:
        plan.numel = -(-plan.numel // dp) * dp
    return plans


class Bucket:
    def __init__(self, plan: BucketPlan, device, dtype):
        self.plan = plan
        self.params = torch.zeros(plan.numel, dtype=dtype, device=device)
        self.grads = torch.zeros(plan.numel, dtype=torch.float32, device=device)
        self.ready = 0
        self.work = None
        self.sent = None  # the tensor being summed: the grads, or their bf16 copy
        self.out = None  # reduce-scatter output
        self.launched = False


class GradBuffers:
    """The buckets of one model replica's local parameters, and the data-parallel gradient sync."""

    def __init__(self, root: nn.Module, infos: list[ParamInfo], dims: ParallelDims, device, dtype,
                 zero1: bool = False, bucket_size: int = DEFAULT_BUCKET_SIZE,
                 reduce_dtype: torch.dtype = torch.float32):
        self.infos, self.dims = infos, dims
        self.buckets = [Bucket(p, device, dtype) for p in plan_buckets(infos, dims.dp, bucket_size)]
        self.bucket_of: dict[int, Bucket] = {}
        self.shard_grads = zero1 and dims.dp > 1  # ZeRO-1: each rank keeps (and updates) 1/dp of a bucket
        self.reduce_dtype = reduce_dtype  # bf16: half the traffic, gradients rounded before the sum
        self.sync_enabled = set()  # chunks whose current backward is their last of the step
        self.finished = False
        self._rehome(root)

    def _rehome(self, root: nn.Module):
        """Make every parameter a view into its bucket (tied parameters stay one object)."""
        replacement = {}
        for bucket in self.buckets:
            for index, offset in bucket.plan.members:
                info = self.infos[index]
                n, shape = info.param.numel(), info.param.shape
                new = nn.Parameter(bucket.params[offset:offset + n].view(shape), info.param.requires_grad)
                replacement[id(info.param)] = new
                info.param, info.main_grad = new, bucket.grads[offset:offset + n].view(shape)
                self.bucket_of[index] = bucket
        for module in root.modules():
            for name, param in module._parameters.items():
                if param is not None and id(param) in replacement:
                    module._parameters[name] = replacement[id(param)]

    def register_hooks(self):
        for index, info in enumerate(self.infos):
            info.param.register_post_accumulate_grad_hook(functools.partial(self._on_grad, index))

    def _on_grad(self, index: int, param: torch.Tensor):
        info = self.infos[index]
        info.main_grad.add_(param.grad)  # fp32 accumulation over micro-batches
        param.grad = None
        if info.chunk in self.sync_enabled:
            bucket = self.bucket_of[index]
            bucket.ready += 1
            if bucket.ready == len(bucket.plan.members):
                self._launch(bucket)

    def sync_on_backward(self, chunk: int):
        """The next backward of `chunk` is its last in this step: sum its buckets as they fill."""
        self.sync_enabled.add(chunk)

    def owned(self, bucket: Bucket) -> tuple[int, int]:
        """The flat range of `bucket` this rank updates: 1/dp under ZeRO-1, else all of it."""
        if not self.shard_grads:
            return 0, bucket.plan.numel
        size = bucket.plan.numel // self.dims.dp
        return self.dims.dp_rank * size, (self.dims.dp_rank + 1) * size

    def _launch(self, bucket: Bucket):
        bucket.launched = True
        group = self.dims.dp_group
        if group is None:
            return
        bucket.sent = bucket.grads if self.reduce_dtype == torch.float32 else bucket.grads.to(self.reduce_dtype)
        if self.shard_grads:
            bucket.out = bucket.sent.new_empty(bucket.plan.numel // self.dims.dp)
            bucket.work = reduce_scatter_single(bucket.out, bucket.sent, group=group, async_op=True)
        else:
            bucket.work = dist.all_reduce(bucket.sent, group=group, async_op=True)

    def finish(self):
        """Wait for every bucket's sum (launching those whose parameters got no gradient, in the same
        order on every rank), then apply the tensor/pipeline-parallel sums."""
        if self.finished:
            return
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            if bucket.out is not None:
                lo, hi = self.owned(bucket)
                bucket.grads[lo:hi].copy_(bucket.out)
            elif bucket.sent is not None and bucket.sent is not bucket.grads:
                bucket.grads.copy_(bucket.sent)
        self._model_parallel_sums()
        self.finished = True

    def zero_grad(self):
        for bucket in self.buckets:
            bucket.grads.zero_()
            bucket.ready, bucket.work, bucket.sent, bucket.out, bucket.launched = 0, None, None, None, False
        for info in self.infos:
            info.param.grad = None
        self.sync_enabled.clear()
        self.finished = False

    # ------------------------------------------------------------------ sums over tp and pp ranks

    def _model_parallel_sums(self):
        """Sequence-parallel parameters, replicated GQA key/value heads and tied embeddings; on the
        range this rank owns after the data-parallel sum (peers share the layout, so ranges match)."""
        found = {"tp": [], "kv": [], "embedding": []}
        for bucket in self.buckets:
            lo, hi = self.owned(bucket)
            for index, offset in bucket.plan.members:
                info = self.infos[index]
                for r in info.reductions:
                    start, end = (offset + r.start, offset + r.end) if r.kind == "kv" \
                        else (offset, offset + info.param.numel())
                    start, end = max(start, lo), min(end, hi)
                    if start < end:
                        found[r.kind].append((bucket.grads[start:end], r))
        sum_model_parallel(found, self.dims)


def sum_model_parallel(found: dict, dims: ParallelDims):
    """Apply GradReductions: `found` maps a kind ("tp", "kv", "embedding") to (gradient view, reduction)
    pairs. Every peer must pass the same kinds with views of the same sizes."""
    _sum_slices([v for v, _ in found.get("tp", [])], dims.tp_group)
    _sum_kv_slices(found.get("kv", []), dims.tp_group)
    _sum_slices([v for v, _ in found.get("embedding", [])], dims.embedding_group)


def _sum_slices(views: list[torch.Tensor], group):
    """One all-reduce for many small gradient slices."""
    if not views or group is None:
        return
    flat = torch.cat(views)
    dist.all_reduce(flat, group=group)
    _scatter_back(flat, views)


def _sum_kv_slices(found, group):
    """Each rank puts its KV gradient slices in the slot of its KV head; one all-reduce over the
    tensor-parallel group sums the replicas of every head; each rank reads its slot back."""
    if not found or group is None:
        return
    views = [v for v, _ in found]
    slot, slots = found[0][1].slot, found[0][1].slots
    flat = torch.cat(views)
    table = flat.new_zeros(slots, flat.numel())
    table[slot] = flat
    dist.all_reduce(table, group=group)
    _scatter_back(table[slot], views)


def _scatter_back(flat: torch.Tensor, views: list[torch.Tensor]):
    offset = 0
    for view in views:
        view.copy_(flat[offset:offset + view.numel()])
        offset += view.numel()
