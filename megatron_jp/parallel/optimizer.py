"""AdamW over the flat gradient buckets, optionally as a ZeRO-1 distributed optimizer.

Without ZeRO-1 every data-parallel rank updates all of its buckets. With ZeRO-1 each rank updates
1/dp of every bucket: it keeps fp32 master weights and Adam moments only for that slice, receives
only that slice of the gradient sum (reduce-scatter, data_parallel.py) and all-gathers the updated
parameters afterwards (Rajbhandari et al. 2020, stage 1; Megatron's distributed optimizer).

Master weights are fp32. When parameters are fp32 the master is the parameter memory itself (no
copy); with bf16 parameters it is a separate fp32 copy, written back (rounded) after each step.

Gradient norm: every gradient element is counted once in the world. Tensor-parallel replicas
(norms, biases, replicated KV heads) and the last stage's copy of a tied embedding count only on
their unique owner (sharding.Piece.unique); ZeRO-1 shards are disjoint over data-parallel ranks, and
without ZeRO-1 the data-parallel replicas hold the same sum, so the squares are summed over the
world or over one replica's tensor x pipeline ranks respectively.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_jp.config import OptimConfig
from megatron_jp.parallel.dims import ParallelDims
from megatron_jp.parallel.mappings import all_gather_single
from megatron_jp.parallel.sharding import local_from_pieces, sharded_pieces
from megatron_jp.parallel.adamw import adamw_update_, clip_coefficient

STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


@dataclass
class Shard:
    """The slice [lo, hi) of one bucket this rank updates, with its optimizer state."""

    bucket: object
    lo: int
    hi: int
    master: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    decay_ranges: list[tuple[int, int]]  # relative to lo
    norm_ranges: list[tuple[int, int]]  # relative to lo

    @property
    def params(self) -> torch.Tensor:
        return self.bucket.params[self.lo:self.hi]

    @property
    def grads(self) -> torch.Tensor:
        return self.bucket.grads[self.lo:self.hi]


def _clip(start: int, end: int, lo: int, hi: int):
    start, end = max(start, lo), min(end, hi)
    return (start - lo, end - lo) if start < end else None


class DistributedOptimizer:
    """AdamW with decoupled weight decay (not on norms and biases), global gradient-norm clipping
    and optional ZeRO-1 sharding over data-parallel ranks."""

    def __init__(self, model, cfg: OptimConfig, dims: ParallelDims):
        self.model, self.cfg, self.dims = model, cfg, dims
        self.buffers = model.grad_buffers
        self.zero1 = self.buffers.shard_grads  # the model was built with ZeRO-1 gradient buckets
        # master weights of their own (bf16 and fp8 parameters), which checkpoints must then save
        self.separate_master = model.precision.separate_master
        self.step_count = 0
        self.shards = [self._make_shard(bucket) for bucket in self.buffers.buckets]

    def _make_shard(self, bucket) -> Shard:
        lo, hi = self.buffers.owned(bucket)
        params = bucket.params[lo:hi]
        master = params.to(self.model.precision.master) if self.separate_master else params
        decay, norm = [], []
        for index, offset in bucket.plan.members:
            info = self.buffers.infos[index]
            if info.decay:
                decay.append(_clip(offset, offset + info.param.numel(), lo, hi))
            norm += [_clip(offset + s, offset + e, lo, hi) for s, e in info.spec.unique_flat_ranges()]
        return Shard(bucket, lo, hi, master, torch.zeros_like(master), torch.zeros_like(master),
                     [r for r in decay if r], [r for r in norm if r])

    def zero_grad(self):
        self.buffers.zero_grad()

    @torch.no_grad()
    def grad_norm_squared(self) -> torch.Tensor:
        """The square of the global L2 norm of the gradient, on the device (every element counted
        once, see the module doc): one multi-tensor norm over every range this rank counts."""
        views = [shard.grads[s:e] for shard in self.shards for s, e in shard.norm_ranges]
        device = views[0].device if views else self.dims.device
        norms = torch._foreach_norm(views) if views else []
        squares = torch.stack(norms).double().square().sum() if norms else torch.zeros((), dtype=torch.float64,
                                                                                        device=device)
        group = self.dims.world_group if self.zero1 else self.dims.mp_group
        if group is not None:
            dist.all_reduce(squares, group=group)
        return squares

    @torch.no_grad()
    def step(self, lr: float, loss: torch.Tensor | None = None, *extra: torch.Tensor) -> tuple[float, ...]:
        """Finish the gradient sums, clip to optim.clip_grad, update.

        Returns (norm before clipping, loss, *extra) as floats, read from the device together: the
        step's one synchronisation. A non-finite norm or loss leaves parameters and optimizer state
        untouched: the step is skipped, as in Megatron, not applied with NaNs.
        """
        self.buffers.finish()
        also = [t.reshape(()).double() for t in ((loss,) if loss is not None else ()) + extra]
        squares, *values = torch.stack([self.grad_norm_squared(), *also]).tolist()
        norm = math.sqrt(squares) if squares >= 0 else float("nan")
        if not math.isfinite(norm) or (loss is not None and not math.isfinite(values[0])):
            return (norm, *values)
        coef = clip_coefficient(norm, self.cfg.clip_grad)
        self.step_count += 1
        self._update(lr, coef)
        self._publish()
        return (norm, *values)

    def _update(self, lr: float, coef: float):
        if coef < 1.0:
            torch._foreach_mul_([s.grads for s in self.shards], coef)
        for shard in self.shards:
            for s, e in shard.decay_ranges:
                shard.master[s:e].mul_(1 - lr * self.cfg.weight_decay)
        adamw_update_([s.master for s in self.shards], [s.grads for s in self.shards],
                      [s.exp_avg for s in self.shards], [s.exp_avg_sq for s in self.shards], step=self.step_count,
                      lr=lr, beta1=self.cfg.beta1, beta2=self.cfg.beta2, eps=self.cfg.eps)

    def _publish(self):
        """Master weights -> parameters (rounded to their dtype), then all-gather the ZeRO-1 slices."""
        for shard in self.shards:
            if shard.master.data_ptr() != shard.params.data_ptr():
                shard.params.copy_(shard.master)
            if self.zero1:
                all_gather_single(shard.bucket.params, shard.params.clone(), group=self.dims.dp_group)

    @torch.no_grad()
    def sync_master_from_params(self):
        """After parameters were loaded into the model (e.g. from a full state dict)."""
        for shard in self.shards:
            if shard.master.data_ptr() != shard.params.data_ptr():
                shard.master.copy_(shard.params)

    # ------------------------------------------------------------------------------ checkpoints

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's state tensors, named for messages (the checkpointer's finiteness check)."""
        return {f"optimizer {key} (bucket {n})": getattr(shard, key)
                for n, shard in enumerate(self.shards) for key in STATE_KEYS}

    def state_dict(self) -> dict:
        """This rank's state in its own layout (resume with the same tp/pp/dp and ZeRO setting)."""
        return {"step": self.step_count, "zero1": self.zero1,
                "shards": [{k: getattr(s, k) for k in STATE_KEYS} for s in self.shards]}

    @torch.no_grad()
    def load_state_dict(self, state: dict):
        if len(state["shards"]) != len(self.shards) or state["zero1"] != self.zero1:
            raise ValueError("optimizer state from another layout: use sharded_state_dict() / "
                             "load_sharded_state_dict() to change tp/pp/dp or ZeRO-1")
        self.step_count = int(state["step"])
        for shard, saved in zip(self.shards, state["shards"]):
            for key in STATE_KEYS:
                getattr(shard, key).copy_(saved[key])
        self._publish()

    @torch.no_grad()
    def sharded_state_dict(self, for_saving: bool = False) -> dict:
        """Layout-independent state: {"step": n, "master" | "exp_avg" | "exp_avg_sq": {full parameter
        name: [ShardedPiece]}}, the same pieces as the parameter's (model.sharded_state_dict()).

        Without ZeRO-1 the pieces are views of the optimizer's own tensors (no copy: a save streams
        them to disk, a load fills them in place). ZeRO-1 slices are all-gathered over data-parallel
        ranks first, so every rank briefly holds the state of all its local parameters; data-parallel
        rank 0 holds the primary pieces. With for_saving, ZeRO-1 gathers one bucket and one kind at a
        time and moves it to host memory (device memory grows by one bucket, not by the state), and
        only data-parallel rank 0, the one that writes them, keeps the pieces.
        """
        out = {"step": self.step_count}
        keep = not (for_saving and self.zero1) or self.dims.dp_rank == 0
        for key in STATE_KEYS:
            out[key] = {}
            for shard in self.shards:
                full = self._gathered(shard, key)
                if for_saving and self.zero1:
                    full = full.to("cpu", copy=True) if keep else None  # the device copy is freed here
                if full is None:
                    continue
                for index, offset in shard.bucket.plan.members:
                    info = self.buffers.infos[index]
                    view = full[offset:offset + info.param.numel()].view(info.param.shape)
                    out[key][info.spec.full_name] = sharded_pieces(view, info.spec, self.dims.dp_rank)
        return out

    def _gathered(self, shard: Shard, key: str) -> torch.Tensor:
        local = getattr(shard, key)
        if not self.zero1:
            return local
        full = local.new_empty(shard.bucket.plan.numel)
        all_gather_single(full, local.contiguous(), group=self.dims.dp_group)
        return full

    @torch.no_grad()
    def load_sharded_state_dict(self, state: dict):
        """Inverse of sharded_state_dict(), from any layout: `state` holds, for every local
        parameter's full name, the pieces this rank's layout asks for (filled from a checkpoint)."""
        self.step_count = int(state["step"])
        for shard in self.shards:
            for key in STATE_KEYS:
                full = torch.zeros(shard.bucket.plan.numel, dtype=torch.float32, device=shard.master.device)
                for index, offset in shard.bucket.plan.members:
                    info = self.buffers.infos[index]
                    local = local_from_pieces(state[key][info.spec.full_name], info.spec)
                    full[offset:offset + info.param.numel()] = local.reshape(-1)
                getattr(shard, key).copy_(full[shard.lo:shard.hi])
        self._publish()


def build_optimizer(model, cfg: OptimConfig, dims: ParallelDims) -> DistributedOptimizer:
    """AdamW for a ParallelModel (ZeRO-1 when the model was built with zero1=True): .zero_grad(),
    .step(lr) -> grad norm, state dicts (see the class)."""
    return DistributedOptimizer(model, cfg, dims)
