"""Helpers for parity tests and smoke runs: deterministic synthetic micro-batches that follow the
loader's batch contract, the single-process reference training run every layout must match, and a
spawner for multi-process CPU jobs with a hard time limit."""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.nn.functional as F

from megatron_jp.config import OptimConfig
from megatron_jp.models.config import ModelConfig
from megatron_jp.models.encoder import IGNORE_INDEX, build_encoder
from megatron_jp.parallel.adamw import torch_adamw


def synthetic_row(gen: torch.Generator, seq: int, vocab: int, mask_prob: float):
    """One packed row: 1-3 documents of random ids, then some padding; ~mask_prob of the real tokens
    carry a random label."""
    pad = int(torch.randint(0, seq // 4 + 1, (1,), generator=gen))
    used = seq - pad
    cuts = int(torch.randint(0, 3, (1,), generator=gen))
    bounds = [0] + sorted((torch.randperm(used - 1, generator=gen)[:cuts] + 1).tolist()) + [used]
    segment = torch.zeros(seq, dtype=torch.int64)
    position = torch.zeros(seq, dtype=torch.int64)
    for doc, (start, end) in enumerate(zip(bounds, bounds[1:]), start=1):
        segment[start:end] = doc
        position[start:end] = torch.arange(end - start)
    ids = torch.randint(4, vocab, (seq,), generator=gen)
    ids[used:] = 0
    predicted = (torch.rand(seq, generator=gen) < mask_prob) & (segment > 0)
    labels = torch.where(predicted, torch.randint(4, vocab, (seq,), generator=gen), IGNORE_INDEX)
    return ids, labels, segment, position


def packed_segments(gen: torch.Generator, B: int, S: int, max_documents: int = 6) -> torch.Tensor:
    """(B, S) segment ids as the loader packs rows: documents 1, 2, ... of random lengths filling
    half to all of the row, then padding (0)."""
    rows = []
    for _ in range(B):
        used = int(torch.randint(S // 2, S + 1, (1,), generator=gen))
        n_cuts = int(torch.randint(0, max_documents, (1,), generator=gen))
        cuts = sorted((torch.randperm(used - 1, generator=gen)[:n_cuts] + 1).tolist())
        row = torch.zeros(S, dtype=torch.long)
        for doc, (a, b) in enumerate(zip([0, *cuts], [*cuts, used]), start=1):
            row[a:b] = doc
        rows.append(row)
    return torch.stack(rows)


def synthetic_micro_batches(seed: int, count: int, batch: int, seq: int, vocab: int,
                            mask_prob: float = 0.15) -> list[dict]:
    """`count` micro-batches of (batch, seq) int64 tensors: input_ids, labels, segment_ids, position_ids."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        rows = [synthetic_row(gen, seq, vocab, mask_prob) for _ in range(batch)]
        keys = ("input_ids", "labels", "segment_ids", "position_ids")
        out.append({k: torch.stack([r[i] for r in rows]) for i, k in enumerate(keys)})
    return out


def reference_run(cfg: ModelConfig, optim: OptimConfig, steps: list[list[dict]], seed: int, lr: float):
    """The single-process run: plain Encoder, torch.optim.AdamW, clip_grad_norm_. `steps` holds each
    step's global batch. Returns (losses, grad norms, final state dict)."""
    model = build_encoder(cfg, seed=seed)
    opt = torch_adamw(model, optim)
    losses, norms = [], []
    for batches in steps:
        opt.zero_grad()
        total = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        step_loss = 0.0
        for b in batches:
            out = model(b["input_ids"], b["labels"], b["segment_ids"], b["position_ids"])
            loss = F.cross_entropy(out.logits.float(), out.targets, reduction="sum") / total
            loss.backward()
            step_loss += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        losses.append(step_loss)
        norms.append(float(norm))
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn, world: int, port: int, args):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, args=(), timeout_s: float = 300.0):
    """Run fn(rank, world, *args) in `world` gloo processes; kill them all and raise after timeout_s."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(fn, world, free_port(), args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed job {fn.__name__} (world {world}) exceeded {timeout_s}s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
