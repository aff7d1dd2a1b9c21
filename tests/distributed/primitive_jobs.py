"""Per-primitive parity checks, run in one 2-rank gloo job (tensor-parallel size 2).

Each check builds the unsharded module and its tensor-parallel counterpart from the same weights
(cut with the same ShardSpec the model builder uses), runs both on the same input and gradient, and
records (label, sharded result, expected slice of the unsharded result) pairs; the test module
asserts them. Every rank records its own shard, so both ranks are checked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_jp.config import Config
from megatron_jp.models.config import preset
from megatron_jp.models.attention import AttentionContext
from megatron_jp.models.encoder import MLP, Attention, Block, layer_windows
from megatron_jp.parallel.data_parallel import sum_model_parallel
from megatron_jp.parallel.dims import ParallelDims
from megatron_jp.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron_jp.parallel.loss import (linear_cross_entropy, vocab_parallel_argmax,
                                       vocab_parallel_cross_entropy)
from megatron_jp.parallel.mappings import split_seq
from megatron_jp.parallel.random import TensorParallelRandom
from megatron_jp.parallel.sharding import ShardSpec
from megatron_jp.parallel.tensor_parallel import (TPContext, even_pieces, sequence_parallel_norms, shard_attention,
                                                  shard_mlp)
from megatron_jp.parallel.testing import synthetic_micro_batches

TP = 2


def _spec(shape, pieces, dim):
    return ShardSpec("x", tuple(shape), dim, tuple(pieces))


def _columns(full_out: int, rank: int):
    return even_pieces([(0, full_out)], rank, TP)


def check_column_parallel_linear(dims, tp):
    torch.manual_seed(1)
    full = nn.Linear(16, 24)
    x = torch.randn(3, 5, 16, requires_grad=True)
    grad_y = torch.randn(3, 5, 24)
    full(x).backward(grad_y)
    w_spec, b_spec = _spec((24, 16), _columns(24, tp.rank), 0), _spec((24,), _columns(24, tp.rank), 0)
    layer = ColumnParallelLinear(16, 12, True, tp.group)
    layer.weight.data.copy_(w_spec.take(full.weight.data))
    layer.bias.data.copy_(b_spec.take(full.bias.data))
    x2 = x.detach().clone().requires_grad_()
    y2 = layer(x2)
    y2.backward(grad_y.chunk(TP, -1)[tp.rank])
    return [("output", y2, full(x).chunk(TP, -1)[tp.rank]), ("input grad", x2.grad, x.grad),
            ("weight grad", layer.weight.grad, w_spec.take(full.weight.grad)),
            ("bias grad", layer.bias.grad, b_spec.take(full.bias.grad))]


def check_row_parallel_linear(dims, tp):
    torch.manual_seed(2)
    full = nn.Linear(24, 16)
    x = torch.randn(3, 5, 24, requires_grad=True)
    grad_y = torch.randn(3, 5, 16)
    y = full(x)
    y.backward(grad_y)
    w_spec = _spec((16, 24), _columns(24, tp.rank), 1)
    layer = RowParallelLinear(12, 16, True, tp.group, rank=tp.rank)
    layer.weight.data.copy_(w_spec.take(full.weight.data))
    if tp.rank == 0:  # the bias lives on rank 0 only (added once, before the reduction)
        layer.bias.data.copy_(full.bias.data)
    x2 = x.detach().chunk(TP, -1)[tp.rank].clone().requires_grad_()
    y2 = layer(x2)
    y2.backward(grad_y)
    bias = [("bias grad", layer.bias.grad, full.bias.grad)] if tp.rank == 0 else []
    return [("output", y2, y), ("input grad", x2.grad, x.grad.chunk(TP, -1)[tp.rank]),
            ("weight grad", layer.weight.grad, w_spec.take(full.weight.grad))] + bias


def check_vocab_parallel_embedding(dims, tp):
    torch.manual_seed(3)
    full = nn.Embedding(128, 16)
    ids = torch.randint(0, 128, (4, 9))
    grad_y = torch.randn(4, 9, 16)
    y = full(ids)
    y.backward(grad_y)
    spec = _spec((128, 16), _columns(128, tp.rank), 0)
    layer = VocabParallelEmbedding(64, 16, spec.pieces[0].full_start, tp.group)
    layer.weight.data.copy_(spec.take(full.weight.data))
    y2 = layer(ids)
    y2.backward(grad_y)
    return [("output", y2, y), ("weight grad", layer.weight.grad, spec.take(full.weight.grad))]


def check_vocab_parallel_cross_entropy(dims, tp):
    torch.manual_seed(4)
    logits = (3 * torch.randn(37, 128)).requires_grad_()
    targets = torch.randint(0, 128, (37,))
    weights = torch.rand(37)  # a per-token weighting makes every row's gradient scale distinct
    loss = F.cross_entropy(logits, targets, reduction="none")
    (loss * weights).sum().backward()
    local = logits.detach().chunk(TP, -1)[tp.rank].clone().requires_grad_()
    loss2 = vocab_parallel_cross_entropy(local, targets, 64 * tp.rank, tp.group)
    (loss2 * weights).sum().backward()
    argmax = vocab_parallel_argmax(local.detach(), 64 * tp.rank, tp.group)
    return [("per-token loss", loss2, loss), ("logits grad", local.grad, logits.grad.chunk(TP, -1)[tp.rank]),
            ("argmax", argmax, logits.detach().argmax(-1))]


def check_vocab_parallel_linear_cross_entropy(dims, tp):
    """The chunked, fused decoder + loss on a vocabulary-parallel decoder against the whole one."""
    torch.manual_seed(9)
    x = torch.randn(37, 16, requires_grad=True)
    w = (0.3 * torch.randn(128, 16)).requires_grad_()
    b = (0.1 * torch.randn(128)).requires_grad_()
    targets = torch.randint(0, 128, (37,))
    targets[::5] = -100
    valid = targets != -100
    loss = F.cross_entropy(F.linear(x, w, b)[valid], targets[valid], reduction="sum")
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    w2 = w.detach().chunk(TP, 0)[tp.rank].clone().requires_grad_()
    b2 = b.detach().chunk(TP, 0)[tp.rank].clone().requires_grad_()
    loss2 = linear_cross_entropy(x2, w2, b2, targets, 64 * tp.rank, tp.group, chunk=8)
    loss2.backward()
    return [("loss", loss2, loss), ("input grad", x2.grad, x.grad),
            ("weight grad", w2.grad, w.grad.chunk(TP, 0)[tp.rank]), ("bias grad", b2.grad, b.grad.chunk(TP, 0)[tp.rank])]


def _context(cfg, seed=5):
    batch = synthetic_micro_batches(seed, 1, 2, 16, cfg.vocab_size)[0]
    return AttentionContext.build(batch["input_ids"].shape, "cpu", batch["segment_ids"], batch["position_ids"],
                                  windows=layer_windows(cfg))


def _shard_params(module: nn.Module, full: nn.Module, plans: dict):
    """Copy the full module's weights into the sharded one, cut by the builder's plans."""
    full_params = dict(full.named_parameters())
    specs = {}
    for name, param in module.named_parameters():
        plan = plans.get(name)
        spec = ShardSpec(name, tuple(full_params[name].shape), None if plan is None else plan.dim,
                         () if plan is None else plan.pieces)
        param.data.copy_(full_params[name].data if spec.dim is None else spec.take(full_params[name].data))
        specs[name] = (spec, () if plan is None else plan.reductions)
    return specs


def _grads_after_reductions(module, specs, dims):
    """Apply the builder's extra gradient sums (KV replicas, sequence-parallel norms) by hand."""
    found = {}
    for name, param in module.named_parameters():
        for r in specs[name][1]:
            flat = param.grad.view(-1)
            view = flat[r.start:r.end] if r.kind == "kv" else flat
            found.setdefault(r.kind, []).append((view, r))
    sum_model_parallel(found, dims)


