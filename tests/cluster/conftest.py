"""Fixtures of the cluster tests: the integration helpers (train_runs.py), shards of the bundled corpus,
and a real SLURM controller + node on this host (slurm_cluster.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))  # train_runs.py

from train_runs import ROOT, make_shards  # noqa: E402


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A SLURM controller and node on this host for the session; installed first if absent and root.

    Skipped (with the reason) where it cannot be installed; a SLURM that is installed but does not
    start is an error. Every job is cancelled and every daemon stopped at the end, whatever happened.
    """
    from slurm_cluster import SchedulerUnavailable, SlurmCluster

    install = subprocess.run(["bash", str(ROOT / "tools" / "install_test_schedulers.sh"), "slurm"],
                             capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        pytest.skip(f"SLURM not available: {install.stderr.strip()[-500:]}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SchedulerUnavailable as e:
        cluster.stop()
        if "not installed" in str(e) or "as root" in str(e):
            pytest.skip(f"SLURM not available: {e}")
        pytest.fail(f"SLURM did not start: {e}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def gridengine(tmp_path_factory):
    """Debian's Grid Engine (qmaster + execd) on this host for the session, like `slurm` above."""
    from gridengine_cluster import GridEngineCluster
    from slurm_cluster import SchedulerUnavailable

    install = subprocess.run(["bash", str(ROOT / "tools" / "install_test_schedulers.sh"), "gridengine"],
                             capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        pytest.skip(f"Grid Engine not available: {install.stderr.strip()[-500:]}")
    cluster = GridEngineCluster(tmp_path_factory.mktemp("sge"))
    try:
        cluster.start()
    except SchedulerUnavailable as e:
        cluster.stop()
        if "not installed" in str(e) or "as root" in str(e):
            pytest.skip(f"Grid Engine not available: {e}")
        pytest.fail(f"Grid Engine did not start: {e}")
    yield cluster
    cluster.stop()
