"""Multi-process jobs for the layout tests: each spawned world runs a list of cases in one go (process
start-up on 2 CPU cores costs more than a tiny model's steps). Rank 0 saves each case's results;
the test modules compare them with the single-process reference.

A case is a dict: job ("parity", "memory", "bf16", "reshard"), id, model and the layout keys of
`layout_config`.
"""

from __future__ import annotations

import functools
from dataclasses import asdict

import torch
import torch.distributed as dist

from megatron_jp.config import Config, OptimConfig
from megatron_jp.models.config import preset
from megatron_jp.models.encoder import build_encoder
from megatron_jp.parallel import (ParallelDims, assemble_full, build_optimizer, build_parallel_model, eval_step,
                                  memory_breakdown, train_step)
from megatron_jp.precision import Precision
from megatron_jp.parallel.testing import reference_run, synthetic_micro_batches

VOCAB, SEQ, ROWS, MICRO_BATCHES, STEPS = 128, 32, 2, 4, 5
SEED, LR = 3, 1e-3
BUCKET = 20_000  # elements: several buckets per rank even for the tiny model
OPTIM = OptimConfig(lr=LR, clip_grad=1.0, weight_decay=0.01)


def model_config(name: str):
    if name == "tiny-kv1":  # one KV head: replicated over tensor-parallel ranks
        return preset("tiny", vocab_size=VOCAB, num_kv_heads=1)
    return preset(name, vocab_size=VOCAB)


def step_batches(step: int) -> list[dict]:
    """The global batch of a step: MICRO_BATCHES micro-batches of ROWS rows."""
    return synthetic_micro_batches(1000 + step, MICRO_BATCHES, ROWS, SEQ, VOCAB)


def eval_batches() -> list[dict]:
    return synthetic_micro_batches(99, MICRO_BATCHES, ROWS, SEQ, VOCAB)


def local(batches: list[dict], dims: ParallelDims) -> list[dict]:
    """This data-parallel rank's contiguous share of a global batch."""
    per = len(batches) // dims.dp
    return batches[dims.dp_rank * per:(dims.dp_rank + 1) * per]


def layout_config(case: dict) -> Config:
    cfg = Config()
    cfg.model = model_config(case["model"])
    p = cfg.parallel
    p.tensor, p.pipeline, p.virtual_pipeline = case.get("tp", 1), case.get("pp", 1), case.get("vpp", 1)
    p.sequence_parallel, p.zero1 = case.get("sp", False), case.get("zero1", False)
    cfg.train.precision, cfg.train.recompute = case.get("precision", "fp32"), case.get("recompute", "none")
    cfg.train.fp8_recipe, cfg.parallel.grad_reduce_dtype = case.get("recipe", "tensorwise"), case.get("reduce", "fp32")
    cfg.train.micro_batch_size, cfg.train.global_batch_size = ROWS, ROWS * MICRO_BATCHES
    cfg.optim = OPTIM
    return cfg


def build(case: dict, rank: int, world: int):
    cfg = layout_config(case)
    dims = ParallelDims.from_config(cfg, world, rank)
    model = build_parallel_model(cfg.model, dims, seed=SEED, precision=Precision.of(cfg),
                                 recompute=cfg.train.recompute, sequence_parallel=cfg.parallel.sequence_parallel,
                                 zero1=cfg.parallel.zero1,
                                 bucket_size=BUCKET)
    return cfg, dims, model, build_optimizer(model, cfg.optim, dims)


def train(model, optimizer, dims, steps) -> list[dict]:
    return [asdict(train_step(model, optimizer, local(step_batches(s), dims), dims, LR)) for s in steps]


def parity(rank: int, world: int, case: dict, out_dir: str):
    """STEPS steps, then the full parameters and an evaluation."""
    _, dims, model, optimizer = build(case, rank, world)
    steps = train(model, optimizer, dims, range(STEPS))
    evaluation = asdict(eval_step(model, local(eval_batches(), dims), dims))
    full = model.full_state_dict()
    if rank == 0:
        torch.save({"steps": steps, "eval": evaluation, "params": full}, f"{out_dir}/{case['id']}.pt")


def _buffer_bytes(model, optimizer) -> dict:
    """Bytes actually held by parameter, gradient and optimizer-state tensors (distinct storages)."""
    def total(tensors):
        seen = {}
        for t in tensors:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    params = [i.param for i in model.infos]
    assert all(p.grad is None for p in params), "autograd gradients must not outlive backward"
    grads = [b.grads for b in model.grad_buffers.buckets]
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    state = [t for s in optimizer.shards for t in (s.master, s.exp_avg, s.exp_avg_sq)
             if t.untyped_storage().data_ptr() not in param_ptrs]  # fp32 masters may be the parameters
    return {"params": total(params), "grads": total(grads), "optimizer": total(state)}


