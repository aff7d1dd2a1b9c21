"""Pipeline parallelism: the slice of the model a stage holds, the schedules (1F1B, interleaved
1F1B), their communication plan, and the executor that runs one rank's program.

Global chunk g = v * pp + p lives on pipeline rank p as its virtual chunk v (Megatron's interleaved
assignment; vpp = 1 is plain 1F1B). A schedule is each rank's order of compute actions
F(chunk, micro-batch) / B(chunk, micro-batch). The communication plan comes from simulating all ranks
in lock-step ticks: in each tick a rank runs its next action if its input has arrived, and every
output of the tick is exchanged at the end of the tick in one batch_isend_irecv per rank. Both ends
of a message therefore post it in the same batch, which is deadlock-free with NCCL (grouped p2p)
and gloo alike, whatever the schedule; a stalled simulation is an invalid schedule and raises.

Only hidden states (and their gradients) travel: every stage reads the micro-batch's ids, labels,
segments and positions from its own loader. The last chunk turns its logits into the loss.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_jp.config import ConfigError
from megatron_jp.models.config import ModelConfig
from megatron_jp.models.encoder import Encoder


def stage_chunk(cfg: ModelConfig, dims, v: int) -> Encoder:
    """Global chunk v * pp + pp_rank as a meta-device Encoder holding only its layers: the embedding
    stays on the first chunk, the final norm and head on the last; the others pass hidden states."""
    chunks = dims.pp * dims.vpp
    g = v * dims.pp + dims.pp_rank
    per = cfg.num_layers // chunks
    with torch.device("meta"):
        chunk = Encoder(cfg)
    for key in list(chunk.layers.keys()):
        if not g * per <= int(key) < (g + 1) * per:
            del chunk.layers[key]
    if g != 0:
        chunk.embeddings = None
    if g != chunks - 1:
        chunk.final_norm, chunk.head = None, None
    return chunk


@dataclass(frozen=True)
class Action:
    kind: str  # "F" forward or "B" backward
    chunk: int  # virtual chunk v on this rank
    microbatch: int


@dataclass(frozen=True)
class Message:
    kind: str  # "F": activations of global chunk `chunk` for the next chunk; "B": their gradient
    chunk: int  # global chunk that produced it
    microbatch: int
    src: int  # pipeline ranks
    dst: int


@dataclass
class Step:
    action: Action | None
    sends: list[Message] = field(default_factory=list)
    recvs: list[Message] = field(default_factory=list)


# ----------------------------------------------------------------------------- schedules


def one_f_one_b(pp: int, rank: int, microbatches: int) -> list[Action]:
    """Warm up with pp - rank - 1 forwards, then alternate one forward and one backward, then drain:
    at most pp - rank micro-batches in flight (PipeDream-Flush / Megatron 1F1B)."""
    warmup = min(pp - rank - 1, microbatches)
    order = [Action("F", 0, m) for m in range(warmup)]
    for i in range(microbatches - warmup):
        order += [Action("F", 0, warmup + i), Action("B", 0, i)]
    return order + [Action("B", 0, m) for m in range(microbatches - warmup, microbatches)]


def interleaved_one_f_one_b(pp: int, vpp: int, rank: int, microbatches: int) -> list[Action]:
    """Megatron's interleaved 1F1B: micro-batches go through the vpp local chunks in groups of pp;
    the k-th forward is chunk (k mod pp*vpp) // pp, the k-th backward the same count from the last
    chunk. Warm-up: 2 (pp - rank - 1) + (vpp - 1) pp forwards (all of them when microbatches == pp)."""
    if microbatches % pp:
        raise ConfigError(f"interleaved pipelining needs the number of micro-batches per data-parallel rank "
                          f"({microbatches}) to be a multiple of parallel.pipeline ({pp})")
    total, group = microbatches * vpp, pp * vpp

    def action(kind, k):
        chunk = (k % group) // pp
        return Action(kind, chunk if kind == "F" else vpp - 1 - chunk, (k // group) * pp + k % pp)

    warmup = total if microbatches == pp else min(2 * (pp - rank - 1) + (vpp - 1) * pp, total)
    order = [action("F", k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [action("F", warmup + k), action("B", k)]
    return order + [action("B", k) for k in range(total - warmup, total)]


def forward_only(pp: int, vpp: int, rank: int, microbatches: int) -> list[Action]:
    if vpp == 1:
        return [Action("F", 0, m) for m in range(microbatches)]
    return [a for a in interleaved_one_f_one_b(pp, vpp, rank, microbatches) if a.kind == "F"]


def schedule(pp: int, vpp: int, rank: int, microbatches: int, train: bool = True) -> list[Action]:
    if not train:
        return forward_only(pp, vpp, rank, microbatches)
    if vpp == 1:
        return one_f_one_b(pp, rank, microbatches)
    return interleaved_one_f_one_b(pp, vpp, rank, microbatches)


# ----------------------------------------------------------------------------- communication plan


def _needs(action: Action, rank: int, pp: int, chunks: int):
    """The message key (kind, producing global chunk, micro-batch) an action waits for, if any."""
    g = action.chunk * pp + rank
    if action.kind == "F":
        return ("F", g - 1, action.microbatch) if g > 0 else None
    return ("B", g + 1, action.microbatch) if g < chunks - 1 else None


def _produces(action: Action, rank: int, pp: int, chunks: int) -> Message | None:
    g = action.chunk * pp + rank
    if action.kind == "F" and g < chunks - 1:
        return Message("F", g, action.microbatch, rank, (g + 1) % pp)
    if action.kind == "B" and g > 0:
        return Message("B", g, action.microbatch, rank, (g - 1) % pp)
    return None


@functools.lru_cache(maxsize=64)
def programs(pp: int, vpp: int, microbatches: int, train: bool = True) -> tuple[tuple[Step, ...], ...]:
    """Every pipeline rank's list of steps (action, then the messages exchanged right after it),
    from a lock-step simulation of all ranks. Pure; cached per shape."""
    orders = [schedule(pp, vpp, r, microbatches, train) for r in range(pp)]
    chunks = pp * vpp
    position = [0] * pp
    arrived = [set() for _ in range(pp)]
    out = [[] for _ in range(pp)]
    while any(position[r] < len(orders[r]) for r in range(pp)):
        steps = [Step(None) for _ in range(pp)]
        for r in range(pp):
            if position[r] < len(orders[r]):
                action = orders[r][position[r]]
                need = _needs(action, r, pp, chunks)
                if need is None or need in arrived[r]:
                    steps[r].action = action
                    position[r] += 1
        if all(s.action is None for s in steps):
            raise RuntimeError(f"pipeline schedule stalls (pp={pp}, vpp={vpp}, micro-batches={microbatches}) "
                               f"at {[orders[r][position[r]] for r in range(pp) if position[r] < len(orders[r])]}")
        for r, step in enumerate(steps):
            msg = _produces(step.action, r, pp, chunks) if step.action else None
            if msg is not None:
                step.sends.append(msg)
                steps[msg.dst].recvs.append(msg)
                arrived[msg.dst].add((msg.kind, msg.chunk, msg.microbatch))
        for r, step in enumerate(steps):
            if step.action or step.sends or step.recvs:
                out[r].append(step)
    return tuple(tuple(p) for p in out)


# ----------------------------------------------------------------------------- execution


class PipelineRun:
    """One rank's execution of its program for one step.

    forward_step(v, microbatch, hidden) returns the chunk's output tensor: hidden states, or on the
    last chunk the (scaled) loss that backward starts from. Before the last backward of each chunk the
    data-parallel gradient sync is switched on for it (one sync per step, not per micro-batch).
    """

    def __init__(self, model, micro_batches: list[dict], forward_step, train: bool = True):
        self.model, self.batches, self.forward_step, self.train = model, micro_batches, forward_step, train
        dims = model.dims
        self.program = programs(dims.pp, dims.vpp, len(micro_batches), train)[dims.pp_rank]
        self.inputs, self.outputs, self.received = {}, {}, {}
        self.last_backward = {a.chunk: i for i, s in enumerate(self.program) if (a := s.action) and a.kind == "B"}

    def run(self):
        for index, step in enumerate(self.program):
            outgoing = None
            if step.action is not None:
                outgoing = self._compute(step.action, index)
            self._exchange(step, outgoing)
        assert not self.outputs and not self.received, "pipeline finished with unconsumed tensors"

    def _compute(self, action: Action, index: int):
        if action.kind == "F":
            return self._forward(action)
        if self.model.grad_buffers is not None and self.last_backward.get(action.chunk) == index:
            self.model.grad_buffers.sync_on_backward(action.chunk)
        return self._backward(action)

    def _forward(self, action: Action):
        v, m = action.chunk, action.microbatch
        hidden = None
        if not self.model.is_first_chunk(v):
            hidden = self.received.pop(("F", self.model.global_chunk(v) - 1, m))
            hidden.requires_grad_(self.train)
        output = self.forward_step(v, m, hidden)
        if self.train:
            self.inputs[(v, m)], self.outputs[(v, m)] = hidden, output
        return None if self.model.is_last_chunk(v) else output.detach()

    def _backward(self, action: Action):
        v, m = action.chunk, action.microbatch
        hidden, output = self.inputs.pop((v, m)), self.outputs.pop((v, m))
        if self.model.is_last_chunk(v):
            torch.autograd.backward(output)
        else:
            torch.autograd.backward(output, self.received.pop(("B", self.model.global_chunk(v) + 1, m)))
        return None if hidden is None else hidden.grad

    def _exchange(self, step: Step, outgoing):
        if not step.sends and not step.recvs:
            return
        dims = self.model.dims
        ops, buffers = [], []
        for msg in step.sends:
            ops.append(dist.P2POp(dist.isend, outgoing.contiguous(), dims.pp_ranks[msg.dst], dims.pp_group,
                                  tag=_tag(msg)))
        for msg in step.recvs:
            shape = self.model.hidden_shape(self.batches[msg.microbatch])
            buffer = torch.empty(shape, dtype=self.model.precision.compute, device=dims.device)
            ops.append(dist.P2POp(dist.irecv, buffer, dims.pp_ranks[msg.src], dims.pp_group, tag=_tag(msg)))
            buffers.append((msg, buffer))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        for msg, buffer in buffers:
            self.received[(msg.kind, msg.chunk, msg.microbatch)] = buffer


def _tag(msg: Message) -> int:
    """Activations and gradients between the same two ranks (pp = 2, interleaved) never share a tag."""
    return 0 if msg.kind == "F" else 1


def run_pipeline(model, micro_batches: list[dict], forward_step, train: bool = True):
    """Run every forward (and, when training, backward) of this rank's chunks over the micro-batches."""
    PipelineRun(model, micro_batches, forward_step, train).run()
