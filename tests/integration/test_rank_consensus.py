"""Issue 19, item 3: ranks started with different configurations refuse together before step 1,
naming the first keys that differ and both values. Two real processes started the way srun starts
them (each its own command line), on gloo, a free port each test, bounded in time."""

import subprocess
import sys

from megatron_jp.config import load_config
from megatron_jp.training.runtime.consensus import describe, fingerprint
from train_runs import ROOT, base_args, environment


def start_ranks(args_per_rank: list[list[str]], port: int) -> list[tuple[int, str, str]]:
    env = {**environment(), "SLURM_NTASKS": str(len(args_per_rank)), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    tasks = [subprocess.Popen([sys.executable, "-m", "megatron_jp.train", *args], cwd=ROOT,
                              env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, args in enumerate(args_per_rank)]
    try:
        outputs = [task.communicate(timeout=240) for task in tasks]
        return [(task.returncode, *out) for task, out in zip(tasks, outputs)]
    finally:
        for task in tasks:
            if task.poll() is None:
                task.kill()


def test_ranks_with_another_learning_rate_and_seed_refuse_together_before_step_1(data, tmp_path, free_port):
    common = {"train.steps": 3, "checkpoint.interval": 0}
    ranks = [base_args(data, tmp_path, **common, **{"optim.lr": 0.002}),
             base_args(data, tmp_path, **common, **{"optim.lr": 0.003, "train.seed": 7})]
    results = start_ranks(ranks, free_port)
    assert [status for status, _, _ in results] == [2, 2], results[0][2][-3000:]
    error = results[0][2]
    assert "rank 1 was started with another configuration than rank 0" in error
    assert "optim.lr: 0.002 on rank 0, 0.003 on rank 1" in error and "train.seed: 1234 on rank 0, 7 on rank 1" in error
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints" / "latest").exists()


def test_a_model_shape_difference_is_named_not_reported_as_a_dead_peer(data, tmp_path, free_port):
    ranks = [base_args(data, tmp_path, **{"train.steps": 3}),
             base_args(data, tmp_path, **{"train.steps": 3, "model.num_layers": 2})]
    results = start_ranks(ranks, free_port)
    assert [status for status, _, _ in results] == [2, 2]
    assert "model.num_layers: 4 on rank 0, 2 on rank 1" in results[0][2]
    assert "stopped responding" not in results[0][2] + results[1][2]


def test_the_fingerprint_holds_the_tokenizer_and_each_shards_provenance(data, tmp_path):
    cfg = load_config(None, ["--data.paths", data, "--data.tokenizer_type", "ByteTokenizer"])
    mine = fingerprint(cfg)
    theirs = dict(mine, **{f"shard {data}": "sidecar sha256 0123456789abcdef"})
    message = describe(3, mine, theirs)
    assert f"shard {data}: sidecar sha256" in message and "on rank 3" in message
    assert mine[f"shard {data}"].startswith("sidecar sha256 ") and "_document.bin" in mine[f"shard {data}"]


def test_node_local_folders_may_differ_between_ranks():
    """Each node of a TSUBAME job keeps its index cache (and compile cache) in its own $TMPDIR."""
    one = load_config(None, ["--data.cache_dir", "/node1/tmp/cache", "--train.compile_cache_dir", "/node1/cc"])
    two = load_config(None, ["--data.cache_dir", "/node2/tmp/cache", "--train.compile_cache_dir", "/node2/cc"])
    assert fingerprint(one) == fingerprint(two)
    assert fingerprint(one) != fingerprint(load_config(None, ["--data.cache_dir", "/x", "--optim.lr", "0.5"]))