def memory(rank: int, world: int, case: dict, out_dir: str):
    """Measured buffer bytes of every rank after two steps, next to the estimate for its stage."""
    cfg, dims, model, optimizer = build(case, rank, world)
    train(model, optimizer, dims, range(2))
    measured = _buffer_bytes(model, optimizer)
    estimate = memory_breakdown(cfg, world)[dims.pp_rank]
    gathered = [None] * world
    dist.all_gather_object(gathered, (dims.coords, measured, estimate))
    if rank == 0:
        torch.save(gathered, f"{out_dir}/{case['id']}.pt")


def bf16(rank: int, world: int, case: dict, out_dir: str):
    """Ten steps on one repeated batch (the loss must fall) with the dtypes of every buffer."""
    _, dims, model, optimizer = build(case, rank, world)
    batch = local(step_batches(0), dims)
    losses = [train_step(model, optimizer, batch, dims, 1e-2).loss for _ in range(10)]
    dtypes = {"params": {str(i.param.dtype) for i in model.infos},
              "grads": {str(b.grads.dtype) for b in model.grad_buffers.buckets},
              "master": {str(s.master.dtype) for s in optimizer.shards},
              "master_is_separate": all(s.master.data_ptr() != s.params.data_ptr() for s in optimizer.shards)}
    if rank == 0:
        torch.save({"losses": losses, "dtypes": dtypes}, f"{out_dir}/{case['id']}.pt")


def _gather_full(pieces_by_name: dict, world: int) -> dict:
    """Full tensors from every rank's primary pieces (a stand-in for a DCP save), on every rank."""
    mine = {name: [p for p in pieces if p.primary] for name, pieces in pieces_by_name.items()}
    mine = {name: [(p.offsets, p.global_shape, p.tensor.detach().float().clone()) for p in pieces]
            for name, pieces in mine.items()}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    names = set().union(*[e.keys() for e in everyone])
    full = {}
    for name in names:
        parts = [part for e in everyone for part in e.get(name, [])]
        full[name] = assemble_full([_Piece(*part) for part in parts])
    return full


class _Piece:  # the fields assemble_full reads
    def __init__(self, offsets, global_shape, tensor):
        self.offsets, self.global_shape, self.tensor, self.primary = offsets, global_shape, tensor, True


def _fill(pieces_by_name: dict, full: dict):
    for name, pieces in pieces_by_name.items():
        for p in pieces:
            index = tuple(slice(o, o + n) for o, n in zip(p.offsets, p.tensor.shape))
            p.tensor.copy_(full[name][index])


def reshard(rank: int, world: int, case: dict, out_dir: str):
    """Train `split` steps in layout A, save model and optimizer as full-name pieces, load them into
    layout B and finish the run there: the run must equal the single-process one."""
    split = case["split"]
    _, dims, model, optimizer = build(case["from"], rank, world)
    train(model, optimizer, dims, range(split))
    saved_model = _gather_full(model.sharded_state_dict(), world)
    state = optimizer.sharded_state_dict()
    saved_optim = {k: _gather_full(state[k], world) for k in ("master", "exp_avg", "exp_avg_sq")}
    _, dims, model, optimizer = build(case["to"], rank, world)
    target = model.sharded_state_dict()
    _fill(target, saved_model)
    state = optimizer.sharded_state_dict()
    for key in ("master", "exp_avg", "exp_avg_sq"):
        _fill(state[key], saved_optim[key])
    state["step"] = split
    optimizer.load_sharded_state_dict(state)
    steps = train(model, optimizer, dims, range(split, STEPS))
    full = model.full_state_dict()
    if rank == 0:
        torch.save({"steps": steps, "params": full}, f"{out_dir}/{case['id']}.pt")


JOBS = {"parity": parity, "memory": memory, "bf16": bf16, "reshard": reshard}


def run_cases(rank: int, world: int, cases: list[dict], out_dir: str):
    for case in cases:
        JOBS[case["job"]](rank, world, case, out_dir)


@functools.lru_cache(maxsize=None)
def reference(name: str) -> dict:
    """The single-process run (plain Encoder, torch.optim.AdamW) and its evaluation. One thread: on
    a shared 2-core machine, intra-op threads of tiny matmuls spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference(name)
    finally:
        torch.set_num_threads(threads)


def _reference(name: str) -> dict:
    cfg = model_config(name)
    losses, norms, state = reference_run(cfg, OPTIM, [step_batches(s) for s in range(STEPS)], SEED, LR)
    model = build_encoder(cfg)
    model.load_state_dict(state)
    model.eval()
    loss_sum, correct, tokens = 0.0, 0, 0
    with torch.no_grad():
        for b in eval_batches():
            out = model(b["input_ids"], b["labels"], b["segment_ids"], b["position_ids"])
            loss_sum += torch.nn.functional.cross_entropy(out.logits, out.targets, reduction="sum").item()
            correct += int((out.logits.argmax(-1) == out.targets).sum())
            tokens += out.targets.numel()
    return {"losses": losses, "norms": norms, "params": state,
            "eval": {"loss": loss_sum / tokens, "accuracy": correct / tokens, "num_tokens": tokens}}
