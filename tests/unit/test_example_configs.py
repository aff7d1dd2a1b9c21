"""Every YAML in examples/ dry-runs into the model its card describes, in the layout it configures."""

import json
from pathlib import Path

import pytest
import yaml

from megatron_jp.models.config import REPORTED_PARAMS
from megatron_jp.train import main as train_main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SEED_CONFIGS = sorted(p for p in EXAMPLES.glob("*.yaml") if p.name != "quickstart.yaml")


def dry_run(capsys, *args: str) -> dict:
    assert train_main(["--dry-run", *args]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("path", SEED_CONFIGS, ids=lambda p: p.stem)
def test_seed_config_dry_runs_into_its_cards_model_and_layout(capsys, path):
    summary = dry_run(capsys, "--config", str(path))
    total, non_embedding = REPORTED_PARAMS[path.stem]
    assert summary["preset"] == path.stem
    assert abs(summary["params_total"] - total) <= 0.02 * total  # the presets' tolerance (test_presets.py)
    assert non_embedding is None or abs(summary["params_non_embedding"] - non_embedding) <= 0.02 * non_embedding
    parallel = yaml.safe_load(path.read_text()).get("parallel", {})
    assert summary["tensor"] == parallel.get("tensor", 1) and summary["pipeline"] == parallel.get("pipeline", 1)
    assert summary["zero1"] == parallel.get("zero1", False)
    assert summary["memory_per_rank_bytes"] > 2 * summary["params_total"] / summary["tensor"] / summary["pipeline"]


def test_quickstart_config_dry_runs_once_the_vocabulary_is_known(capsys):
    # its vocabulary comes from the tokenizer the quickstart trains (3,000 pieces, padded to 3,072)
    summary = dry_run(capsys, "--config", str(EXAMPLES / "quickstart.yaml"), "--model.vocab_size", "3072")
    assert summary["preset"] == "tiny" and 0.5e6 < summary["params_total"] < 0.6e6
