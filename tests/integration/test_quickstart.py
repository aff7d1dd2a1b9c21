"""The README's main job, shortened: tokenizer -> shards -> pretraining -> Hugging Face -> scores -> plot.

One run of `examples/quickstart.py --steps 60` in a temporary work directory (about a minute on two
cores); the tests below read what it left behind.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 60
TIMEOUT_S = 420  # ~1 min alone on 2 cores; the margin is for a machine busy with other test processes


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quickstart")
    result = subprocess.run([sys.executable, "examples/quickstart.py", "--workdir", str(workdir),
                             "--steps", str(STEPS), "--pppl-docs", "8"],
                            cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"quickstart failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    summary = json.loads((workdir / "summary.json").read_text())
    return workdir, summary, result.stdout


@pytest.mark.slow
def test_quickstart_pretrains_exports_and_lowers_validation_loss(quickstart):
    workdir, summary, stdout = quickstart
    records = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    assert len(valid) >= 2 and valid[-1][0] == STEPS, valid  # --steps 60 validates every 10 steps
    # Every evaluation scores the same batches with the same masks, so differences come from training
    # alone. 60 steps go from ~7.2 at step 10 to the corpus's unigram level, ~6.6 nats at step 60.
    assert valid[-1][1] < valid[0][1] - 0.3, valid
    # the quickstart scores the initial model (~ln 3072 = 8.03) on those batches too: step 0
    assert valid[-1][1] < summary["valid_loss_init"] - 1.0, (summary["valid_loss_init"], valid)
    assert summary["pppl_after"] < summary["pppl_before"] / 2
    assert "== summary" in stdout and "pseudo-perplexity" in stdout


@pytest.mark.slow
def test_quickstart_export_loads_with_plain_auto_classes(quickstart):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    workdir, summary, _ = quickstart
    model = AutoModelForMaskedLM.from_pretrained(str(workdir / "hf"))  # no trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "hf"))
    assert type(model).__name__ == "EuroBertForMaskedLM"
    assert tokenizer.mask_token == "[MASK]"
    assert summary["logit_gap"] < 1e-4  # float32 rounding between two implementations of one model


@pytest.mark.slow
def test_quickstart_writes_the_loss_curve(quickstart):
    workdir, summary, stdout = quickstart
    png = Path(summary["png"])
    assert png == workdir / "run" / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in stdout or "run/metrics.png" in stdout


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_quickstart_scores_masked_words_and_zero_shot_sts_before_and_after_training(quickstart):
    import math

    from scipy.stats import spearmanr

    workdir, summary, stdout = quickstart
    for when in ("before", "after"):
        rows = _rows(workdir / "eval" / when / "intrinsic")
        words = [r for r in rows if r["kind"] == "masked_word"]
        right = sum(r["prediction"] == r["gold"] for r in words) / len(words)
        assert summary[f"masked_word_accuracy_{when}"] == pytest.approx(right, abs=1e-12)
        pppl = [r for r in rows if r["kind"] == "pppl"]
        ll, tokens = sum(r["log_likelihood"] for r in pppl), sum(r["tokens"] for r in pppl)
        assert summary[f"pppl_{when}"] == pytest.approx(math.exp(-ll / tokens), rel=1e-12)
        sts = _rows(workdir / "eval" / when / "sts")
        assert len(sts) == 40
        rho = spearmanr([r["prediction"] for r in sts], [r["gold"] for r in sts])[0]
        assert summary[f"sts_spearman_{when}"] == pytest.approx(rho, abs=1e-12)
    # an untrained model predicts no masked word; 60 steps learn particles and endings (~5-10%)
    assert summary["masked_word_accuracy_after"] > summary["masked_word_accuracy_before"]
    assert "masked words" in stdout and "zero-shot STS" in stdout
