"""The activation part of the memory plan (parallel/activations.py) against what a tiny model keeps
for backward in a real training forward (the decoder fused into the loss), on CPU: every tensor
autograd saves, counted once per storage, parameters excluded. The plan is a model of our layers,
not a replay; it must stay within 20% so that its warnings mean something."""

import pytest
import torch

from megatron_jp.config import Config
from megatron_jp.models.config import preset
from megatron_jp.parallel import ParallelDims, build_parallel_model
from megatron_jp.parallel.activations import CPU, head_bytes, stage_activation_bytes
from megatron_jp.parallel.memory import estimate_memory, memory_warning
from megatron_jp.parallel.step import micro_batch_loss, on_host
from megatron_jp.parallel.testing import synthetic_micro_batches

ONE = ParallelDims.layout(1, 1, 1)


def saved_activation_bytes(model, batch) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = model.forward_chunk(0, batch, model.attention_context(batch))
        micro_batch_loss(model, output)
    return sum(seen.values())


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("name", ["tiny", "tiny-modernbert", "tiny-bert"])
def test_activation_estimate_is_within_20_percent_of_what_a_tiny_model_saves(name, recompute, one_thread):
    cfg = Config(model=preset(name, vocab_size=512, num_layers=6 if name == "tiny-modernbert" else 4))
    cfg.data.seq_length, cfg.data.mask_prob = 128, 0.15
    cfg.train.micro_batch_size = cfg.train.global_batch_size = 4
    cfg.train.recompute = recompute
    model = build_parallel_model(cfg.model, ONE, recompute=recompute).train()
    batch, _ = on_host(synthetic_micro_batches(0, 1, 4, 128, 512, mask_prob=0.15)[0], varlen=False)
    measured = saved_activation_bytes(model, batch)
    plan = stage_activation_bytes(cfg, 0, 1, CPU)
    estimate = plan["total"] - plan["recompute"] - plan["loss_chunk"]  # transients, not held after forward
    print(f"{name} {recompute}: estimate {estimate:,.0f} vs saved {measured:,} ({estimate / measured - 1:+.1%})")
    assert abs(estimate - measured) <= 0.2 * measured, f"estimate {estimate:,.0f} vs saved {measured:,}"


def test_the_loss_chunk_bounds_the_logits_of_a_large_vocabulary():
    cfg = Config(model=preset("modernbert-ja-130m"))
    cfg.data.seq_length, cfg.train.micro_batch_size = 8192, 32
    part = head_bytes(cfg, 8192 * 32, 1, p=4)  # fp32 activations
    full_logits = 0.15 * 8192 * 32 * 102_400 * 4  # 16 GB; softmax and its gradient would triple it
    assert part["loss_chunk"] < 1e9 and part["loss_chunk"] < full_logits / 15


def test_the_plan_warns_naming_the_keys_when_it_exceeds_the_device():
    cfg = Config(model=preset("modernbert-ja-130m"))
    cfg.data.seq_length, cfg.train.micro_batch_size, cfg.train.global_batch_size = 8192, 32, 32
    cfg.train.precision = "bf16"
    assert memory_warning(cfg, 1) is not None and "train.micro_batch_size" in memory_warning(cfg, 1)
    cfg.train.micro_batch_size = cfg.train.global_batch_size = 2
    assert memory_warning(cfg, 1) is None
    need = estimate_memory(cfg, 1)
    assert 0 < need["activation_bytes"] < need["memory_per_rank_bytes"]
