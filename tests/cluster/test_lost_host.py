"""A host lost mid-run: node2 vanishes (its link pulled first, so no goodbye reaches node1, then every
process on it killed), in the middle of a step and in the middle of a checkpoint save.

3 ranks as srun starts them (rank 0 and 1 on node1, rank 2 on node2, no launcher that would end the
others): both survivors must get out by themselves within parallel.timeout_minutes (0.2 min = 12 s;
the bound adds what test_hung_ranks.py allows for, 8 s), naming rank 2 and node2; `latest` names a
complete checkpoint; the next job (on the node that is left) resumes and its losses equal an
uninterrupted run's bit for bit (CPU, fp32, the same 3-rank layout).
"""

import time
from contextlib import contextmanager

import pytest

from faults import FAULT_STEP
from conftest import unavailable
from netns import NodesUnavailable, VirtualCluster
from tasks import srun_like
from train_runs import base_args, losses

TIMEOUT_S = 12
STEPS = 12


def run_args(shards, run_dir):
    return base_args(shards, run_dir, **{"train.steps": STEPS, "train.global_batch_size": 6,
                                         "checkpoint.interval": 5, "parallel.timeout_minutes": TIMEOUT_S / 60,
                                         "parallel.startup_timeout_minutes": 1})


@contextmanager
def own_nodes(folder, tag: str):
    """Namespaces of this test's own (not the schedulers' `nodes`: a test destroys one of them),
    stopped afterwards with nothing left behind."""
    nodes = VirtualCluster(folder, tag=tag)
    try:
        nodes.start()
    except NodesUnavailable as e:
        unavailable(f"no two-node cluster here: {e}")
    try:
        yield nodes
    finally:
        nodes.stop()
        assert nodes.leftovers() == [], nodes.leftovers()


@pytest.fixture
def cluster(tmp_path):
    with own_nodes(tmp_path / "nodes", "lost") as nodes:
        yield nodes


def on_node1(cluster, shards, run_dir, port, logs, **kwargs):
    node1 = cluster.hosts["node1"]
    return srun_like(run_args(shards, run_dir), 3, port, logs, hosts=[node1] * 3, master="node1", **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    with own_nodes(folder / "nodes", "ref") as nodes:
        tasks = on_node1(nodes, shards, folder / "run", 29400, folder / "logs")
        try:
            assert tasks.wait(range(3), timeout_s=300) == {0: 0, 1: 0, 2: 0}, tasks.tail()
        finally:
            tasks.kill()
    return losses(folder / "run")


@pytest.mark.parametrize("when", ["step", "checkpoint-save"])
def test_a_host_lost_mid_run_is_named_and_the_next_job_resumes_bitwise(cluster, shards, uninterrupted, tmp_path,
                                                                       free_port, when):
    run_dir, marker = tmp_path / "run", tmp_path / "rank2-saving"
    hosts = [cluster.hosts["node1"]] * 2 + [cluster.hosts["node2"]]
    fault = {"fault": "pause-while-saving", "FAULT_RANK": "2", "FAULT_MARKER": str(marker)} if when != "step" else {}
    tasks = srun_like(run_args(shards, run_dir), 3, free_port, tmp_path / "logs", hosts=hosts, master="node1",
                      **fault)
    try:
        if when == "step":
            tasks.wait_for_step(run_dir, 7, timeout_s=240)  # ranks are in step 8 now; iter_0000005 is saved
        else:
            deadline = time.monotonic() + 240
            while not marker.exists():
                assert time.monotonic() < deadline and tasks[2].process.poll() is None, tasks.tail()
                time.sleep(0.05)
        cluster.lose("node2")
        lost_at = time.monotonic()
        assert tasks.wait([0, 1], timeout_s=TIMEOUT_S + 60) == {0: 1, 1: 1}, tasks.tail()
        for r in (0, 1):
            took = tasks[r].ended_at - lost_at
            out = tasks[r].output()
            assert took < TIMEOUT_S + 8, (r, took)
            assert "rank 2 stopped responding" in out and "on node2" in out, out[-2000:]
            if when != "step":
                assert f"step {FAULT_STEP} (checkpoint save) on node2" in out, out[-2000:]
    finally:
        tasks.kill()
    ckpt = run_dir / "checkpoints"
    latest = (ckpt / "latest").read_text().strip()
    assert latest == "iter_0000005" and (ckpt / latest / "meta.json").exists(), sorted(p.name for p in ckpt.iterdir())

    nxt = on_node1(cluster, shards, run_dir, free_port + 1, tmp_path / "next-job")  # the next job, on node1
    try:
        assert nxt.wait(range(3), timeout_s=300) == {0: 0, 1: 0, 2: 0}, nxt.tail()
    finally:
        nxt.kill()
    assert "resumed from" in nxt[0].output()
    assert losses(run_dir) == uninterrupted  # == on floats: bit for bit
