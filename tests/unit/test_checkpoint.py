"""Checkpointer in one process: exact round trips, publishing (keep-N, stale folders, a kill during a
save), async saves, the refusal of damaged or foreign checkpoints, and tools/average_checkpoints.py.
Layout changes are tested in tests/distributed/test_checkpoint_layouts.py."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_jp.config import Config, OptimConfig
from megatron_jp.models.config import preset
from megatron_jp.models.encoder import build_encoder
from megatron_jp.parallel import (ParallelDims, assemble_full, build_optimizer, build_parallel_model,
                                  train_step)
from megatron_jp.precision import Precision
from megatron_jp.parallel.testing import synthetic_micro_batches
from megatron_jp.training.checkpoint import (CheckpointError, Checkpointer, find_latest, load_model_state,
                                             save_model_checkpoint)

ROOT = Path(__file__).resolve().parents[2]
ONE = ParallelDims.layout(1, 1, 1)
VOCAB, LR = 128, 1e-2


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**model) -> Config:
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, **model)
    return Config(model=preset("tiny", **fields), optim=OptimConfig(lr=LR, weight_decay=0.01))


def build(cfg: Config, precision="fp32", seed=1):
    model = build_parallel_model(cfg.model, ONE, seed=seed, precision=Precision.decode(precision))
    return model, build_optimizer(model, cfg.optim, ONE)


def train(model, optimizer, steps):
    for s in steps:
        train_step(model, optimizer, synthetic_micro_batches(s, 2, 2, 16, VOCAB), ONE, LR)


def optimizer_state(optimizer) -> dict:
    """Full tensors of the optimizer state (one process: every piece is primary)."""
    state = optimizer.sharded_state_dict()
    return {kind: {name: assemble_full(pieces) for name, pieces in state[kind].items()}
            for kind in ("master", "exp_avg", "exp_avg_sq")}


def assert_equal_states(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], dict):
            assert_equal_states(a[name], b[name])
        else:
            assert torch.equal(a[name], b[name]), name


@pytest.fixture
def saved(tmp_path):
    """A trained tiny model saved at step 2 into tmp_path/ckpt: (cfg, iteration folder)."""
    cfg = tiny_config()
    model, optimizer = build(cfg)
    train(model, optimizer, range(2))
    Checkpointer(tmp_path / "ckpt", cfg, ONE).save(2, model, optimizer, meta={"step": 2})
    return cfg, tmp_path / "ckpt" / "iter_0000002"


def load_into_fresh(cfg, iter_dir, with_optimizer=True):
    model, optimizer = build(cfg, seed=7)
    return Checkpointer(iter_dir.parent, cfg, ONE).load(iter_dir, model, optimizer if with_optimizer else None)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8"])
def test_checkpoint_round_trip_restores_model_and_optimizer_bit_for_bit_and_training_continues_identically(
        tmp_path, precision):
    cfg = tiny_config()
    model, optimizer = build(cfg, precision)
    train(model, optimizer, range(2))
    rank_state = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "epoch": 1}
    meta = {"step": 2, "consumed_samples": 8, "skipped_steps": 0}
    Checkpointer(tmp_path, cfg, ONE).save(2, model, optimizer, meta=meta, rank_state=rank_state)

    restored, restored_optimizer = build(cfg, precision, seed=7)
    loaded = Checkpointer(tmp_path, cfg, ONE).load(find_latest(tmp_path), restored, restored_optimizer)
    assert loaded.meta == meta and loaded.optimizer_step == 2 and restored_optimizer.step_count == 2
    assert torch.equal(loaded.rank_state["torch_rng"], rank_state["torch_rng"])
    assert loaded.rank_state["python_rng"] == rank_state["python_rng"] and loaded.config == cfg
    assert_equal_states(restored.full_state_dict(), model.full_state_dict())
    assert_equal_states(optimizer_state(restored_optimizer), optimizer_state(optimizer))
    train(model, optimizer, [2])
    train(restored, restored_optimizer, [2])  # bias correction, moments and master all restored
    assert_equal_states(restored.full_state_dict(), model.full_state_dict())


def test_fp32_checkpoint_stores_no_master_copy_and_bf16_does_and_a_tied_decoder_is_stored_once(tmp_path):
    from megatron_jp.training.checkpoint.dcp_pieces import saved_shapes

    cfg = tiny_config(tie_embeddings=True)
    for precision in ("fp32", "bf16"):
        model, optimizer = build(cfg, precision)
        Checkpointer(tmp_path / precision, cfg, ONE).save(0, model, optimizer)
        keys = saved_shapes(tmp_path / precision / "iter_0000000")
        assert any(k.startswith("optim.master.") for k in keys) == (precision == "bf16")
        assert "model.embeddings.tok.weight" in keys and "model.head.decoder.weight" not in keys


def test_async_save_publishes_on_wait_the_weights_of_the_moment_save_was_called(tmp_path):
    cfg = tiny_config()
    model, optimizer = build(cfg)
    train(model, optimizer, range(1))
    expected = model.full_state_dict()
    saver = Checkpointer(tmp_path, cfg, ONE, async_save=True)
    saver.save(1, model, optimizer, meta={"step": 1})
    train(model, optimizer, [1])  # training goes on while the write runs
    saver.wait()
    assert find_latest(tmp_path).name == "iter_0000001"
    restored, _ = build(cfg, seed=7)
    saver.load(find_latest(tmp_path), restored)
    assert_equal_states(restored.full_state_dict(), expected)
    saver.save(2, model, optimizer, meta={"step": 2})
    saver.save(3, model, optimizer, meta={"step": 3})  # publishes step 2 first
    assert find_latest(tmp_path).name == "iter_0000002"
    saver.wait()
    assert find_latest(tmp_path).name == "iter_0000003"


def test_model_only_checkpoint_loads_weights_and_asks_for_reset_optimizer_when_given_an_optimizer(tmp_path):
    cfg = tiny_config()
    weights = build_encoder(cfg.model, seed=3).state_dict()
    folder = save_model_checkpoint(tmp_path, 0, cfg, weights)
    loaded = load_into_fresh(cfg, folder, with_optimizer=False)
    assert loaded.rank_state is None and loaded.optimizer_step is None
    with pytest.raises(CheckpointError, match="reset_optimizer"):
        load_into_fresh(cfg, folder)


def test_a_model_config_with_the_same_shapes_loads(saved):
    cfg, folder = saved
    other = tiny_config(rope_theta=500_000.0)  # a new phase may change the RoPE base or seq_length
    loaded = load_into_fresh(other, folder)
    assert loaded.config.model.rope_theta == cfg.model.rope_theta


def test_rank_state_that_weights_only_loading_would_refuse_is_rejected_when_saving(tmp_path):
    cfg = tiny_config()
    model, optimizer = build(cfg)
    with pytest.raises(TypeError, match=r"rank_state\['numpy_rng'\]\[1\] is a ndarray"):
        Checkpointer(tmp_path, cfg, ONE).save(0, model, optimizer, rank_state={"numpy_rng": np.random.get_state()})
    assert find_latest(tmp_path) is None


# ----------------------------------------------------------------------------- publishing


def test_keep_prunes_all_but_the_newest_iterations_and_latest_names_the_last(tmp_path):
    cfg = tiny_config()
    model, optimizer = build(cfg)
    (tmp_path / "iter_backup").mkdir()  # not an iteration folder: pruning leaves it alone
    saver = Checkpointer(tmp_path, cfg, ONE, keep=2)
    for step in (1, 2, 3):
        saver.save(step, model, optimizer, meta={"step": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "iter_0000003", "iter_backup", "latest"]
    assert find_latest(tmp_path) == tmp_path / "iter_0000003"
    keep_all = Checkpointer(tmp_path, cfg, ONE, keep=0)
    keep_all.save(4, model, optimizer)
    assert len(list(tmp_path.glob("iter_0*"))) == 3


def test_saving_a_step_again_replaces_its_folder(tmp_path):
    cfg = tiny_config()
    model, optimizer = build(cfg)
    saver = Checkpointer(tmp_path, cfg, ONE)
    saver.save(1, model, optimizer, meta={"run": "first"})
    saver.save(1, model, optimizer, meta={"run": "second"})
    assert saver.load(find_latest(tmp_path), model, optimizer).meta == {"run": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest"]


def test_stale_tmp_folders_are_removed_by_the_next_save(tmp_path):
    cfg = tiny_config()
    model, optimizer = build(cfg)
    (tmp_path / ".iter_0000005.tmp" / "rank_state").mkdir(parents=True)
    (tmp_path / ".iter_0000005.tmp" / "__0_0.distcp").write_bytes(b"half")
    Checkpointer(tmp_path, cfg, ONE).save(6, model, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000006", "latest"]


@pytest.mark.parametrize("where", ["write", "publish"])
def test_a_save_killed_midway_leaves_latest_on_the_previous_checkpoint_which_loads(tmp_path, where):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "stalled"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "unit" / "slow_saver.py"), str(ckpt),
                             str(marker), where], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the saver never reached its slow point: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stderr.close()
    assert (ckpt / "latest").read_text().strip() == "iter_0000001"
    left = {"write": ".iter_0000002.tmp", "publish": "iter_0000002"}[where]  # half-written / not yet latest
    assert (ckpt / left).is_dir()
    cfg = tiny_config()
    assert load_into_fresh(cfg, find_latest(ckpt)).meta == {"step": 1}
    model, optimizer = build(cfg)
    resumed = Checkpointer(ckpt, cfg, ONE)  # the next run resumes from latest and continues its run
    resumed.adopt(resumed.load(find_latest(ckpt), model, optimizer))
    resumed.save(2, model, optimizer)  # stale folders go; the unpublished iter_0000002 is the run's own
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000001", "iter_0000002", "latest"]


# ----------------------------------------------------------------------------- refusals


def test_a_truncated_shard_is_refused_naming_the_file(saved):
    cfg, folder = saved
    shard = folder / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"{shard}.* truncated"):
        load_into_fresh(cfg, folder)
    with pytest.raises(CheckpointError, match=rf"{shard}.* truncated"):
        load_model_state(folder)


def test_a_missing_shard_is_refused_naming_the_file(saved):
    cfg, folder = saved
    (folder / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=rf"{folder / '__0_0.distcp'} is missing"):
        load_into_fresh(cfg, folder)


def test_a_shard_missing_from_disk_and_manifest_is_still_refused_as_a_checkpoint_error(saved):
    cfg, folder = saved
    (folder / "__0_0.distcp").unlink()
    info = json.loads((folder / "meta.json").read_text())
    del info["files"]["__0_0.distcp"]
    (folder / "meta.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=rf"{folder}: cannot read the tensors"):
        load_into_fresh(cfg, folder)  # DCP's CheckpointException (a BaseException) is mapped


def test_a_checkpoint_of_another_model_is_refused_naming_the_parameter_and_its_config(saved):
    _, folder = saved
    with pytest.raises(CheckpointError, match=rf"{folder / 'config.yaml'} describes another model: "
                                              r"layers.0.mlp.fc1.weight is \(256, 32\) in the checkpoint"):
        load_into_fresh(tiny_config(ffn_hidden_size=64), folder)


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "config.yaml").unlink(), r"config.yaml is missing"),
    (lambda f: (f / "config.yaml").write_text("model: [unclosed\n"), r"config.yaml is not a valid run configuration"),
    (lambda f: (f / "config.yaml").write_text("modle: {}\n"), r"config.yaml is not a valid run configuration"),
    (lambda f: (f / "meta.json").unlink(), r"meta.json is missing"),
    (lambda f: (f / "meta.json").write_text("{\"meta\": "), r"meta.json is not valid JSON"),
], ids=["no-config", "bad-yaml", "unknown-section", "no-meta", "bad-json"])
def test_a_missing_or_invalid_config_or_meta_is_refused_naming_the_file(saved, damage, message):
    cfg, folder = saved
    damage(folder)
    with pytest.raises(CheckpointError, match=rf"{folder}/{message}"):
        load_into_fresh(cfg, folder)


def test_latest_naming_a_missing_folder_is_refused(tmp_path):
    (tmp_path / "latest").write_text("iter_0000042\n")
    with pytest.raises(CheckpointError, match=r"latest names iter_0000042, which is missing"):
        find_latest(tmp_path)
    assert find_latest(tmp_path / "nothing-here") is None


# ----------------------------------------------------------------------------- average_checkpoints


def test_average_checkpoints_writes_the_mean_weights_which_convert_to_hf_reads(tmp_path, saved, tool):
    cfg, trained = saved
    save_model_checkpoint(tmp_path / "b", 5, cfg, build_encoder(cfg.model, seed=9).state_dict())
    out = tmp_path / "avg"
    assert tool("average_checkpoints")(["--checkpoints", str(trained), str(tmp_path / "b"),
                                        "--output", str(out)]) == 0
    _, a = load_model_state(trained)
    _, b = load_model_state(tmp_path / "b")
    _, mean = load_model_state(out)
    assert find_latest(out).name == "iter_0000005"  # named after the newest input
    assert_equal_states(mean, {k: (a[k] + b[k]) / 2 for k in a})  # halves are exact in binary
    assert tool("convert_to_hf")(["--checkpoint", str(out), "--output", str(tmp_path / "hf")]) == 0


def test_average_checkpoints_refuses_other_shapes_naming_the_checkpoint(tmp_path, saved, capsys, tool):
    cfg, trained = saved
    other = tiny_config(ffn_hidden_size=64)
    save_model_checkpoint(tmp_path / "other", 0, other, build_encoder(other.model).state_dict())
    args = ["--checkpoints", str(trained), str(tmp_path / "other"), "--output", str(tmp_path / "avg")]
    assert tool("average_checkpoints")(args) == 2
    assert f"{tmp_path / 'other' / 'iter_0000000'}: layers.0.mlp.fc1.weight" in capsys.readouterr().err
    assert tool("average_checkpoints")(args[:3] + ["--weights", "0.7", "0.7"] + args[3:]) == 2
    assert "sum to 1.4" in capsys.readouterr().err
    assert not (tmp_path / "avg").exists()
