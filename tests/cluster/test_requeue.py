"""Requeued jobs resume: `slurm/submit_chain.sh 1 --requeue ...` (sbatch --requeue) on the two-node SLURM,
one job of 2 srun tasks on one node. Requeued by `scontrol requeue` while running, or by its node
drained and set DOWN mid-run (what slurmctld does to a failed node; a drained node alone keeps its running
jobs), the
job is killed (SIGTERM: the run saves after the current step; SIGKILL KillWait = 10 s later), put back
in the queue by SLURM itself under the same job id, started again (on the other node when its own is
down) and resumes from `latest`: its losses equal an uninterrupted job's bit for bit.
"""

import pytest

from test_slurm import JOB_TIMEOUT_S, SRUN_TASKS, completed, sbatch_argv, submit, train_args, wait_for_step
from train_runs import ROOT, losses

ONE_NODE = ["--nodes=1", *SRUN_TASKS]


def job_args(shards, run_dir):
    return train_args(shards, run_dir, **{"train.steps": 16, "checkpoint.interval": 4})


@pytest.fixture(scope="module")
def uninterrupted(slurm2, shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    argv = sbatch_argv(workdir, "pretrain_srun.sbatch", ONE_NODE, job_args(shards, workdir / "run"))
    (job_id,) = submit(slurm2, workdir, ["sbatch", "--parsable", *argv])
    completed(slurm2, job_id)
    return losses(workdir / "run")


def requeued_once(slurm2, job_id: str):
    """The job once it completed after one requeue (the same id; RestartCnt counts the starts after the first)."""
    job = completed(slurm2, job_id, JOB_TIMEOUT_S + 180)
    assert job.fields.get("Restarts") == "1", job.fields
    return job


@pytest.mark.parametrize("how", ["scontrol-requeue", "node-down"])
def test_a_requeued_job_resumes_from_its_checkpoint_with_the_losses_of_an_uninterrupted_one(
        slurm2, shards, uninterrupted, tmp_path, how):
    run_dir = tmp_path / "run"
    argv = sbatch_argv(tmp_path, "pretrain_srun.sbatch", ONE_NODE, job_args(shards, run_dir))
    (job_id,) = submit(slurm2, tmp_path, [str(ROOT / "slurm" / "submit_chain.sh"), "1", "--requeue",
                                          "--open-mode=append", *argv])
    first = slurm2.wait(job_id, JOB_TIMEOUT_S, states={"RUNNING"})
    node = first.fields["NodeList"]
    wait_for_step(run_dir, 6)
    try:
        if how == "scontrol-requeue":
            slurm2.run(["scontrol", "requeue", job_id])
        else:
            # DRAIN first: a DOWN node whose slurmd still answers returns to service (ReturnToService=2)
            slurm2.run(["scontrol", "update", f"NodeName={node}", "State=DRAIN", "Reason=test-node-failure"])
            slurm2.run(["scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=test-node-failure"])
        job = requeued_once(slurm2, job_id)
    finally:
        if how == "node-down":
            slurm2.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=False)
    out = slurm2.job_output(job, None)
    assert "resumed from" in out, out[-3000:]
    if how == "node-down":
        assert job.fields["NodeList"] != node, (node, job.fields["NodeList"])  # started again elsewhere
    assert losses(run_dir) == uninterrupted  # == on floats: bit for bit
