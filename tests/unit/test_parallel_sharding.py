"""Shard layouts: over all ranks of a layout, the unique pieces of every parameter tile its full
tensor exactly once, and every rank's local tensor is its pieces of the full one."""

import math

import pytest
import torch

from megatron_jp.models.config import preset
from megatron_jp.parallel.dims import ParallelDims
from megatron_jp.parallel.model import build_parallel_model, full_shapes


def _layout_infos(cfg, tp, pp, vpp=1, sp=False):
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            dims = ParallelDims.layout(tp=tp, pp=pp, dp=1, vpp=vpp, rank=pp_rank * tp + tp_rank)
            yield dims, build_parallel_model(cfg, dims, device="meta", sequence_parallel=sp).infos


@pytest.mark.parametrize("name, kv, tp, pp, vpp", [
    ("tiny", 0, 2, 1, 1), ("tiny", 0, 4, 2, 1), ("tiny", 1, 2, 2, 2), ("tiny", 1, 4, 1, 1),
    ("tiny-modernbert", 0, 2, 2, 3), ("tiny-modernbert", 0, 4, 1, 1), ("tiny-bert", 0, 2, 2, 1),
])
def test_unique_pieces_tile_every_full_tensor_exactly_once(name, kv, tp, pp, vpp):
    cfg = preset(name, vocab_size=128, **({"num_kv_heads": kv} if kv else {}))
    coverage = {n: torch.zeros(s, dtype=torch.int32) for n, s in full_shapes(cfg).items()}
    for _, infos in _layout_infos(cfg, tp, pp, vpp, sp=True):
        for info in infos:
            assert tuple(info.param.shape) == info.spec.local_shape
            for piece in info.spec.pieces:
                if piece.unique:
                    coverage[info.spec.full_name][info.spec.blocks(piece)[1]] += 1
    for full_name, count in coverage.items():
        assert torch.all(count == 1), f"{full_name}: covered {count.min()}..{count.max()} times"


def test_kv_heads_replicated_over_tensor_ranks_hold_the_head_their_query_heads_use():
    cfg = preset("tiny", vocab_size=128, num_kv_heads=1)  # 4 query heads, 1 KV head, tp = 4
    d = cfg.head_dim
    full = torch.arange(math.prod((6 * d, 64))).view(6 * d, 64).float()
    for dims, infos in _layout_infos(cfg, tp=4, pp=1):
        qkv = next(i for i in infos if i.local_name == "layers.0.attn.qkv.weight")
        local = qkv.spec.take(full)
        assert torch.equal(local[:d], full[dims.tp_rank * d:(dims.tp_rank + 1) * d])  # own query head
        assert torch.equal(local[d:], full[4 * d:])  # the one K and V head
        assert [p.unique for p in qkv.spec.pieces] == [True, dims.tp_rank == 0, dims.tp_rank == 0]
        assert any(r.kind == "kv" for r in qkv.reductions)


def test_glu_fc1_shard_holds_matching_gate_and_up_rows():
    cfg = preset("tiny", vocab_size=128)
    ffn = cfg.ffn_hidden_size
    full = torch.arange(2 * ffn).float().unsqueeze(1).expand(2 * ffn, 64)
    for dims, infos in _layout_infos(cfg, tp=2, pp=1):
        fc1 = next(i for i in infos if i.local_name == "layers.0.mlp.fc1.weight")
        rows = fc1.spec.take(full)[:, 0].long()
        half = ffn // 2
        gate = torch.arange(dims.tp_rank * half, (dims.tp_rank + 1) * half)
        assert torch.equal(rows, torch.cat([gate, gate + ffn]))


def test_tied_decoder_on_the_last_stage_is_a_non_unique_copy_of_the_embedding():
    cfg = preset("tiny-modernbert", vocab_size=128)
    for dims, infos in _layout_infos(cfg, tp=1, pp=2):
        tied = [i for i in infos if i.spec.full_name == "embeddings.tok.weight"]
        assert len(tied) == 1 and [r.kind for r in tied[0].reductions] == ["embedding"]
        assert tied[0].spec.pieces[0].unique == dims.is_first_stage
        assert tied[0].local_name == ("embeddings.tok.weight" if dims.is_first_stage else "head.decoder.weight")
