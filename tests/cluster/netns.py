"""A small cluster on this host: network namespaces as nodes, for the multi-node tests.

    head   10.231.77.1   the controllers (slurmctld, sge_qmaster) and every client command (sbatch, qsub)
    node1  10.231.77.11  a compute node (slurmd, sge_execd, and the ranks they start)
    node2  10.231.77.12  ...

Each host is a network namespace with its own hostname and /etc/hosts: a `sleep` keeper process holds
a UTS namespace and a private mount namespace in which a hosts file of ours is bound over /etc/hosts
(not `ip netns exec`, whose fresh /sys lacks the cgroup mounts slurmd needs). The nodes hang off a
bridge inside the head's namespace by veth pairs: nothing is added to this host's own network, traffic
stays on links inside the namespaces made here (a private /24 that nothing else uses), and the host
sees only the namespaces' names in /run/netns.

Files are shared as on a real cluster with a shared file system (same disk), and so is munge's
socket (a file). `lose(host)` pulls a node's link and kills its processes, as a host that vanishes.
`stop()` kills every process in the namespaces and deletes them; `leftovers()` lists whatever would
still be there: namespaces, keepers, veths, mounts (the fixtures assert it is nothing).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.231.77"
PREFIX = "mjtest"  # every namespace made here starts with it; leftovers() looks for it
KEEPER_S = 3600  # a keeper outlives no test session by more than this


class NodesUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no `ip`/`unshare`/`nsenter`): the message says why."""


@dataclass
class Host:
    name: str  # hostname, as the schedulers and the ranks see it
    address: str
    netns: str
    keeper: subprocess.Popen | None = None

    def prefix(self) -> list[str]:
        """The command prefix that runs a program on this host (its network, hostname and /etc/hosts)."""
        return ["nsenter", "-t", str(self.keeper.pid), "-n", "-u", "-m", "--"]


@dataclass
class VirtualCluster:
    root: Path  # the hosts files
    nodes: tuple[str, ...] = ("node1", "node2")
    tag: str = field(default_factory=lambda: str(os.getpid()))
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def head(self) -> Host:
        return self.hosts["head"]

    def node_hosts(self) -> list[Host]:
        return [self.hosts[n] for n in self.nodes]

    # ---------------------------------------------------------------------------- start and stop

    def start(self, timeout_s: float = 20):
        if os.geteuid() != 0:
            raise NodesUnavailable("network namespaces need root; run the tests as root")
        missing = [t for t in ("ip", "unshare", "nsenter") if shutil.which(t) is None]
        if missing:
            raise NodesUnavailable(f"{', '.join(missing)} not found (Debian: iproute2, util-linux)")
        names = ("head", *self.nodes)
        for i, name in enumerate(names):
            self.hosts[name] = Host(name, f"{SUBNET}.{1 if i == 0 else 10 + i}", f"{PREFIX}{self.tag}-{name}")
        try:
            self._make_network()
            for host in self.hosts.values():
                self._start_keeper(host, timeout_s)
        except (subprocess.CalledProcessError, OSError) as e:
            self.stop()
            raise NodesUnavailable(f"could not make the namespaces: {e}") from e

    def _make_network(self):
        head = self.head.netns
        _ip("netns", "add", head)
        _ip("-n", head, "link", "set", "lo", "up")
        _ip("-n", head, "link", "add", "br0", "type", "bridge")
        _ip("-n", head, "addr", "add", f"{self.head.address}/24", "dev", "br0")
        _ip("-n", head, "link", "set", "br0", "up")
        for host in self.node_hosts():
            _ip("netns", "add", host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
            # made inside the node's namespace, its peer moved to the head's: nothing appears on this host
            _ip("-n", host.netns, "link", "add", "eth0", "type", "veth", "peer", "name", f"to-{host.name}",
                "netns", head)
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", head, "link", "set", f"to-{host.name}", "master", "br0", "up")

    def _write_hosts_file(self, host: Host) -> Path:
        path = self.root / f"hosts.{host.name}"
        self.root.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", *(f"{h.address} {h.name}" for h in self.hosts.values())]
        path.write_text("\n".join(lines) + "\n")
        return path

    def _start_keeper(self, host: Host, timeout_s: float):
        hosts_file = self._write_hosts_file(host)
        host.keeper = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--uts", "--",
             "nsenter", f"--net=/run/netns/{host.netns}", "--", "sh", "-c",
             f"mount --bind {hosts_file} /etc/hosts && hostname {host.name} && exec sleep {KEEPER_S}"],
            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while self.run(host.name, ["hostname"], check=False).stdout.strip() != host.name:
            if host.keeper.poll() is not None or time.monotonic() > deadline:
                raise OSError(f"the keeper of {host.name} did not start (status {host.keeper.poll()})")
            time.sleep(0.05)

    def run(self, host: str, argv: list[str], check: bool = True, timeout_s: float = 30, **kwargs):
        return subprocess.run([*self.hosts[host].prefix(), *argv], capture_output=True, text=True,
                              timeout=timeout_s, check=check, **kwargs)

    def lose(self, name: str):
        """The host vanishes: its link goes first (no goodbye reaches the others), then every process on it."""
        host = self.hosts[name]
        _ip("-n", self.head.netns, "link", "del", f"to-{host.name}", check=False)
        self._kill_all(host)

    def stop(self):
        for host in reversed(list(self.hosts.values())):
            self._kill_all(host)
            _ip("netns", "del", host.netns, check=False)

    def _kill_all(self, host: Host, timeout_s: float = 10):
        """SIGKILL every process in the host's namespace (and its keeper), until none is left."""
        deadline = time.monotonic() + timeout_s
        while True:
            pids = netns_pids(host.netns)
            if host.keeper is not None and host.keeper.poll() is None:
                pids.add(host.keeper.pid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if host.keeper is not None:
                try:
                    host.keeper.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {sorted(pids)} of {host.name} survive SIGKILL")
            time.sleep(0.1)

    def leftovers(self) -> list[str]:
        """What this cluster would leave on the host: namespaces, their processes, veths, mounts, files."""
        found = []
        for host in self.hosts.values():
            if Path("/run/netns", host.netns).exists():
                found.append(f"namespace {host.netns}")
            if host.keeper is not None and host.keeper.poll() is None:
                found.append(f"keeper process {host.keeper.pid} of {host.name}")
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if "to-node" in line]
        mounts = Path("/proc/self/mountinfo").read_text()
        found += [f"mount {line.split()[4]}" for line in mounts.splitlines()
                  if f"{PREFIX}{self.tag}-" in line or str(self.root) in line]
        return found


def netns_pids(netns: str) -> set[int]:
    result = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return {int(p) for p in result.stdout.split()} if result.returncode == 0 else set()


def live_pids(netns: str) -> set[int]:
    """The namespace's processes that are not zombies (a dead daemon that no one has reaped yet)."""
    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    return {pid for pid in netns_pids(netns) if alive(pid)}


def _ip(*args: str, check: bool = True):
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, ["ip", *args], result.stdout, result.stderr)
    return result
