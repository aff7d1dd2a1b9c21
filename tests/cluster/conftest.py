"""Fixtures of the cluster tests: the integration helpers (train_runs.py), shards of the bundled corpus,
and real schedulers on this host: SLURM (slurm_cluster.py) and Grid Engine (gridengine_cluster.py)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))  # train_runs.py

from train_runs import ROOT, make_shards  # noqa: E402


HOW_TO_RUN = ("run them as root with `bash tests/run.sh tests/cluster` (it installs SLURM, Grid Engine and "
              "OpenMPI from Debian's packages: tools/install_test_schedulers.sh says which and why)")


def unavailable(reason: str):
    """Skip, saying how to run these tests; in CI (MEGATRON_JP_CLUSTER_TESTS=required, .ci/run) fail instead."""
    if os.environ.get("MEGATRON_JP_CLUSTER_TESTS") == "required":
        pytest.fail(f"{reason} (MEGATRON_JP_CLUSTER_TESTS=required: the cluster tests must run here)")
    pytest.skip(f"{reason}; {HOW_TO_RUN}")


def pytest_collection_modifyitems(config, items):
    """MEGATRON_JP_CLUSTER_TESTS=skip: every test of this folder skips, saying how to run it."""
    if os.environ.get("MEGATRON_JP_CLUSTER_TESTS") == "skip":
        marker = pytest.mark.skip(reason=f"skipped by MEGATRON_JP_CLUSTER_TESTS=skip; {HOW_TO_RUN}")
        for item in items:
            if Path(str(item.fspath)).parent == Path(__file__).parent:
                item.add_marker(marker)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    return make_shards(tmp_path_factory.mktemp("shards"))


def running(cluster, packages: str, name: str):
    """Install `packages` (tools/install_test_schedulers.sh) if absent, start `cluster`, yield it, stop it.

    Skipped, with the reason and how to run them, where the scheduler cannot be installed (not root, no
    apt, offline) or the user said MEGATRON_JP_CLUSTER_TESTS=skip; one that is installed but does not
    start is an error. Every job is cancelled and every daemon stopped at the end, whatever happened.
    """
    from slurm_cluster import SchedulerUnavailable

    install = subprocess.run(["bash", str(ROOT / "tools" / "install_test_schedulers.sh"), packages],
                             capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        unavailable(f"{name} not available: {install.stderr.strip()[-500:]}")
    try:
        cluster.start()
    except SchedulerUnavailable as e:
        cluster.stop()
        if "not installed" in str(e) or "as root" in str(e):
            unavailable(f"{name} not available: {e}")
        pytest.fail(f"{name} did not start: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """munged + slurmctld + slurmd on this host, the host as the one node."""
    from slurm_cluster import SlurmCluster

    yield from running(SlurmCluster(tmp_path_factory.mktemp("slurm")), "slurm", "SLURM")


@pytest.fixture(scope="session")
def nodes(tmp_path_factory):
    """Three network namespaces on this host: a head and two nodes (netns.py), checked clean at the end."""
    from netns import NodesUnavailable, VirtualCluster

    cluster = VirtualCluster(tmp_path_factory.mktemp("nodes"))
    try:
        cluster.start()
    except NodesUnavailable as e:
        unavailable(f"no two-node cluster here: {e}")
    try:
        yield cluster
        # the schedulers on it (slurm2, gridengine2) are stopped by now: nothing but the keepers is left
        assert_no_process_left(cluster, "the two-node schedulers")
    finally:
        cluster.stop()
        assert cluster.leftovers() == [], f"left behind: {cluster.leftovers()}"


@pytest.fixture(scope="session")
def slurm2(nodes, tmp_path_factory):
    """slurmctld on the head, a slurmd on each of node1 and node2 (munged here, its socket shared)."""
    from slurm_cluster import SlurmCluster

    yield from running(SlurmCluster(tmp_path_factory.mktemp("slurm2"), nodes=nodes), "slurm", "SLURM (two nodes)")


@pytest.fixture(scope="session")
def gridengine(tmp_path_factory):
    """sge_qmaster + sge_execd on this host, the host as the one execution host."""
    from gridengine_cluster import GridEngineCluster

    yield from running(GridEngineCluster(tmp_path_factory.mktemp("sge")), "gridengine", "Grid Engine")


@pytest.fixture(scope="session")
def gridengine2(nodes, tmp_path_factory):
    """sge_qmaster on the head, an execution host (sge_execd) on each of node1 and node2."""
    from gridengine_cluster import GridEngineCluster

    yield from running(GridEngineCluster(tmp_path_factory.mktemp("sge2"), nodes=nodes), "gridengine",
                       "Grid Engine (two nodes)")


def assert_no_process_left(nodes, what: str):
    """Once a scheduler has stopped, its hosts hold nothing but their keepers (stop() would hide a leak)."""
    from netns import live_pids

    deadline = time.monotonic() + 10  # SIGKILLed daemons take a moment to go
    while any(left := {h.name: live_pids(h.netns) - {h.keeper.pid} for h in nodes.hosts.values()}.values()):
        assert time.monotonic() < deadline, f"processes of {what} outlived it: {left}"
        time.sleep(0.2)
