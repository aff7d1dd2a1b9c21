"""Fixtures of the cluster tests: the integration helpers (train_runs.py), shards of the bundled corpus,
and a real SLURM controller + node on this host (slurm_cluster.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))  # train_runs.py

from train_runs import make_shards  # noqa: E402


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    return make_shards(tmp_path_factory.mktemp("shards"))
