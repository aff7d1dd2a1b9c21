"""The project's slurm/ scripts, unedited, under a real SLURM (slurmctld + slurmd + munge on this host).

Every job is the tiny config on CPU (gloo), two ranks on this node: the scripts' GPU lines are
overridden on the sbatch command line (--gpus-per-node=0 and CPU counts; GPUS_PER_NODE=2 for
torchrun's processes per node), as a user of a CPU partition would. Losses are compared bit for bit
(CPU, fp32, the same layout: dp=2 in every job, the same operations in the same order).
"""

import sys
import time
from pathlib import Path

import pytest

from train_runs import ROOT, base_args, environment, last_step, losses, records

SRUN_TASKS = ["--ntasks-per-node=2", "--cpus-per-task=1"]  # pretrain_srun.sbatch: a task per rank
TORCHRUN = ["--cpus-per-task=2"]  # pretrain.sbatch: one torchrun on the node, GPUS_PER_NODE=2 workers
JOB_TIMEOUT_S = 240


def job_env(**extra) -> dict:
    """The submitting shell's environment: this venv first on PATH (sbatch exports it to the job)."""
    env = environment()
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return {**env, **extra}


def submit(slurm, workdir: Path, argv: list[str], **env) -> list[str]:
    """Run `argv` (sbatch or submit_chain.sh) in `workdir`; the job ids it printed."""
    result = slurm.run(argv, env=job_env(**env), cwd=workdir)
    return [line.split(";")[0] for line in result.stdout.split()]


def sbatch_argv(workdir: Path, script: str, options: list[str], train_args: list[str]) -> list[str]:
    config = workdir / "tiny.yaml"
    config.write_text("model:\n  preset: tiny\n")
    return [*options, f"--chdir={workdir}", f"--output={workdir}/%x-%j.out", "--gpus-per-node=0",
            str(ROOT / "slurm" / script), str(config), *train_args]


def completed(slurm, job_id: str, timeout_s: float = JOB_TIMEOUT_S):
    job = slurm.wait(job_id, timeout_s)
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), (f"{job.state} {job.exit_code}:\n"
                                                                f"{slurm.job_output(job)[-3000:]}\n{slurm.logs(1500)}")
    return job


def train_args(shards, run_dir, **overrides):
    return base_args(shards, run_dir, **{"parallel.timeout_minutes": 2, **overrides})


