"""The world-4 job of test_checkpoint_layouts, in one spawn (process start-up dominates on 2 cores):

1. train SPLIT steps under tp=2 x pp=2 and save (synchronously), with a rank_state per rank;
2. load that checkpoint into a fresh model and optimizer of the same layout;
3. load it into pp=2 x dp=2 with ZeRO-1: weights only, then weights and optimizer; train one step,
   save asynchronously, train one more step while the write runs, then wait for it.

Rank 0 stores, for each checkpoint, the full model and optimizer state it must hold, and what each
load produced; every rank also checks all its local pieces, replicas included (the full state seen
from rank 0 only shows primaries). The test module compares, and loads the checkpoints into a single
process.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

import parallel_jobs as jobs
from megatron_jp.training.checkpoint import Checkpointer, find_latest

WRITER = {"model": "tiny", "tp": 2, "pp": 2}
READER = {"model": "tiny", "pp": 2, "dp": 2, "zero1": True}
SPLIT = 2  # steps trained before the first save; jobs.STEPS (5) bounds the reference run
KINDS = ("master", "exp_avg", "exp_avg_sq")


def snapshot(model, optimizer, world: int) -> dict:
    """Full parameters (on rank 0) and full optimizer state (every rank); collective."""
    state = optimizer.sharded_state_dict()
    return {"model": model.full_state_dict(), "step": optimizer.step_count,
            "optim": {kind: jobs._gather_full(state[kind], world) for kind in KINDS}}


def pieces_match(pieces_by_name: dict, full: dict) -> bool:
    """Every local piece, primary or replica, holds its block of the full tensors."""
    for name, pieces in pieces_by_name.items():
        for p in pieces:
            index = tuple(slice(o, o + n) for o, n in zip(p.offsets, p.tensor.shape))
            if not torch.equal(p.tensor.float(), full[name][index]):
                return False
    return True


def optimizer_matches(optimizer, full_optim: dict) -> bool:
    state = optimizer.sharded_state_dict()  # ZeRO-1: every rank's slices, gathered
    return all(pieces_match(state[kind], full_optim[kind]) for kind in KINDS)


def run(rank: int, world: int, out_dir: str):
    out, results, checks = Path(out_dir), {}, {}
    cfg, dims, model, optimizer = jobs.build(WRITER, rank, world)
    jobs.train(model, optimizer, dims, range(SPLIT))
    rank_state = {"rank": rank, "torch_rng": torch.get_rng_state()}
    saver = Checkpointer(out / "tp2pp2", cfg, dims)
    saver.save(SPLIT, model, optimizer, meta={"step": SPLIT, "consumed_samples": SPLIT * 8},
               rank_state=rank_state)
    results["written"] = snapshot(model, optimizer, world)
    full_model = jobs._gather_full(model.sharded_state_dict(), world)
    full_optim = results["written"]["optim"]
    latest = find_latest(out / "tp2pp2")

    cfg, dims, model, optimizer = jobs.build(WRITER, rank, world)
    same = saver.load(latest, model, optimizer)
    results["same_layout"] = snapshot(model, optimizer, world)
    checks["same_layout"] = pieces_match(model.sharded_state_dict(), full_model) and \
        optimizer_matches(optimizer, full_optim)
    checks["own_rank_state"] = (same.rank_state is not None and same.rank_state["rank"] == rank
                                and torch.equal(same.rank_state["torch_rng"], rank_state["torch_rng"]))

    cfg, dims, model, optimizer = jobs.build(READER, rank, world)
    resharding = Checkpointer(out / "pp2dp2", cfg, dims, async_save=True)
    resharding.load(latest, model)  # weights only: replicas are filled by the load itself
    checks["weights_only"] = pieces_match(model.sharded_state_dict(), full_model)
    other = resharding.load(latest, model, optimizer)
    results["other_layout"] = snapshot(model, optimizer, world)
    results["other_meta"] = other.meta
    checks["other_layout"] = pieces_match(model.sharded_state_dict(), full_model) and \
        optimizer_matches(optimizer, full_optim)
    checks["other_rank_state"] = other.rank_state

    steps = jobs.train(model, optimizer, dims, [SPLIT])
    results["async_written"] = snapshot(model, optimizer, world)
    resharding.save(SPLIT + 1, model, optimizer, meta={"step": SPLIT + 1})
    steps += jobs.train(model, optimizer, dims, [SPLIT + 1])  # training collectives during the write
    resharding.wait()
    results["steps_after_resharding"] = steps

    results["ranks"] = [None] * world
    dist.all_gather_object(results["ranks"], checks)
    if rank == 0:
        torch.save(results, out / "results.pt")
