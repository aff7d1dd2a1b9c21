"""Async checkpoint staging on a GPU: pinned host buffers allocated at the first save and reused, the
copies complete before save() returns, and the save costs no device memory beyond one piece."""

import torch

from megatron_jp.config import Config
from megatron_jp.models.config import preset
from megatron_jp.parallel import ParallelDims, build_optimizer, build_parallel_model, train_step
from megatron_jp.parallel.testing import synthetic_micro_batches
from megatron_jp.training.checkpoint import Checkpointer, find_latest


def test_async_saves_stage_into_pinned_buffers_allocated_once_and_load_back_exactly(tmp_path):
    cfg = Config(model=preset("tiny", vocab_size=256, hidden_size=64, num_layers=2))
    dims = ParallelDims.layout(1, 1, 1, device="cuda")
    model = build_parallel_model(cfg.model, dims, seed=1)
    optimizer = build_optimizer(model, cfg.optim, dims)
    step = lambda s: train_step(model, optimizer, synthetic_micro_batches(s, 1, 2, 16, 256), dims, 1e-3)  # noqa: E731
    step(0)
    saver = Checkpointer(tmp_path, cfg, dims, async_save=True)
    saver.save(1, model, optimizer, meta={"step": 1})
    buffers = dict(saver._staging.buffers)
    assert buffers and all(b.is_pinned() and b.device.type == "cpu" for b in buffers.values())
    expected = model.full_state_dict()
    step(1)  # changes the weights while the write runs: the staged copy is what gets written
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    saver.save(2, model, optimizer, meta={"step": 2})
    assert torch.cuda.max_memory_allocated() - before < 16 << 20  # no device copy of the state
    assert all(saver._staging.buffers[k].data_ptr() == b.data_ptr() for k, b in buffers.items())
    saver.wait()
    restored = build_parallel_model(cfg.model, dims, seed=7)
    saver.load(tmp_path / "iter_0000001", restored)
    got = restored.full_state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert find_latest(tmp_path).name == "iter_0000002"