def wait_for_step(run_dir: Path, step: int, timeout_s: float = JOB_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while last_step(run_dir) < step:
        assert time.monotonic() < deadline, f"step {step} not reached in {run_dir}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def reference(slurm, shards, tmp_path_factory):
    """An uninterrupted 20-step run: pretrain_srun.sbatch, two srun tasks."""
    workdir = tmp_path_factory.mktemp("srun")
    run_dir = workdir / "run"
    (job_id,) = submit(slurm, workdir, ["sbatch", "--parsable",
                                        *sbatch_argv(workdir, "pretrain_srun.sbatch", SRUN_TASKS,
                                                     train_args(shards, run_dir))])
    job = completed(slurm, job_id)
    return {"job": job, "run_dir": run_dir, "output": slurm.job_output(job)}


def test_pretrain_srun_sbatch_trains_with_the_rendezvous_of_its_allocation(slurm, reference):
    assert [r["step"] for r in records(reference["run_dir"]) if "loss" in r] == list(range(1, 21))
    out, job_id = reference["output"], reference["job"].id
    # rank 0 printed the environment once: one node (this host), 2 ranks, no GPU, versions
    assert out.count("environment: ") == 1, out
    assert f"environment: 1 node(s) ({slurm.node}), 2 ranks (2 per node), GPUs per node 0" in out
    assert "backend gloo, torch " in out
    # the rendezvous comes from the allocation: its first node, a port from the job id
    assert f"rendezvous: {slurm.node}:{29500 + int(job_id) % 2000}, 1 node(s) of job {job_id}, gloo on lo" in out
    assert f"MASTER_ADDR={slurm.node}\n" in out and f"MASTER_PORT={29500 + int(job_id) % 2000}\n" in out
    assert "GLOO_SOCKET_IFNAME=lo\n" in out and "NCCL_SOCKET_IFNAME=^lo,docker\n" in out  # this host's address is on lo


def test_pretrain_sbatch_with_torchrun_trains_exactly_like_srun_tasks(slurm, shards, reference, tmp_path):
    run_dir = tmp_path / "run"
    argv = sbatch_argv(tmp_path, "pretrain.sbatch", TORCHRUN, train_args(shards, run_dir))
    (job_id,) = submit(slurm, tmp_path, ["sbatch", "--parsable", *argv], GPUS_PER_NODE="2")
    job = completed(slurm, job_id)
    out = slurm.job_output(job)
    assert f"environment: 1 node(s) ({slurm.node}), 2 ranks (2 per node)" in out
    # torchrun's c10d endpoint; its workers then see the agent's store as MASTER_ADDR/MASTER_PORT
    assert f"rendezvous: {slurm.node}:{29500 + int(job_id) % 2000}, 1 node(s) of job {job_id}, gloo on lo" in out
    assert losses(run_dir) == losses(reference["run_dir"])


def test_submit_chain_resumes_job_after_job_with_the_losses_of_an_uninterrupted_run(slurm, shards, reference,
                                                                                      tmp_path):
    """3 jobs chained with afterany; the first two are sent SIGUSR1 by the scheduler (scancel --signal,
    what --signal=USR1@T does before a time limit) mid-run: each saves and exits, the next resumes."""
    run_dir = tmp_path / "run"
    argv = sbatch_argv(tmp_path, "pretrain_srun.sbatch", SRUN_TASKS, train_args(shards, run_dir))
    jobs = submit(slurm, tmp_path, [str(ROOT / "slurm" / "submit_chain.sh"), "3", *argv])
    assert len(jobs) == 3
    assert f"afterany:{jobs[0]}" in slurm.job(jobs[1]).fields["Dependency"]
    for job_id, stop_after in zip(jobs[:2], (6, 13)):
        slurm.wait(job_id, JOB_TIMEOUT_S, states={"RUNNING"})
        wait_for_step(run_dir, stop_after)
        slurm.run(["scancel", "--signal=USR1", job_id])
        assert "stop requested by SIGUSR1" in slurm.job_output(completed(slurm, job_id))
    out = slurm.job_output(completed(slurm, jobs[2]))
    assert "resumed from" in out
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "iter_0000020"
    assert losses(run_dir) == losses(reference["run_dir"])  # == on floats: bit for bit


def test_a_job_with_a_short_time_limit_saves_and_exits_before_it(slurm, shards, tmp_path):
    """--time=2 --signal=USR1@60: slurmctld checks time limits about every 30 s and warns at the first
    check past end - 60 s - 30 s, so 30..60 s into the job, and enforces the limit at the first check
    past it, 120..150 s (measured here with --time=1 --signal=USR1@10: warnings at 23-27 s; once, on
    the loaded CI machine, no warning reached the run before the kill at 83 s, so the warning now has
    a minute of margin). The run saves after the current step and the job ends COMPLETED, not TIMEOUT.
    train.steps is far more than two minutes allow."""
    run_dir = tmp_path / "run"
    args = train_args(shards, run_dir, **{"train.steps": 100000, "checkpoint.interval": 0, "log.interval": 10})
    (job_id,) = submit(slurm, tmp_path, ["sbatch", "--parsable", "--time=2", "--signal=USR1@60",
                                         *sbatch_argv(tmp_path, "pretrain_srun.sbatch", SRUN_TASKS, args)])
    job = completed(slurm, job_id, timeout_s=240)
    assert job.elapsed_s < 120, job.fields.get("RunTime")
    out = slurm.job_output(job)
    assert "stop requested by SIGUSR1" in out, f"{out}\n{slurm.logs()}"
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert steps, f"no step logged before the warning:\n{out}"
    stopped = int(out.split("stop requested by SIGUSR1: saving step ")[1].split()[0])
    assert stopped >= steps[-1]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped:07d}"


def test_sigterm_through_torchrun_saves_and_exits(slurm, shards, tmp_path):
    """pretrain.sbatch's --signal=TERM@180 (sent here at once by scancel --signal): SLURM signals the
    step's processes, torchrun and its workers; the workers save after the current step and exit
    within torchrun's 30 s grace. torchrun itself then exits 1 (its SignalException), so the job
    reads FAILED although the checkpoint is complete: an afterany chain goes on all the same."""
    run_dir = tmp_path / "run"
    args = train_args(shards, run_dir, **{"train.steps": 100000, "checkpoint.interval": 0, "log.interval": 5})
    argv = sbatch_argv(tmp_path, "pretrain.sbatch", TORCHRUN, args)
    (job_id,) = submit(slurm, tmp_path, ["sbatch", "--parsable", *argv], GPUS_PER_NODE="2")
    slurm.wait(job_id, JOB_TIMEOUT_S, states={"RUNNING"})
    wait_for_step(run_dir, 5)
    slurm.run(["scancel", "--signal=TERM", job_id])
    job = slurm.wait(job_id, 120)
    out = slurm.job_output(job)
    assert job.state in ("COMPLETED", "FAILED") and job.elapsed_s < 60, (job.state, out[-3000:])
    stopped = int(out.split("stop requested by SIGTERM: saving step ")[1].split()[0])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped:07d}"
