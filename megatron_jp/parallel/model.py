"""This rank's part of the model: its pipeline chunks, tensor-parallel, in flat buckets.

build_parallel_model() builds each chunk as an Encoder on the meta device, keeps the chunk's layer
slice (the embedding on the first chunk, final norm and head on the last), swaps in tensor-parallel
modules, puts every parameter in a data-parallel bucket and only then materialises values: each
parameter's full tensor comes from the seeded RNG of init_weights (seeded by the full name) and the
local shard is cut out of it, so every layout starts from the single-process weights bit for bit.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from megatron_jp.models.config import ModelConfig
from megatron_jp.models.attention import AttentionContext, resolve_backend
from megatron_jp.models.encoder import (TIED_DECODER, TIED_EMBEDDING, Encoder, MLMOutput, build_encoder,
                                        init_weights, tie)
from megatron_jp.models.float8 import convert_to_fp8, fp8_hardware
from megatron_jp.parallel.adamw import decays
from megatron_jp.parallel.compile import compile_blocks
from megatron_jp.parallel.data_parallel import DEFAULT_BUCKET_SIZE, GradBuffers
from megatron_jp.parallel.dims import ParallelDims
from megatron_jp.parallel.pipeline import stage_chunk
from megatron_jp.parallel.recompute import apply_recompute
from megatron_jp.parallel.sharding import GradReduction, ParamInfo, ShardSpec, sharded_pieces
from megatron_jp.parallel.tensor_parallel import TPContext, TPPlan, parallelize_chunk
from megatron_jp.precision import Precision

class ParallelModel(nn.Module):
    """The chunks (virtual pipeline stages) this rank runs, plus the bookkeeping of its parameters.

    chunks[v] is global chunk v * pp + pp_rank. `infos` lists every local parameter once with its
    full name and shard layout; `grad_buffers` owns their memory and the data-parallel sync.
    """

    def __init__(self, cfg: ModelConfig, dims: ParallelDims, chunks: list[Encoder], infos: list[ParamInfo],
                 sequence_parallel: bool, precision: Precision):
        super().__init__()
        self.cfg, self.dims, self.infos = cfg, dims, infos
        self.chunks = nn.ModuleList(chunks)
        self.sequence_parallel, self.precision = sequence_parallel, precision
        self.grad_buffers: GradBuffers | None = None

    def global_chunk(self, v: int) -> int:
        return v * self.dims.pp + self.dims.pp_rank

    def is_first_chunk(self, v: int) -> bool:
        return self.global_chunk(v) == 0

    def is_last_chunk(self, v: int) -> bool:
        return self.global_chunk(v) == self.dims.pp * self.dims.vpp - 1

    @property
    def vocab_start(self) -> int:
        return self.dims.tp_rank * (self.cfg.vocab_size // self.dims.tp)

    def attention_context(self, batch: dict) -> AttentionContext:
        """The micro-batch's attention layout, built once and shared by every chunk and layer."""
        return self.chunks[0].attention_context(batch["input_ids"], batch.get("segment_ids"),
                                                batch.get("position_ids"), batch.get("cu_seqlens"))

    @property
    def uses_varlen(self) -> bool:
        """Whether attention runs varlen_attn, whose document boundaries the step makes on the host."""
        return resolve_backend(self.cfg.attention_backend, self.dims.device) == "varlen" and not (
            self.training and self.cfg.attention_dropout)

    def forward_chunk(self, v: int, batch: dict, ctx: AttentionContext,
                      hidden: torch.Tensor | None = None) -> MLMOutput:
        """Run chunk v on a micro-batch; `hidden` is the previous chunk's output (None on the first).
        Every chunk reads the micro-batch's ids, segments and positions itself: only hidden states
        travel between stages. The last chunk returns the decoder's input features (N, H) at the
        batch's `predicted` positions, and their targets: the loss fuses the decoder (parallel/loss.py)."""
        return self.chunks[v](batch["input_ids"], labels=batch.get("labels"), segment_ids=batch.get("segment_ids"),
                              position_ids=batch.get("position_ids"), token_type_ids=batch.get("token_type_ids"),
                              hidden_states=hidden, ctx=ctx, predicted=batch.get("predicted"), logits=False)

    @property
    def decoder(self) -> nn.Module:
        """The (vocabulary-parallel) decoder of the last chunk, on the last pipeline stage."""
        return self.chunks[-1].head.decoder

    def forward(self, *args, **kwargs):
        raise RuntimeError("a ParallelModel runs through train_step/eval_step (parallel.step), "
                           "or chunk by chunk with forward_chunk()")

    def hidden_shape(self, batch: dict) -> tuple[int, int, int]:
        """Shape of the hidden states passed between stages: (B, S / tp under sequence parallelism, H)."""
        B, S = batch["input_ids"].shape
        return B, S // self.dims.tp if self.sequence_parallel else S, self.cfg.hidden_size

    # ------------------------------------------------------------------------------ state

    def sharded_state_dict(self) -> dict[str, list]:
        """{full parameter name: [ShardedPiece]}: views of this rank's parameters with their place in
        the full tensor (sharding.ShardedPiece). One rank is primary for each block."""
        return {i.spec.full_name: sharded_pieces(i.param.data, i.spec, self.dims.dp_rank) for i in self.infos}

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's parameters by full name, as they are (the checkpointer's finiteness check)."""
        return {i.spec.full_name: i.param.data for i in self.infos}

    @torch.no_grad()
    def full_state_dict(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """The full, unsharded parameters on global rank 0 (an empty dict elsewhere); collective.

        One parameter at a time: each rank writes its primary pieces into a zero tensor and the sum
        is reduced to rank 0. Keys are the Encoder's state_dict keys (a tied decoder appears under both
        names, sharing one tensor), so `Encoder.load_state_dict` takes the result as is.
        """
        mine = {i.spec.full_name: i for i in self.infos}
        out = {}
        for name, shape in full_shapes(self.cfg).items():
            full = torch.zeros(shape, dtype=dtype, device=self.dims.device)
            info = mine.get(name)
            if info is not None and self.dims.dp_rank == 0:
                for piece in info.spec.pieces:
                    if piece.unique:
                        local, index = info.spec.blocks(piece)
                        full[index] = info.param.data[local].to(dtype)
            if self.dims.distributed:
                dist.reduce(full, dst=0, group=self.dims.world_group)
            if self.dims.rank == 0:
                out[name] = full.cpu()
        return tie(out, self.cfg) if self.dims.rank == 0 else out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]):
        """Copy this rank's shards out of full tensors (every rank passes the full dict). Call the
        optimizer's sync_master_from_params() afterwards if an optimizer exists."""
        for info in self.infos:
            info.param.data.copy_(info.spec.take(state[info.spec.full_name]))


