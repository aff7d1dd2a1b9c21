"""Start `python -m megatron_jp.train` as srun starts its tasks (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
with MASTER_ADDR/MASTER_PORT, no launcher that would end the others), and torchrun agents; wait for
them with deadlines; kill whatever is left, whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from train_runs import ROOT, environment, last_step

FAULTS = Path(__file__).with_name("faults.py")


@dataclass
class Task:
    rank: int
    process: subprocess.Popen
    log: Path
    ended_at: float | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Tasks:
    """A group of processes, each writing stdout+stderr to its own log file."""

    tasks: list[Task] = field(default_factory=list)

    def __iter__(self):
        return iter(self.tasks)

    def __getitem__(self, rank: int) -> Task:
        return self.tasks[rank]

    def wait(self, ranks, timeout_s: float) -> dict[int, int]:
        """Exit status of each of `ranks`, recording when each ended; fails the test past the deadline."""
        deadline = time.monotonic() + timeout_s
        pending = set(ranks)
        while pending:
            for r in list(pending):
                if self.tasks[r].process.poll() is not None:
                    self.tasks[r].ended_at = time.monotonic()
                    pending.discard(r)
            if pending and time.monotonic() > deadline:
                pytest.fail(f"ranks {sorted(pending)} still running after {timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.05)
        return {r: self.tasks[r].process.returncode for r in ranks}

    def wait_for_step(self, run_dir: Path, step: int, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while last_step(run_dir) < step:
            if any(t.process.poll() is not None for t in self.tasks) or time.monotonic() > deadline:
                pytest.fail(f"step {step} not reached:\n{self.tail()}")
            time.sleep(0.05)

    def tail(self, chars: int = 2000) -> str:
        return "\n".join(f"--- rank {t.rank} (status {t.process.poll()}):\n{t.output()[-chars:]}" for t in self.tasks)

    def kill(self):
        for t in self.tasks:
            if t.process.poll() is None:
                os.killpg(t.process.pid, signal.SIGKILL)  # SIGKILL also ends a SIGSTOPped process
                t.process.wait(timeout=30)


def srun_like(args: list[str], world: int, port: int, logs: Path, fault: str = "", hosts=None,
              master: str = "127.0.0.1", **extra_env) -> Tasks:
    """`world` tasks, each in its own session (killable as a group): on this host, or rank r on the
    netns.Host `hosts[r]` (MASTER_ADDR then names the host of rank 0)."""
    logs.mkdir(parents=True, exist_ok=True)
    program = [str(FAULTS), fault] if fault else ["-m", "megatron_jp.train"]
    group = Tasks()
    for rank in range(world):
        prefix = hosts[rank].prefix() if hosts else []
        local = [h.name for h in hosts[:rank]].count(hosts[rank].name) if hosts else rank
        env = {**environment(), "SLURM_NTASKS": str(world), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local),
               "MASTER_ADDR": master, "MASTER_PORT": str(port), **extra_env}
        log = logs / f"rank{rank}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen([*prefix, sys.executable, *program, *args], cwd=ROOT, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        group.tasks.append(Task(rank, process, log))
    return group
