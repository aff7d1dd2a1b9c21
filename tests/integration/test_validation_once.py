"""The config is validated once per run, at the boundary (the CLI), whatever path the run takes."""

import sys

import pytest

import megatron_jp.config
from megatron_jp.train import main as train_main
from train_runs import base_args, make_shards


@pytest.fixture
def validate_calls(monkeypatch):
    """Every module's `validate` (wherever it was imported) replaced by a counting wrapper."""
    original, calls = megatron_jp.config.validate, []

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    for module in list(sys.modules.values()):
        if module is not None and module.__name__.startswith("megatron_jp") \
                and getattr(module, "validate", None) is original:
            monkeypatch.setattr(module, "validate", counted)
    return calls


def test_a_training_run_validates_its_config_exactly_once(tmp_path, validate_calls, one_thread):
    data = make_shards(tmp_path / "shards")
    short = {"optim.warmup_steps": 1, "checkpoint.interval": 1, "eval.interval": 1, "eval.steps": 1}
    assert train_main(base_args(data, tmp_path / "run", **short, **{"train.steps": 2})) == 0
    assert len(validate_calls) == 1
    assert train_main(base_args(data, tmp_path / "run", **short, **{"train.steps": 3})) == 0  # resumes at 2
    assert len(validate_calls) == 2


def test_a_dry_run_validates_its_config_exactly_once(validate_calls, capsys):
    assert train_main(["--dry-run", "--model.preset", "tohoku-bert-500m", "--parallel.tensor", "2"]) == 0
    assert len(validate_calls) == 1
