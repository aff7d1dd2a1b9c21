"""A real Grid Engine on this host for the tests: Debian's Son of Grid Engine 8.1 (sge_qmaster,
sge_execd), with a private SGE_ROOT/cell, ports and spool folders in one temporary folder.

TSUBAME 4.0 runs Altair Grid Engine, a descendant of the same code: qsub/qrsh and their options, the
#$ directives, $PE_HOSTFILE and the per-job scratch folder behave alike. What is TSUBAME's own is
emulated: `node_f` is a requestable complex here (there it is a resource type that also picks the
parallel environment), so the tests add `-pe f_node 1` on the qsub line.

Given a `VirtualCluster` (netns.py), sge_qmaster runs on its head, an sge_execd on each node (an
execution host per node, each with its own scratch folder as TMPDIR), and every client command on the
head; a job's qrsh -inherit then crosses to the other node as on a real cluster.

Container-like hosts: 127.0.0.1 resolves back to "localhost", not to the host's name, which Grid
Engine refuses ("access denied: client IP resolved to host name localhost"); a host_aliases file
makes them one host. Jobs run as root: min_uid/min_gid 0.
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

from slurm_cluster import SchedulerUnavailable, free_port

BINARIES = ("sge_qmaster", "sge_execd", "qsub", "qconf", "qstat", "qacct", "qrsh")
DEBIAN_SGE = Path("/var/lib/gridengine")  # bin/, lib/, utilbin/ of the packages
SHARE = Path("/usr/share/gridengine")
SGE_LIB = Path("/usr/lib/gridengine")  # spoolinit, spooldefaults
PE = """pe_name f_node
slots 9999
user_lists NONE
xuser_lists NONE
start_proc_args NONE
stop_proc_args NONE
allocation_rule $fill_up
control_slaves TRUE
job_is_first_task FALSE
urgency_slots min
accounting_summary FALSE
qsort_args NONE
"""


@dataclass
class GridEngineCluster:
    root: Path
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    ports: tuple = field(default_factory=lambda: (free_port(), free_port()))
    nodes: object = None  # a started netns.VirtualCluster: an execd per node; None: this host alone

    @property
    def master(self) -> str:
        return self.node if self.nodes is None else "head"

    @property
    def exec_hosts(self) -> list[str]:
        return [self.node] if self.nodes is None else list(self.nodes.nodes)

    def _on(self, host: str) -> list[str]:
        return [] if self.nodes is None else self.nodes.hosts[host].prefix()

    def scratch(self, host: str) -> Path:
        """The folder under which an execution host makes each job's TMPDIR."""
        return self.root / ("tmp" if self.nodes is None else f"tmp-{host}")

    @property
    def cell(self) -> Path:
        return self.root / "test"

    def env(self, base: dict | None = None) -> dict:
        return {**(os.environ if base is None else base), "SGE_ROOT": str(self.root), "SGE_CELL": "test",
                "SGE_QMASTER_PORT": str(self.ports[0]), "SGE_EXECD_PORT": str(self.ports[1])}

    def run(self, argv: list[str], check: bool = True, timeout_s: float = 30, env=None, cwd=None, on: str = ""):
        """`argv` on the master (or on host `on`)."""
        argv = [*self._on(on or self.master), *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=self.env(env), cwd=cwd)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    # ---------------------------------------------------------------------------- daemons

    def start(self, timeout_s: float = 60):
        missing = [b for b in BINARIES if shutil.which(b) is None]
        if missing or not (DEBIAN_SGE / "bin").exists():
            raise SchedulerUnavailable(f"{', '.join(missing) or DEBIAN_SGE} not installed "
                                       f"(tools/install_test_schedulers.sh installs them as root)")
        if os.geteuid() != 0:
            raise SchedulerUnavailable("the test Grid Engine runs its daemons as root; run the tests as root")
        self._make_cell()
        self.run(["sge_qmaster"])  # forks into the background; its pid file lets stop() end it
        self._until(lambda: self.run(["qconf", "-sh"], check=False).returncode == 0, timeout_s, "qmaster answering")
        for host in dict.fromkeys([self.master, *self.exec_hosts]):  # qsub on the master, qrsh on the nodes
            self.run(["qconf", "-as", host])
            if self.nodes is not None:
                self.run(["qconf", "-ah", host])  # an execd may register from an administrative host only
        for host in self.exec_hosts:
            self.run(["sge_execd"], on=host)
        for host in self.exec_hosts:
            self._until(lambda: self._host_reports_load(host), timeout_s, f"execd of {host} reporting")
        self._configure()

    def _make_cell(self):
        common = self.cell / "common"
        for sub in (common, self.root / "spool" / "qmaster", self.root / "spool" / "execd",
                    *(self.scratch(h) for h in self.exec_hosts)):
            sub.mkdir(parents=True, exist_ok=True)
        for name in ("bin", "lib", "utilbin"):
            (self.root / name).symlink_to(DEBIAN_SGE / name)
        (self.root / "util").symlink_to(SHARE / "util")
        spool = f"{common};{self.root / 'spool' / 'qmaster'}"
        (common / "bootstrap").write_text(
            f"admin_user none\ndefault_domain none\nignore_fqdn true\nspooling_method classic\n"
            f"spooling_lib libspoolc\nspooling_params {spool}\nbinary_path /usr/sbin\n"
            f"qmaster_spool_dir {self.root / 'spool' / 'qmaster'}\nsecurity_mode none\n"
            f"listener_threads 2\nworker_threads 2\nscheduler_threads 1\n")
        (common / "act_qmaster").write_text(self.master + "\n")
        # job ids (and so the scripts' rendezvous ports) start at a random number, as in slurm_cluster.py
        (self.root / "spool" / "qmaster" / "jobseqnum").write_text(f"{random.randrange(1000, 10**6)}\n")
        if self.nodes is None:  # the namespaces' hosts files name every host once
            names = {socket.gethostbyaddr(ip)[0] for ip in _addresses(self.node)} - {self.node}
            (common / "host_aliases").write_text(" ".join([self.node, *sorted(names)]) + "\n")
        conf = (SHARE / "default-configuration").read_text()
        conf = conf.replace("/var/spool/gridengine/execd", str(self.root / "spool" / "execd"))
        conf = "\n".join("min_uid 0" if line.startswith("min_uid") else "min_gid 0" if line.startswith("min_gid")
                         else line for line in conf.splitlines()) + "\n"
        (self.root / "configuration").write_text(conf)
        init = [["spoolinit", "classic", "libspoolc", spool, "init"],
                ["spooldefaults", "configuration", str(self.root / "configuration")],
                ["spooldefaults", "complexes", str(SHARE / "util" / "resources" / "centry")],
                ["spooldefaults", "usersets", str(SHARE / "util" / "resources" / "usersets")],
                ["spooldefaults", "managers", "root"]]
        for tool, *args in init:
            self.run([str(SGE_LIB / tool), *args])

    def _host_reports_load(self, host: str) -> bool:
        out = self.run(["qhost", "-h", host], check=False).stdout
        line = next((l for l in out.splitlines() if l.startswith(host)), "")
        return len(line.split()) > 6 and line.split()[6] != "-"

    def _configure(self):
        """A fast scheduler, TSUBAME's node_f as a requestable number, a PE that allows qrsh -inherit,
        and one queue on the execution hosts with their CPUs as slots, each with its own scratch folder."""
        tmp = ",".join([str(self.scratch(self.exec_hosts[0])),
                        *(f"[{h}={self.scratch(h)}]" for h in self.exec_hosts[1:])])
        sconf = self.run(["qconf", "-ssconf"]).stdout
        sconf = _set(sconf, schedule_interval="0:0:1", flush_submit_sec="1", flush_finish_sec="1")
        self._load(["qconf", "-Msconf"], sconf)
        complexes = self.run(["qconf", "-sc"]).stdout.rstrip("\n") + "\nnode_f node_f INT <= YES NO 0 0\n"
        self._load(["qconf", "-Mc"], complexes)
        # one host for all slots, or (on the nodes) one slot per host: -pe f_node 2 spans both nodes
        self._load(["qconf", "-Ap"], PE if self.nodes is None else PE.replace("$fill_up", "1"))
        queue = (f"qname all.q\nhostlist {' '.join(self.exec_hosts)}\nseq_no 0\nload_thresholds NONE\n"
                 f"suspend_thresholds NONE\n"
                 f"nsuspend 1\nsuspend_interval 00:05:00\npriority 0\nmin_cpu_interval 00:05:00\n"
                 f"processors UNDEFINED\nqtype BATCH INTERACTIVE\nckpt_list NONE\npe_list f_node\nrerun FALSE\n"
                 f"slots {self.cpus}\ntmpdir {tmp}\nshell /bin/bash\nprolog NONE\nepilog NONE\n"
                 f"shell_start_mode unix_behavior\nstarter_method NONE\nsuspend_method NONE\nresume_method NONE\n"
                 f"terminate_method NONE\nnotify 00:00:60\nowner_list NONE\nuser_lists NONE\nxuser_lists NONE\n"
                 f"subordinate_list NONE\ncomplex_values node_f=64\nprojects NONE\nxprojects NONE\ncalendar NONE\n"
                 f"initial_state default\n"
                 + "".join(f"{k} INFINITY\n" for k in ("s_rt", "h_rt", "s_cpu", "h_cpu", "s_fsize", "h_fsize",
                                                        "s_data", "h_data", "s_stack", "h_stack", "s_core",
                                                        "h_core", "s_rss", "h_rss", "s_vmem", "h_vmem")))
        self._load(["qconf", "-Aq"], queue)

    def _load(self, argv: list[str], text: str):
        path = self.root / f"load-{len(list(self.root.glob('load-*')))}.txt"
        path.write_text(text)
        self.run([*argv, str(path)])

    def _until(self, ready, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise SchedulerUnavailable(f"Grid Engine: no {what} after {timeout_s:.0f} s:\n{self.logs()}")
            time.sleep(0.3)

    def stop(self):
        """Delete every job, shut both daemons down, then kill what is left by pid."""
        if (self.cell / "common" / "act_qmaster").exists():
            self.run(["qdel", "-f", "-u", "root"], check=False, timeout_s=15)
            for host in self.exec_hosts:
                self.run(["qconf", "-ke", host], check=False, timeout_s=15)
            self.run(["qconf", "-km"], check=False, timeout_s=15)
        time.sleep(1)
        for pid_file in [*self.root.glob("spool/execd/*/execd.pid"), self.root / "spool/qmaster/qmaster.pid"]:
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
            except (OSError, ValueError):
                pass  # already gone

    def logs(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-chars:]}"
                         for p in self.root.glob("spool/**/messages"))

    # ---------------------------------------------------------------------------- jobs

    def wait(self, job_id: str, timeout_s: float) -> dict:
        """The job's accounting record (qacct) once it has finished; qdel and fail past the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            done = self.run(["qacct", "-j", job_id], check=False)
            if done.returncode == 0 and "exit_status" in done.stdout:
                return dict(line.split(None, 1) for line in done.stdout.splitlines() if len(line.split(None, 1)) == 2)
            if time.monotonic() > deadline:
                self.run(["qdel", "-f", job_id], check=False)
                raise AssertionError(f"Grid Engine job {job_id} not finished after {timeout_s:.0f} s:\n"
                                     f"{self.run(['qstat', '-j', job_id], check=False).stdout}\n{self.logs()}")
            time.sleep(0.5)


def _set(text: str, **values) -> str:
    lines = []
    for line in text.splitlines():
        key = line.split(None, 1)[0] if line.split() else ""
        lines.append(f"{key} {values[key]}" if key in values else line)
    return "\n".join(lines) + "\n"


def _addresses(host: str) -> set[str]:
    return {info[4][0] for info in socket.getaddrinfo(host, None, socket.AF_INET)}
