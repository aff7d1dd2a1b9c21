"""Every YAML in examples/ validates and dry-runs (the quickstart used to check this on each run)."""

import json
from pathlib import Path

import pytest

from megatron_jp.train import main as train_main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SEED_CONFIGS = sorted(p for p in EXAMPLES.glob("*.yaml") if p.name != "quickstart.yaml")


def dry_run(capsys, *args: str) -> dict:
    assert train_main(["--dry-run", *args]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("path", SEED_CONFIGS, ids=lambda p: p.stem)
def test_seed_config_dry_runs_with_its_preset(capsys, path):
    summary = dry_run(capsys, "--config", str(path))
    assert summary["preset"] == path.stem and summary["params_total"] > summary["params_non_embedding"] > 0


def test_quickstart_config_dry_runs_once_the_vocabulary_is_known(capsys):
    # its vocabulary comes from the tokenizer the quickstart trains (3,000 pieces, padded to 3,072)
    summary = dry_run(capsys, "--config", str(EXAMPLES / "quickstart.yaml"), "--model.vocab_size", "3072")
    assert summary["preset"] == "tiny" and 0.5e6 < summary["params_total"] < 0.6e6
