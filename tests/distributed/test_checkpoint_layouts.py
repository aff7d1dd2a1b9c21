"""Checkpoints across layouts (world 4, gloo on CPU; the job is checkpoint_jobs.run): a checkpoint
written under one tensor/pipeline/data layout loads bit for bit into the same layout, into another
one with ZeRO-1, and into a single process; an asynchronous save taken while training goes on holds
the state of its step; the Hugging Face converter reads a checkpoint written by a tp=2 run.

Model and optimizer state are compared exactly: loading copies the saved bits into every piece. The
losses after resharding are compared with the single-process run at relative 1e-5 (fp32 summation
order differs between layouts, see test_parallel_training.py)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint_jobs
import parallel_jobs as jobs
from megatron_jp.parallel import assemble_full
from megatron_jp.parallel.testing import spawn
from megatron_jp.training.checkpoint import Checkpointer, find_latest, load_model_state

LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoints")
    spawn(checkpoint_jobs.run, 4, (str(out),), timeout_s=180)
    return out, torch.load(out / "results.pt")


def assert_equal_states(got: dict, want: dict, where: str = ""):
    assert got.keys() == want.keys(), where
    for name in want:
        if isinstance(want[name], dict):
            assert_equal_states(got[name], want[name], f"{where}{name}.")
        elif isinstance(want[name], torch.Tensor):
            assert torch.equal(got[name], want[name]), f"{where}{name}"
        else:
            assert got[name] == want[name], f"{where}{name}"


def load_into_one_process(iter_dir: Path) -> dict:
    """Load with a single-process model and optimizer; their full state as checkpoint_jobs.snapshot."""
    cfg, dims, model, optimizer = jobs.build({"model": "tiny"}, 0, 1)
    loaded = Checkpointer(iter_dir.parent, cfg, dims).load(iter_dir, model, optimizer)
    assert loaded.rank_state is None  # written by 4 ranks: no rank's state is this process's
    state = optimizer.sharded_state_dict()
    return {"model": model.full_state_dict(), "step": optimizer.step_count,
            "optim": {kind: {name: assemble_full(pieces) for name, pieces in state[kind].items()}
                      for kind in checkpoint_jobs.KINDS}}


def test_checkpoint_saved_under_tp2_pp2_reloads_in_the_same_layout_with_each_ranks_rank_state(world4):
    _, results = world4
    assert_equal_states(results["same_layout"], results["written"])
    assert all(rank["same_layout"] and rank["own_rank_state"] for rank in results["ranks"])


def test_checkpoint_saved_under_tp2_pp2_loads_into_pp2_dp2_zero1_bit_for_bit_and_trains_on_like_one_process(
        world4):
    _, results = world4
    assert_equal_states(results["other_layout"], results["written"])
    assert all(rank["weights_only"] and rank["other_layout"] for rank in results["ranks"])  # replicas too
    assert results["other_meta"] == {"step": checkpoint_jobs.SPLIT, "consumed_samples": checkpoint_jobs.SPLIT * 8}
    assert all(rank["other_rank_state"] is None for rank in results["ranks"])  # another layout
    reference = jobs.reference("tiny")["losses"]
    for i, step in enumerate(results["steps_after_resharding"], start=checkpoint_jobs.SPLIT):
        assert abs(step["loss"] - reference[i]) <= LOSS_RTOL * reference[i], f"step {i}"


def test_checkpoint_saved_under_tp2_pp2_loads_into_a_single_process_bit_for_bit(world4):
    out, results = world4
    assert_equal_states(load_into_one_process(find_latest(out / "tp2pp2")), results["written"])
    _, weights = load_model_state(out / "tp2pp2")
    assert_equal_states(weights, results["written"]["model"])


def test_async_save_taken_under_zero1_while_training_goes_on_holds_the_state_of_its_step(world4):
    out, results = world4
    iter_dir = find_latest(out / "pp2dp2")
    assert iter_dir.name == f"iter_{checkpoint_jobs.SPLIT + 1:07d}"
    assert_equal_states(load_into_one_process(iter_dir), results["async_written"])


def test_convert_to_hf_exports_a_checkpoint_written_by_a_tp2_run_exactly(world4, tmp_path, tool):
    out, results = world4
    assert tool("convert_to_hf")(["--checkpoint", str(out / "tp2pp2"), "--output", str(tmp_path / "hf")]) == 0
    assert load_file(tmp_path / "hf" / "model.safetensors")  # written, then read back as our weights:
    assert tool("convert_from_hf")(["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "back")]) == 0
    _, weights = load_model_state(tmp_path / "back")
    assert_equal_states(weights, results["written"]["model"])
