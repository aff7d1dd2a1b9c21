"""Issue 19, item 8: a resume or a new phase that changes the model (activation, norm, any model key)
or the tokenizer (at the same vocabulary size) is refused before training, naming the key and both
values, unless checkpoint.allow_changes names it; a phase keeps the documented context-extension keys."""

import pytest

from train_runs import base_args, records, train, train_ok


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    train_ok(base_args(data, run_dir, **{"train.steps": 2, "optim.warmup_steps": 1, "checkpoint.interval": 0}))
    return run_dir


@pytest.mark.parametrize("key, value, message", [
    ("model.activation", "geglu", "model.activation: 'swiglu' in the checkpoint, 'geglu' now"),
    ("model.norm", "layernorm", "model.norm: 'rmsnorm' in the checkpoint, 'layernorm' now"),
    ("model.norm_eps", "1e-6", "model.norm_eps: 1e-05 in the checkpoint, 1e-06 now"),
])
def test_a_resume_that_changes_a_model_key_is_refused_naming_it(data, trained, tmp_path, key, value, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = base_args(data, trained, **{"train.steps": 3, "optim.warmup_steps": 1, key: value})
    result = train(args)
    assert result.returncode == 2 and message in result.stderr and "checkpoint.allow_changes" in result.stderr
    assert [r["step"] for r in records(trained) if "loss" in r] == [1, 2]  # nothing trained


def test_a_new_phase_with_another_tokenizer_of_the_same_size_is_refused(data, trained, tmp_path):
    # a "tokenizer" with the byte vocabulary but another identity: the checkpoint's record is edited
    import json

    meta = trained / "checkpoints" / "iter_0000002" / "meta.json"
    record = json.loads(meta.read_text())
    saved = record["meta"]["tokenizer"]
    assert saved["type"] == "ByteTokenizer"
    record["meta"]["tokenizer"] = {**saved, "type": "SentencePieceTokenizer", "sha256": "ab" * 32}
    other = tmp_path / "other"
    (other / "iter_0000002").mkdir(parents=True)
    import shutil

    shutil.copytree(trained / "checkpoints" / "iter_0000002", other / "iter_0000002", dirs_exist_ok=True)
    (other / "iter_0000002" / "meta.json").write_text(json.dumps(record))
    (other / "latest").write_text("iter_0000002\n")
    result = train(base_args(data, tmp_path / "run", **{"checkpoint.load": str(other), "train.steps": 3}))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "tokenizer: SentencePieceTokenizer" in result.stderr and "ByteTokenizer (built in" in result.stderr


def test_the_documented_phase_keys_and_an_explicit_opt_in_still_train(data, trained, tmp_path):
    source = str(trained / "checkpoints")
    train_ok(base_args(data, tmp_path / "a", **{"checkpoint.load": source, "checkpoint.reset_optimizer": "true",
                                                "data.seq_length": 128, "model.rope_theta": 160000,
                                                "train.steps": 3}))
    train_ok(base_args(data, tmp_path / "b", **{"checkpoint.load": source, "checkpoint.reset_optimizer": "true",
                                                "model.activation": "geglu", "checkpoint.allow_changes": "activation",
                                                "train.steps": 3}))
