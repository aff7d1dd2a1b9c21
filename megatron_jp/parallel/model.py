"""This rank's part of the model: its pipeline chunks, tensor-parallel, in flat buckets.

build_parallel_model() builds each chunk as an Encoder on the meta device, keeps the chunk's layer
slice (the embedding on the first chunk, final norm and head on the last), swaps in tensor-parallel
modules, puts every parameter in a data-parallel bucket and only then materialises values: each
parameter's full tensor comes from the seeded RNG of init_weights (seeded by the full name) and the
local shard is cut out of it, so every layout starts from the single-process weights bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_jp.config import ConfigError, ModelConfig, validate_model_parallel
from megatron_jp.models.encoder import Encoder, MLMOutput, build_encoder, init_weights
from megatron_jp.parallel.data_parallel import DEFAULT_BUCKET_SIZE, GradBuffers
from megatron_jp.parallel.dims import ParallelDims
from megatron_jp.parallel.sharding import GradReduction, ParamInfo, ShardSpec, sharded_pieces
from megatron_jp.parallel.tensor_parallel import TPContext, TPPlan, parallelize_chunk
from megatron_jp.training.optim import decays

TIED = "embeddings.tok.weight"  # the full name a tied decoder weight is known by (init, checkpoints)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RECOMPUTE = ("none", "selective", "full")


class ParallelModel(nn.Module):
    """The chunks (virtual pipeline stages) this rank runs, plus the bookkeeping of its parameters.

    chunks[v] is global chunk v * pp + pp_rank. `infos` lists every local parameter once with its
    full name and shard layout; `grad_buffers` owns their memory and the data-parallel sync.
    """

    def __init__(self, cfg: ModelConfig, dims: ParallelDims, chunks: list[Encoder], infos: list[ParamInfo],
                 sequence_parallel: bool, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.dims, self.infos = cfg, dims, infos
        self.chunks = nn.ModuleList(chunks)
        self.sequence_parallel, self.dtype = sequence_parallel, dtype
        self.grad_buffers: GradBuffers | None = None
        self._p2p_ready = False  # pipeline communicators created (parallel/pipeline.py)

    def global_chunk(self, v: int) -> int:
        return v * self.dims.pp + self.dims.pp_rank

    def is_first_chunk(self, v: int) -> bool:
        return self.global_chunk(v) == 0

    def is_last_chunk(self, v: int) -> bool:
        return self.global_chunk(v) == self.dims.pp * self.dims.vpp - 1

    @property
    def vocab_start(self) -> int:
        return self.dims.tp_rank * (self.cfg.vocab_size // self.dims.tp)

    def forward_chunk(self, v: int, batch: dict, hidden: torch.Tensor | None = None) -> MLMOutput:
        """Run chunk v on a micro-batch; `hidden` is the previous chunk's output (None on the first).
        Every chunk reads the micro-batch's ids, segments and positions itself: only hidden states
        travel between stages. The last chunk returns logits (N, V/tp) at the predicted positions."""
        return self.chunks[v](batch["input_ids"], labels=batch.get("labels"), segment_ids=batch.get("segment_ids"),
                              position_ids=batch.get("position_ids"), token_type_ids=batch.get("token_type_ids"),
                              hidden_states=hidden)

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
        if self.dims.rank == 0 and self.cfg.tie_embeddings:
            out["head.decoder.weight"] = out[TIED]
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]):
        """Copy this rank's shards out of full tensors (every rank passes the full dict). Call the
        optimizer's sync_master_from_params() afterwards if an optimizer exists."""
        for info in self.infos:
            info.param.data.copy_(info.spec.take(state[info.spec.full_name]))


def full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every full parameter name and shape, in the single-process model's order (tied: once)."""
    return {n: tuple(p.shape) for n, p in build_encoder(cfg, device="meta").named_parameters()}


def make_chunk(cfg: ModelConfig, dims: ParallelDims, v: int) -> Encoder:
    """Global chunk v * pp + pp_rank as a meta-device Encoder holding only its layers."""
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


def describe_params(model: ParallelModel, plans: list[dict[str, TPPlan]]) -> list[ParamInfo]:
    """One ParamInfo per local parameter, with its full name, shard layout and extra reductions."""
    cfg, dims = model.cfg, model.dims
    shapes = full_shapes(cfg)
    infos = []
    for v, chunk in enumerate(model.chunks):
        for name, param in chunk.named_parameters():
            full_name = TIED if cfg.tie_embeddings and name == "head.decoder.weight" else name
            spec, reductions = _spec(full_name, shapes[full_name], plans[v].get(name), dims.tp_rank)
            if full_name == TIED and cfg.tie_embeddings and dims.pp > 1:
                reductions += (GradReduction("embedding"),)
                if name != TIED:  # the last stage's copy: the first stage owns it
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


def apply_recompute(chunk: Encoder, mode: str):
    """Activation recomputation from outside: "full" checkpoints whole blocks, "selective" only core
    attention (the S x S scores: most activation memory, little compute). Instance attributes shadow
    the methods, so parameter names do not change."""
    for block in chunk.layers.values():
        if mode == "full":
            block.forward = functools.partial(_checkpointed, block.forward)
        elif mode == "selective":
            block.attn.core_attention = functools.partial(_checkpointed, block.attn.core_attention)


def _checkpointed(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)


def check_model_layout(cfg: ModelConfig, dims: ParallelDims, precision: str, recompute: str):
    validate_model_parallel(cfg, dims.tp, dims.pp, dims.vpp)
    if precision not in DTYPES:
        raise ConfigError(f"precision {precision!r}; choose one of {', '.join(DTYPES)}")
    if recompute not in RECOMPUTE:
        raise ConfigError(f"recompute {recompute!r}; choose one of {', '.join(RECOMPUTE)}")
    if cfg.vocab_size <= 0:
        raise ConfigError("model.vocab_size must be resolved (from the tokenizer) before building the model")


def build_parallel_model(cfg: ModelConfig, dims: ParallelDims, seed: int = 0, device=None, precision: str = "fp32",
                         recompute: str = "none", sequence_parallel: bool = False,
                         bucket_size: int = DEFAULT_BUCKET_SIZE) -> ParallelModel:
    """This rank's chunks, initialised as the single-process model and sharded. On device "meta"
    only the structure and the parameter layout exist (memory estimates)."""
    check_model_layout(cfg, dims, precision, recompute)
    device = torch.device(device) if device is not None else dims.device
    tp = TPContext(dims.tp_rank, dims.tp, dims.tp_group, sequence_parallel and dims.tp > 1)
    chunks = [make_chunk(cfg, dims, v) for v in range(dims.vpp)]
    plans = [parallelize_chunk(chunk, cfg, tp) for chunk in chunks]
    model = ParallelModel(cfg, dims, chunks, [], tp.sequence_parallel, DTYPES[precision])
    model.infos = describe_params(model, plans)
    if device.type == "meta":
        return model
    model.grad_buffers = GradBuffers(model, model.infos, dims, device, DTYPES[precision], bucket_size)
    initialise(model.infos, cfg, seed)
    model.grad_buffers.register_hooks()
    for chunk in chunks:
        apply_recompute(chunk, recompute)
    return model
