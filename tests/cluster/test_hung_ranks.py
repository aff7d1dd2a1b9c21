"""No hung ranks: a frozen rank (SIGSTOP) or one that dies while rank 0 publishes a checkpoint makes
every other rank exit within parallel.timeout_minutes, naming the step and the stuck rank.

The tasks are started as srun starts them, without a launcher that would end the others on the first
failure: each survivor must get out by itself. 3 ranks (data parallel), so that "every other rank"
is more than one. The timeout is 0.2 min (12 s); a survivor may take up to one heartbeat interval
(0.6 s) and the store's reply timeout (2 s) longer, and this shared 2-core machine adds scheduling
delays: the bound is the timeout + 8 s, against torch.distributed's own backstop of 72 s.
"""

import signal
import time

import pytest

from tasks import srun_like
from train_runs import base_args

WORLD = 3
TIMEOUT_S = 12


def hang_args(data, run_dir, **overrides):
    return base_args(data, run_dir, **{"train.steps": 400, "train.global_batch_size": 6, "checkpoint.interval": 0,
                                       "parallel.timeout_minutes": TIMEOUT_S / 60,
                                       "parallel.startup_timeout_minutes": 0.5, **overrides})


@pytest.mark.parametrize("stuck", [1, 0], ids=["rank1", "rank0-hosting-the-store"])
def test_a_frozen_rank_makes_every_other_rank_exit_naming_it_and_the_step(shards, tmp_path, free_port, stuck):
    tasks = srun_like(hang_args(shards, tmp_path), WORLD, free_port, tmp_path / "logs")
    try:
        tasks.wait_for_step(tmp_path, 3, timeout_s=180)
        tasks[stuck].process.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        others = [r for r in range(WORLD) if r != stuck]
        assert tasks.wait(others, timeout_s=TIMEOUT_S + 60) == {r: 1 for r in others}, tasks.tail()
        for r in others:
            took = tasks[r].ended_at - stopped_at
            assert TIMEOUT_S / 2 < took < TIMEOUT_S + 8, (r, took)
            out = tasks[r].output()
            assert f"rank {stuck} stopped responding" in out and "parallel.timeout_minutes" in out, out[-2000:]
            assert f"error: rank {r}: no progress for" in out and " in step " in out, out[-2000:]
    finally:
        tasks.kill()


@pytest.mark.parametrize("fault, dead, latest", [
    ("peer-dies-while-rank0-publishes", 1, "iter_0000010"),  # rank 0 had every file: its publication completes
    ("rank0-dies-while-publishing", 0, "iter_0000005"),  # killed before `latest`: the previous one stays
])
def test_a_rank_dying_while_rank0_publishes_a_checkpoint_leaves_nobody_waiting(shards, tmp_path, free_port, fault,
                                                                               dead, latest):
    args = hang_args(shards, tmp_path, **{"checkpoint.interval": 5})
    tasks = srun_like(args, WORLD, free_port, tmp_path / "logs", fault=fault)
    others = [r for r in range(WORLD) if r != dead]
    try:
        assert tasks.wait([dead], timeout_s=240) == {dead: -signal.SIGKILL}, tasks.tail()
        assert tasks.wait(others, timeout_s=TIMEOUT_S + 30) == {r: 1 for r in others}, tasks.tail()
        for r in others:
            out = tasks[r].output()
            assert f"rank {dead} stopped responding" in out and "step 10 (checkpoint save)" in out, out[-2000:]
        assert (tmp_path / "checkpoints" / "latest").read_text().strip() == latest
    finally:
        tasks.kill()


def test_a_rank_that_never_joins_is_named_within_the_startup_timeout(shards, tmp_path, free_port):
    """Two ranks expected, one started: rank 0 gives up after startup_timeout_minutes (6 s), not 12 s."""
    args = hang_args(shards, tmp_path, **{"parallel.startup_timeout_minutes": 0.1, "train.global_batch_size": 4})
    tasks = srun_like(args, 2, free_port, tmp_path / "logs")
    try:
        tasks[1].process.kill()  # as a node that never came up
        tasks.wait([1], timeout_s=30)
        assert tasks.wait([0], timeout_s=60) == {0: 1}, tasks.tail()
        out = tasks[0].output()
        assert "rank 1 never joined" in out and "parallel.startup_timeout_minutes" in out, out[-2000:]
    finally:
        tasks.kill()