def full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every full parameter name and shape, in the single-process model's order (tied: once)."""
    return {n: tuple(p.shape) for n, p in build_encoder(cfg, device="meta").named_parameters()}


def describe_params(model: ParallelModel, plans: list[dict[str, TPPlan]]) -> list[ParamInfo]:
    """One ParamInfo per local parameter, with its full name, shard layout and extra reductions."""
    cfg, dims = model.cfg, model.dims
    shapes = full_shapes(cfg)
    infos = []
    for v, chunk in enumerate(model.chunks):
        for name, param in chunk.named_parameters():
            full_name = TIED_EMBEDDING if cfg.tie_embeddings and name == TIED_DECODER else name
            spec, reductions = _spec(full_name, shapes[full_name], plans[v].get(name), dims.tp_rank)
            if full_name == TIED_EMBEDDING and cfg.tie_embeddings and dims.pp > 1:
                reductions += (GradReduction("embedding"),)
                if name != TIED_EMBEDDING:  # the last stage's copy: the first stage owns it
                    pieces = tuple(dataclasses.replace(p, unique=False) for p in spec.pieces)
                    spec = dataclasses.replace(spec, pieces=pieces)
            infos.append(ParamInfo(param, v, name, spec, reductions, decays(param)))
    return infos


def _spec(full_name: str, shape, plan: TPPlan | None, tp_rank: int):
    if plan is None:
        return ShardSpec.replicated(full_name, shape, tp_rank == 0), ()
    if plan.dim is None:
        return ShardSpec.replicated(full_name, shape, plan.pieces[0].unique), plan.reductions
    return ShardSpec(full_name, tuple(shape), plan.dim, plan.pieces), plan.reductions


class _OneParameter(nn.Module):
    """A module tree holding one tensor under its full dotted name, for init_weights."""

    def __init__(self, name: str, tensor: torch.Tensor):
        super().__init__()
        *path, leaf = name.split(".")
        node = self
        for part in path:
            child = nn.Module()
            node.add_module(part, child)
            node = child
        node.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))


@torch.no_grad()
def initialise(infos: list[ParamInfo], cfg: ModelConfig, seed: int):
    """Full tensor from init_weights' per-name generator, then this rank's shard of it."""
    for info in infos:
        full = torch.empty(info.spec.full_shape, dtype=torch.float32)
        init_weights(_OneParameter(info.spec.full_name, full), cfg, seed)
        info.param.data.copy_(info.spec.take(full))


def build_parallel_model(cfg: ModelConfig, dims: ParallelDims, seed: int = 0, device=None,
                         precision: Precision = Precision(), recompute: str = "none", sequence_parallel: bool = False,
                         zero1: bool = False, compile: bool = False,
                         bucket_size: int = DEFAULT_BUCKET_SIZE) -> ParallelModel:
    """This rank's chunks, initialised as the single-process model and sharded; takes validated
    values (config.validate). `precision` sets the parameter dtype, the FP8 linears and the dtype of
    the gradient sums; zero1 shards those sums (and the optimizer built on the model) over
    data-parallel ranks; compile compiles every block (parallel/compile.py). On device "meta" only the
    structure and the parameter layout exist."""
    device = torch.device(device) if device is not None else dims.device
    tp = TPContext(dims.tp_rank, dims.tp, dims.tp_group, sequence_parallel and dims.tp > 1)
    with torch.device("meta"):  # the parallel modules too: values come only after bucketing
        chunks = [stage_chunk(cfg, dims, v) for v in range(dims.vpp)]
        plans = [parallelize_chunk(chunk, cfg, tp) for chunk in chunks]
        for chunk in chunks if precision.fp8 else ():  # after tensor parallelism: swap_linears keeps it
            convert_to_fp8(chunk, precision.fp8_recipe, emulate=not fp8_hardware(device))
    model = ParallelModel(cfg, dims, chunks, [], tp.sequence_parallel, precision)
    model.infos = describe_params(model, plans)
    if device.type == "meta":
        return model
    model.grad_buffers = GradBuffers(model, model.infos, dims, device, precision.params, zero1, bucket_size,
                                     precision.grad_reduce)
    initialise(model.infos, cfg, seed)
    model.grad_buffers.register_hooks()
    for chunk in chunks:
        apply_recompute(chunk, recompute)
        if compile:  # tensor-parallel collectives break graphs: allowed there, an error elsewhere
            compile_blocks(chunk, fullgraph=dims.tp == 1)
    return model
