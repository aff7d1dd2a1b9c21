"""A real SLURM on this host for the tests: munged, slurmctld and slurmd from Debian's packages, run
in the foreground as children of the test session, with every file in one temporary folder.

By default this host is the one node, with its CPUs and no GPUs; given a `VirtualCluster` (netns.py),
slurmctld runs on its head and one slurmd on each of its nodes (NodeName = hostname, NodeAddr = the
node's address), every client command on the head, and munged here (its socket is a file, shared by
all as on a cluster that shares one munge key). Running as root in a container-like machine
needs: SlurmUser/SlurmdUser root, proctrack/linuxproc (no cgroup hierarchy to delegate),
task/none (no affinity plugins), no accounting (finished jobs stay visible to scontrol for
MinJobAge seconds, which is how their states are read), cred_expire=10 (a requeued job waits that long
before it starts again, 120 s by default), and private ports and munge socket, so
that nothing on the host (another test run, a system munge) is touched. Job ids start at a random
number: the scripts derive their rendezvous port from the job id, and two test sessions on one host
must not both start at job 1.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun")
FINAL_STATES = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


class SchedulerUnavailable(RuntimeError):
    """SLURM cannot be started here; the message says why (the tests skip with it)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Job:
    id: str
    state: str
    exit_code: str  # "status:signal"
    elapsed_s: float
    fields: dict


@dataclass
class SlurmCluster:
    root: Path
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    processes: list = field(default_factory=list)
    nodes: object = None  # a started netns.VirtualCluster: one slurmd per node; None: this host alone

    @property
    def node_names(self) -> list[str]:
        return [self.node] if self.nodes is None else list(self.nodes.nodes)

    def _on(self, host: str) -> list[str]:
        """The prefix that runs a command on `host` ("head" or a node name): none on this host alone."""
        return [] if self.nodes is None else self.nodes.hosts[host].prefix()

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, base: dict | None = None) -> dict:
        """The environment of a client (sbatch, scontrol) of this cluster."""
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    # ---------------------------------------------------------------------------- daemons

    def start(self, timeout_s: float = 60):
        missing = [d for d in DAEMONS if shutil.which(d) is None]
        if missing:
            raise SchedulerUnavailable(f"{', '.join(missing)} not installed (tools/install_test_schedulers.sh "
                                       f"installs them as root)")
        if os.geteuid() != 0:
            raise SchedulerUnavailable("the test SLURM runs its daemons as root; run the tests as root")
        for sub in ("munge", "state", "log", *(f"spool/{n}" for n in self.node_names)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self.conf.write_text(self._slurm_conf())
        self._spawn([*self._on("head"), "slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for name in self.node_names:
            node = [] if self.nodes is None else ["-N", name]
            self._spawn([*self._on(name), "slurmd", "-D", *node, "-f", str(self.conf)], f"slurmd-{name}")
        for name in self.node_names:
            self._wait_for_idle_node(name, timeout_s)

    def _start_munge(self):
        munge = self.root / "munge"
        os.chmod(munge, 0o755)  # munged insists that clients can reach its socket
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chmod(key, 0o600)
        self._spawn(["munged", "-F", "-f", f"--socket={munge / 'socket'}", f"--key-file={key}",
                     f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'seed'}",
                     f"--log-file={self.root / 'log' / 'munged.log'}"], "munged")
        deadline = time.monotonic() + 20
        while not (munge / "socket").exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise SchedulerUnavailable(f"munged did not create its socket:\n{self.logs()}")
            time.sleep(0.1)

    def _slurm_conf(self) -> str:
        r = self.root
        if self.nodes is None:
            controller = f"{self.node}(127.0.0.1)"
            nodes = f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN"
        else:
            controller = f"head({self.nodes.head.address})"
            nodes = "\n".join(f"NodeName={h.name} NodeAddr={h.address} CPUs={self.cpus} State=UNKNOWN"
                              for h in self.nodes.node_hosts())
        return f"""\
ClusterName=megatronjp
FirstJobId={random.randrange(1000, 10**6)}
SlurmctldHost={controller}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / 'munge' / 'socket'},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'spool'}/%n/slurmd.pid
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log'}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
KillWait=10
SlurmctldDebug=debug
MinJobAge=600
InactiveLimit=0
Waittime=0
OverTimeLimit=0
{nodes}
PartitionName=test Nodes={",".join(self.node_names)} Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, argv: list[str], name: str):
        out = open(self.root / "log" / f"{name}.out", "wb")
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=self.env())
        out.close()
        self.processes.append((name, process))

    def _check_alive(self):
        for name, process in self.processes:
            if process.poll() is not None:
                raise SchedulerUnavailable(f"{name} exited with status {process.returncode}:\n{self.logs()}")

    def _wait_for_idle_node(self, name: str, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        state = "?"
        while time.monotonic() < deadline:
            self._check_alive()
            state = self.node_state(name)
            if state.split("+")[0] == "IDLE":
                return
            time.sleep(0.3)
        raise SchedulerUnavailable(f"node {name} not idle after {timeout_s:.0f} s (state {state}):\n{self.logs()}")

    def node_state(self, name: str) -> str:
        result = self.run(["scontrol", "show", "node", name, "-o"], check=False)
        return _fields(result.stdout).get("State", "?") if result.returncode == 0 else "?"

    def stop(self):
        """Cancel every job, then end the daemons (SIGTERM, SIGKILL after 10 s)."""
        if self.conf.exists():
            self.run(["scancel", "--full", "--quiet", "--user=root"], check=False, timeout_s=15)
        for name, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)
        self.processes.clear()

    def logs(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name}:\n{text[-chars:]}")
        return "\n".join(parts)

    # ---------------------------------------------------------------------------- clients

    def run(self, argv: list[str], check: bool = True, timeout_s: float = 30, env: dict | None = None,
            cwd=None) -> subprocess.CompletedProcess:
        result = subprocess.run([*self._on("head"), *argv], capture_output=True, text=True, timeout=timeout_s,
                                env=self.env(env), cwd=cwd)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def job(self, job_id: str) -> Job:
        result = self.run(["scontrol", "show", "job", job_id, "-o"])
        f = _fields(result.stdout)
        return Job(job_id, f.get("JobState", "?"), f.get("ExitCode", "?"), _seconds(f.get("RunTime", "0")), f)

    def wait(self, job_id: str, timeout_s: float, states=FINAL_STATES) -> Job:
        """The job once in one of `states`; on timeout it is cancelled and the test fails with its log."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job.state in states:
                return job
            if time.monotonic() > deadline:
                self.run(["scancel", job_id], check=False)
                raise AssertionError(f"job {job_id} still {job.state} after {timeout_s:.0f} s:\n"
                                     f"{self.job_output(job)}\n{self.logs()}")
            time.sleep(0.2)

    @staticmethod
    def job_output(job: Job, chars: int | None = 5000) -> str:
        """The end of the job's output (`chars` None: all of it)."""
        path = job.fields.get("StdOut", "")
        text = Path(path).read_text(errors="replace") if path and Path(path).exists() else "(no output)"
        return text if chars is None else text[-chars:]


def _fields(text: str) -> dict:
    """`scontrol show ... -o` prints Key=Value pairs separated by spaces (values have no spaces here)."""
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def _seconds(duration: str) -> float:
    """[days-]hours:minutes:seconds -> seconds."""
    days, _, rest = duration.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
