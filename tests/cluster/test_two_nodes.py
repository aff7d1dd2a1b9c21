"""Two hosts for real: slurm/ scripts under `sbatch --nodes=2` on two network namespaces (netns.py),
each its own host with its own hostname, address and slurmd, one rank per node.

Parity: the two-node runs are data parallel over 2 ranks; they equal each other bit for bit (the same
layout, the same operations in the same order), and a single process with the same global batch up to
fp32 reassociation of the gradient sum over the two ranks (relative 1e-5 per step, the tolerance of
tests/distributed/test_parallel_training.py, which says why).
"""

import pytest

from test_slurm import JOB_TIMEOUT_S, completed, sbatch_argv, submit, train_args
from train_runs import base_args, losses, records, train_ok

STEPS = 8
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"]
LOSS_RTOL = 1e-5


def two_node_args(shards, run_dir, **overrides):
    return train_args(shards, run_dir, **{"train.steps": STEPS, "checkpoint.interval": 0, **overrides})


@pytest.fixture(scope="module")
def one_process(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one-process")
    train_ok(base_args(shards, run_dir, **{"train.steps": STEPS, "checkpoint.interval": 0}))
    return losses(run_dir)


@pytest.fixture(scope="module")
def srun_two_nodes(slurm2, shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("srun2")
    argv = sbatch_argv(workdir, "pretrain_srun.sbatch", TWO_NODES, two_node_args(shards, workdir / "run"))
    (job_id,) = submit(slurm2, workdir, ["sbatch", "--parsable", *argv])
    job = completed(slurm2, job_id, JOB_TIMEOUT_S)
    return {"job": job, "run_dir": workdir / "run", "output": slurm2.job_output(job, None)}


def assert_like(run: dict[int, float], reference: dict[int, float]):
    assert sorted(run) == sorted(reference) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert abs(run[step] - loss) <= LOSS_RTOL * abs(loss), (step, run[step], loss)


def assert_two_hosts(out: str, job_id: str):
    port = 29500 + int(job_id) % 2000
    assert f"rendezvous: node1:{port}, 2 node(s) of job {job_id}, gloo on eth0" in out, out[-3000:]
    assert "environment: 2 node(s) (node1, node2), 2 ranks (1 per node)" in out, out[-3000:]
    # one value for every rank: both nodes bind gloo to their eth0, the link between the hosts
    assert "GLOO_SOCKET_IFNAME=eth0\n" in out and "MASTER_ADDR=node1\n" in out, out[-3000:]


def test_pretrain_srun_sbatch_on_two_nodes_trains_like_one_process(srun_two_nodes, one_process):
    assert_two_hosts(srun_two_nodes["output"], srun_two_nodes["job"].id)
    assert [r["step"] for r in records(srun_two_nodes["run_dir"]) if "loss" in r] == list(range(1, STEPS + 1))
    assert_like(losses(srun_two_nodes["run_dir"]), one_process)


def test_pretrain_sbatch_torchrun_per_node_on_two_nodes_equals_the_srun_tasks(slurm2, shards, srun_two_nodes,
                                                                              tmp_path):
    argv = sbatch_argv(tmp_path, "pretrain.sbatch", TWO_NODES, two_node_args(shards, tmp_path / "run"))
    (job_id,) = submit(slurm2, tmp_path, ["sbatch", "--parsable", *argv], GPUS_PER_NODE="1")
    out = slurm2.job_output(completed(slurm2, job_id), None)
    assert_two_hosts(out, job_id)
    assert losses(tmp_path / "run") == losses(srun_two_nodes["run_dir"])  # == on floats: bit for bit
