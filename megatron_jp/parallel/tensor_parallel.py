"""Tensor and sequence parallelism applied to an Encoder chunk from outside (torchtitan's
parallelize(model) split): modules are swapped for their parallel counterparts with local shapes
(the fused QKV projection for a column-parallel linear of this rank's heads), and the two sequence-parallel boundary
collectives that have no module of their own (after the embedding, before the head) run as forward
hooks. models/encoder.py stays free of process groups.

Runs on a meta-device chunk; parameters are materialised afterwards (parallel/model.py). Returns, per
local parameter name, how its local tensor maps to the full one (dimension, pieces) and which extra
gradient reductions it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from megatron_jp.models.config import ModelConfig
from megatron_jp.models.encoder import TIED_DECODER, TIED_EMBEDDING, Encoder
from megatron_jp.models.linear import linear
from megatron_jp.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron_jp.parallel.mappings import (gather_from_sequence_parallel_region,
                                           scatter_to_sequence_parallel_region)
from megatron_jp.parallel.random import fork_dropout_rng
from megatron_jp.parallel.sharding import GradReduction, Piece

TP_SUM = GradReduction("tp")


@dataclass(frozen=True)
class TPPlan:
    dim: int | None
    pieces: tuple[Piece, ...]
    reductions: tuple[GradReduction, ...] = ()


@dataclass(frozen=True)
class TPContext:
    rank: int
    size: int
    group: object
    sequence_parallel: bool


def even_pieces(parts: list[tuple[int, int]], rank: int, size: int) -> tuple[Piece, ...]:
    """Each (full_start, length) part split evenly: this rank's 1/size of every part, back to back."""
    pieces, local = [], 0
    for start, length in parts:
        share = length // size
        pieces.append(Piece(local, start + rank * share, share))
        local += share
    return tuple(pieces)


def qkv_pieces(cfg: ModelConfig, rank: int, size: int) -> tuple[Piece, ...]:
    """[q; k; v] rows of this rank. Query heads are split evenly. Key/value heads are split evenly
    when size divides them; with more ranks than KV heads, rank r holds KV head r // (size / kv), the
    one its query heads attend with, replicated on size / kv ranks (the first of them is unique)."""
    nq, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if kv % size == 0:
        return even_pieces([(0, nq * d), (nq * d, kv * d), ((nq + kv) * d, kv * d)], rank, size)
    q = even_pieces([(0, nq * d)], rank, size)[0]
    replicas = size // kv
    head, unique = rank // replicas, rank % replicas == 0
    k = Piece(q.length, (nq + head) * d, d, unique)
    v = Piece(q.length + d, (nq + kv + head) * d, d, unique)
    return q, k, v


