"""`eval.intrinsic: true`: masked-word accuracy in metrics.jsonl at each validation, the same in a
tensor-parallel and a pipeline-parallel layout as in one process.

Across layouts the logits are reassociated (partial sums per shard), so the loss agrees to 1e-5
relative as in test_train_driver.py; the accuracies count argmax hits, equal unless a logit tie
flips, which these few hundred tokens of a tiny model do not have.
"""

import pytest

from train_runs import base_args, records, train, train_ok

# model.vocab_size fixed: padding to a multiple of 128 x tensor would otherwise give tp=2 another shape
INTRINSIC = {"eval.intrinsic": "true", "eval.interval": 5, "eval.steps": 2, "data.split": "80,20",
             "train.steps": 10, "checkpoint.interval": 0, "model.vocab_size": 512}
KEYS = ("masked_word_accuracy", "masked_token_accuracy", "masked_word_loss", "masked_words")


def validation_lines(run_dir):
    return [r for r in records(run_dir) if "valid_loss" in r]


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    train_ok(base_args(data, run_dir, **INTRINSIC))
    return validation_lines(run_dir)


def test_validation_lines_carry_masked_word_accuracy(single):
    assert [r["step"] for r in single] == [5, 10]
    for r in single:
        assert set(KEYS) <= r.keys() and r["masked_words"] > 0 and 0 <= r["masked_word_accuracy"] <= 1
    assert single[0]["masked_words"] == single[1]["masked_words"]  # the same masks at every evaluation


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"parallel.tensor": 2}, {"parallel.pipeline": 2}], ids=["tp2", "pp2"])
def test_masked_word_accuracy_is_the_same_in_another_layout(data, single, tmp_path, layout):
    train_ok(base_args(data, tmp_path, **INTRINSIC, **layout), nproc=2)
    for mine, reference in zip(validation_lines(tmp_path), single):
        assert mine["masked_words"] == reference["masked_words"]
        assert mine["masked_word_accuracy"] == reference["masked_word_accuracy"]
        assert mine["masked_word_loss"] == pytest.approx(reference["masked_word_loss"], rel=1e-5)


def test_missing_word_flags_are_refused_before_training(tmp_path):
    import subprocess
    import sys

    from train_runs import EXAMPLE_CORPUS, ROOT

    prefix = tmp_path / "plain"
    subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(EXAMPLE_CORPUS),
                    "--tokenizer-type", "ByteTokenizer", "--output-prefix", str(prefix), "--quiet"],
                   check=True, capture_output=True, timeout=120)
    args = base_args(f"{prefix}_text_document", tmp_path / "run", **INTRINSIC, **{"data.whole_word_masking": "false"})
    result = train(args)
    assert result.returncode == 2 and "eval.intrinsic needs the word flags" in result.stderr