def _compare_grads(module, full, specs):
    full_params = dict(full.named_parameters())
    out = []
    for name, param in module.named_parameters():
        spec = specs[name][0]
        expected = full_params[name].grad
        out.append((f"{name} grad", param.grad, expected if spec.dim is None else spec.take(expected)))
    return out


def check_attention(dims, tp, kv_heads: int):
    cfg = preset("tiny", vocab_size=128, num_kv_heads=kv_heads)
    torch.manual_seed(6)
    full = Attention(cfg, 0)
    for p in full.parameters():
        nn.init.normal_(p, std=0.1)
    ctx = _context(cfg)
    x = torch.randn(2, 16, cfg.hidden_size, requires_grad=True)
    grad_y = torch.randn(2, 16, cfg.hidden_size)
    y = full(x, ctx)
    y.backward(grad_y)
    sharded = Attention(cfg, 0)
    plans = shard_attention(sharded, cfg, tp, 0)
    specs = _shard_params(sharded, full, {k.removeprefix("layers.0.attn."): v for k, v in plans.items()})
    x2 = x.detach().clone().requires_grad_()
    y2 = sharded(x2, ctx)
    y2.backward(grad_y)
    _grads_after_reductions(sharded, specs, dims)
    return [("output", y2, y), ("input grad", x2.grad, x.grad)] + _compare_grads(sharded, full, specs)


def check_glu_mlp(dims, tp, name: str):
    cfg = preset(name, vocab_size=128)
    torch.manual_seed(7)
    full = MLP(cfg)
    for p in full.parameters():
        nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 16, cfg.hidden_size, requires_grad=True)
    grad_y = torch.randn(2, 16, cfg.hidden_size)
    y = full(x)
    y.backward(grad_y)
    sharded = MLP(cfg)
    plans = shard_mlp(sharded, cfg, tp, "")
    specs = _shard_params(sharded, full, {k.lstrip("."): v for k, v in plans.items()})
    x2 = x.detach().clone().requires_grad_()
    y2 = sharded(x2)
    y2.backward(grad_y)
    return [("output", y2, y), ("input grad", x2.grad, x.grad)] + _compare_grads(sharded, full, specs)