def kv_reduction(cfg: ModelConfig, rank: int, size: int, row: int) -> tuple[GradReduction, ...]:
    """The gradient sum over the ranks sharing a replicated KV head (each saw only its query heads)."""
    kv, d = cfg.num_kv_heads, cfg.head_dim
    if kv % size == 0:
        return ()
    q_rows = cfg.num_heads // size * d
    return (GradReduction("kv", q_rows * row, (q_rows + 2 * d) * row, rank // (size // kv), kv),)


def shard_attention(attn: nn.Module, cfg: ModelConfig, tp: TPContext, layer: int) -> dict[str, TPPlan]:
    """The fused QKV projection keeps this rank's rows of [q; k; v] (qkv_pieces) and the attention its
    head counts; the output projection takes those heads' columns."""
    prefix = f"layers.{layer}.attn"
    d, hidden = cfg.head_dim, cfg.hidden_size
    attn.n_heads, attn.n_kv_heads = cfg.num_heads // tp.size, max(cfg.num_kv_heads // tp.size, 1)
    rows = (attn.n_heads + 2 * attn.n_kv_heads) * d
    attn.qkv = linear(hidden, rows, cfg.qkv_bias, ColumnParallelLinear, group=tp.group,
                      sequence_parallel=tp.sequence_parallel)
    attn.out = _row_parallel(attn.n_heads * d, hidden, cfg.attn_out_bias, tp)
    pieces = qkv_pieces(cfg, tp.rank, tp.size)
    plans = {f"{prefix}.qkv.weight": TPPlan(0, pieces, kv_reduction(cfg, tp.rank, tp.size, hidden)),
             f"{prefix}.out.weight": TPPlan(1, even_pieces([(0, cfg.num_heads * d)], tp.rank, tp.size))}
    if cfg.qkv_bias:
        plans[f"{prefix}.qkv.bias"] = TPPlan(0, pieces, kv_reduction(cfg, tp.rank, tp.size, 1))
    return plans


def _row_parallel(in_local: int, out: int, bias: bool, tp: TPContext) -> nn.Linear:
    """A row-parallel linear; its bias (rank 0 only, parallel/layers.py) needs no plan: replicated,
    unique on rank 0 and complete there."""
    return linear(in_local, out, bias, RowParallelLinear, group=tp.group, sequence_parallel=tp.sequence_parallel,
                  rank=tp.rank)


def shard_mlp(mlp: nn.Module, cfg: ModelConfig, tp: TPContext, prefix: str) -> dict[str, TPPlan]:
    """fc1 is [activated half; linear half]: each rank takes the matching 1/tp of both halves, so
    glu(local fc1 output) is exactly the local slice of the full activation."""
    ffn, local = cfg.ffn_hidden_size, cfg.ffn_hidden_size // tp.size
    parts = [(0, ffn), (ffn, ffn)] if cfg.gated else [(0, ffn)]
    mlp.fc1 = linear(cfg.hidden_size, local * len(parts), cfg.mlp_bias, ColumnParallelLinear, group=tp.group,
                     sequence_parallel=tp.sequence_parallel)
    mlp.fc2 = _row_parallel(local, cfg.hidden_size, cfg.mlp_bias, tp)
    fc1 = TPPlan(0, even_pieces(parts, tp.rank, tp.size))
    plans = {f"{prefix}.fc1.weight": fc1, f"{prefix}.fc2.weight": TPPlan(1, even_pieces([(0, ffn)], tp.rank, tp.size))}
    if cfg.mlp_bias:
        plans[f"{prefix}.fc1.bias"] = fc1
    return plans


def _replicated_sp(tp: TPContext) -> TPPlan:
    """A replicated parameter inside a sequence-parallel region: its gradient covers 1/tp of the
    sequence on each rank and is summed over the group."""
    return TPPlan(None, (Piece(0, 0, 0, tp.rank == 0),), (TP_SUM,))


def vocab_pieces(cfg: ModelConfig, tp: TPContext) -> tuple[Piece, ...]:
    return even_pieces([(0, cfg.vocab_size)], tp.rank, tp.size)


def shard_embeddings(chunk: Encoder, cfg: ModelConfig, tp: TPContext) -> dict[str, TPPlan]:
    """Vocabulary-parallel token table. Positions, token types and the embedding norm stay
    replicated and run on the whole sequence; with sequence parallelism the output is then split."""
    pieces = vocab_pieces(cfg, tp)
    emb = chunk.embeddings
    emb.tok = VocabParallelEmbedding(pieces[0].length, cfg.hidden_size, pieces[0].full_start, tp.group)
    if tp.sequence_parallel:
        emb.register_forward_hook(lambda module, args, out: scatter_to_sequence_parallel_region(out, tp.group))
    return {TIED_EMBEDDING: TPPlan(0, pieces)}


def shard_head(chunk: Encoder, cfg: ModelConfig, tp: TPContext) -> dict[str, TPPlan]:
    """Vocabulary-parallel decoder; its input passes f, so the transform (dense, norm) before it sees
    whole gradients and stays replicated. With sequence parallelism the sequence is gathered before
    the head (its gradient is then split back, not reduced: it is already whole)."""
    pieces = vocab_pieces(cfg, tp)
    head = chunk.head
    head.decoder = linear(cfg.hidden_size, pieces[0].length, cfg.decoder_bias, ColumnParallelLinear, group=tp.group)
    chunk.tie_weights()
    if tp.sequence_parallel:
        last = chunk.final_norm if chunk.final_norm is not None else list(chunk.layers.values())[-1]
        last.register_forward_hook(lambda module, args, out: gather_from_sequence_parallel_region(
            out, tp.group, tensor_parallel_output_grad=False))
    plans = {TIED_DECODER: TPPlan(0, pieces)}
    if cfg.decoder_bias:
        plans["head.decoder.bias"] = TPPlan(0, pieces)
    return plans


def sequence_parallel_norms(chunk: Encoder, tp: TPContext) -> dict[str, TPPlan]:
    """Norms of the blocks and the final norm run on 1/tp of the sequence under sequence parallelism."""
    plans = {}
    if not tp.sequence_parallel:
        return plans
    for key, block in chunk.layers.items():
        for norm in ("attn_norm", "mlp_norm"):
            for pname, _ in getattr(block, norm).named_parameters():
                plans[f"layers.{key}.{norm}.{pname}"] = _replicated_sp(tp)
    if chunk.final_norm is not None:
        for pname, _ in chunk.final_norm.named_parameters():
            plans[f"final_norm.{pname}"] = _replicated_sp(tp)
    return plans


def parallelize_chunk(chunk: Encoder, cfg: ModelConfig, tp: TPContext) -> dict[str, TPPlan]:
    """Swap the chunk's modules for tensor-parallel ones; the plans of the sharded parameters (the
    others are replicated with identical gradients on every tensor-parallel rank)."""
    plans: dict[str, TPPlan] = {}
    if chunk.embeddings is not None:
        plans.update(shard_embeddings(chunk, cfg, tp))
    for key, block in chunk.layers.items():
        plans.update(shard_attention(block.attn, cfg, tp, int(key)))
        plans.update(shard_mlp(block.mlp, cfg, tp, f"layers.{key}.mlp"))
        fork_dropout_rng(block, cfg, tp.rank, tp.size, tp.sequence_parallel)
    if chunk.head is not None:
        plans.update(shard_head(chunk, cfg, tp))
    plans.update(sequence_parallel_norms(chunk, tp))
    return plans