def check_sequence_parallel_block(dims, tp, name: str):
    """A whole block with sequence parallelism: norms on 1/tp of the sequence, all-gather before the
    column-parallel matmuls, reduce-scatter after the row-parallel ones."""
    cfg = preset(name, vocab_size=128)
    sp = TPContext(tp.rank, tp.size, tp.group, sequence_parallel=True)
    torch.manual_seed(8)
    full = Block(cfg, 1)
    for p in full.parameters():
        nn.init.normal_(p, mean=1.0 if p.dim() == 1 else 0.0, std=0.1)
    ctx = _context(cfg)
    x = torch.randn(2, 16, cfg.hidden_size, requires_grad=True)
    grad_y = torch.randn(2, 16, cfg.hidden_size)
    y = full(x, ctx)
    y.backward(grad_y)
    holder = nn.Module()
    holder.layers = nn.ModuleDict({"1": Block(cfg, 1)})
    holder.final_norm, holder.embeddings, holder.head = None, None, None
    plans = {**shard_attention(holder.layers["1"].attn, cfg, sp, 1),
             **shard_mlp(holder.layers["1"].mlp, cfg, sp, "layers.1.mlp"), **sequence_parallel_norms(holder, sp)}
    block = holder.layers["1"]
    specs = _shard_params(block, full, {k[len("layers.1."):]: v for k, v in plans.items()})
    x2 = split_seq(x.detach(), tp.group).requires_grad_()
    y2 = block(x2, ctx)
    y2.backward(split_seq(grad_y, tp.group))
    _grads_after_reductions(block, specs, dims)
    return [("output", y2, split_seq(y, tp.group)), ("input grad", x2.grad, split_seq(x.grad, tp.group))] \
        + _compare_grads(block, full, specs)


def check_dropout_rng(dims, tp):
    """Tensor-parallel peers share a seed: outside a tensor-parallel region they draw the same
    dropout masks, inside it (parallel.random) different ones, and they leave it in the same state."""
    torch.manual_seed(11)
    dropout = TensorParallelRandom(nn.Dropout(0.5), tp.rank)
    inside = dropout(torch.ones(256))
    outside = nn.functional.dropout(torch.ones(256), 0.5)
    peers = [torch.empty_like(inside) for _ in range(TP)], [torch.empty_like(outside) for _ in range(TP)]
    torch.distributed.all_gather(peers[0], inside, group=tp.group)
    torch.distributed.all_gather(peers[1], outside, group=tp.group)
    differ, same = not torch.equal(*peers[0]), torch.equal(*peers[1])
    return [("masks differ inside the region", torch.tensor(differ), torch.tensor(True)),
            ("masks agree outside it", torch.tensor(same), torch.tensor(True))]


CHECKS = {
    "column_parallel_linear": check_column_parallel_linear,
    "row_parallel_linear": check_row_parallel_linear,
    "vocab_parallel_embedding": check_vocab_parallel_embedding,
    "vocab_parallel_cross_entropy": check_vocab_parallel_cross_entropy,
    "vocab_parallel_linear_cross_entropy": check_vocab_parallel_linear_cross_entropy,
    "attention_gqa_kv_split": lambda dims, tp: check_attention(dims, tp, kv_heads=2),
    "attention_gqa_kv_replicated": lambda dims, tp: check_attention(dims, tp, kv_heads=1),
    "swiglu_mlp": lambda dims, tp: check_glu_mlp(dims, tp, "tiny"),
    "geglu_mlp": lambda dims, tp: check_glu_mlp(dims, tp, "tiny-modernbert"),
    "sequence_parallel_block_rmsnorm": lambda dims, tp: check_sequence_parallel_block(dims, tp, "tiny"),
    "sequence_parallel_block_layernorm_window": lambda dims, tp: check_sequence_parallel_block(
        dims, tp, "tiny-modernbert"),
    "dropout_rng": check_dropout_rng,
}


def primitives_job(rank: int, world: int, out_dir: str):
    cfg = Config()
    cfg.model = preset("tiny", vocab_size=128)
    cfg.parallel.tensor = TP
    cfg.train.global_batch_size = cfg.train.micro_batch_size = 2
    dims = ParallelDims.from_config(cfg, world, rank)
    tp = TPContext(dims.tp_rank, dims.tp, dims.tp_group, sequence_parallel=False)
    results = {}
    for name, check in CHECKS.items():
        results[name] = [(label, got.detach().clone(), want.detach().clone()) for label, got, want in check(dims, tp)]
    torch.save(results, f"{out_dir}/primitives_rank{rank}.pt")

