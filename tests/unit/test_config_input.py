"""Issue 19, items 9, 11 and 17: configuration input. A key given twice (YAML, at any depth, or on the
command line) is refused naming the file, both lines and the key; absurd numbers are refused by their
bound, which says why, before anything is built; an error names where its value came from."""

import subprocess
import sys
import time

import pytest

from megatron_jp.config import ConfigError, load_config, validate

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key, lines", [
    ("optim:\n  lr: 3.0e-3\n  weight_decay: 0.1\n  lr: 300.0\n", "lr", (2, 4)),
    ("model:\n  preset: tiny\ntrain:\n  steps: 5\nmodel:\n  num_layers: 2\n", "model", (1, 5)),
    ("data:\n  seq_length: 64\n  paths: a\n  seq_length: 128\n", "seq_length", (2, 4)),
    ("train:\n  seed: 1\n  nested: {a: 1, a: 2}\n", "a", (3, 3)),
])
def test_a_duplicated_yaml_key_is_refused_naming_file_both_lines_and_key(tmp_path, text, key, lines):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"{path}: key '{key}' is given twice in one mapping, at lines "
                                          rf"{lines[0]} and {lines[1]}"):
        load_config(str(path))


def test_a_key_given_twice_on_the_command_line_is_refused():
    with pytest.raises(ConfigError, match=r"command line: --optim.lr is given twice \('1e-3' and '300'\)"):
        load_config(None, ["--optim.lr", "1e-3", "--optim.lr=300"])


def test_an_override_error_names_the_command_line_not_the_yaml_file(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"^command line: optim.lr = 'abc' is not a valid float"):
        load_config(str(path), ["--optim.lr", "abc"])
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'optim.lrr'"):
        load_config(str(path), ["--optim.lrr", "3"])
    with pytest.raises(ConfigError, match=rf"^{path}: optim.lr = 'abc'"):
        load_config(str(write(tmp_path, "optim:\n  lr: abc\n")))


def test_a_config_that_is_a_folder_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; give a YAML file"):
        load_config(str(tmp_path))


@pytest.mark.parametrize("override, message", [
    (["--train.seed", str(2**70)], r"train.seed .* out of range: .*64-bit seeds"),
    (["--data.seq_length", "100000000000"], r"data.seq_length .* out of range: .*far beyond any encoder"),
    (["--train.steps", str(10**20)], r"train.steps .* out of range: .*2\*\*53"),
    (["--model.hidden_size", str(10**12)], r"model: about .* TB of fp32 weights alone .*hidden_size"),
    (["--model.num_layers", str(10**9)], r"model: about .* TB of fp32 weights alone .*num_layers 1000000000"),
    (["--model.ffn_hidden_size", str(10**13)], r"model: about .* TB of fp32 weights alone"),
])
def test_absurd_numbers_are_refused_by_a_bound_that_says_why(override, message):
    begin = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, ["--model.preset", "tiny", "--model.vocab_size", "3072", *override]), 1)
    assert time.perf_counter() - begin < 5  # refused from the fields, nothing built


def test_the_dry_run_of_a_billion_layers_answers_at_once_with_status_2():
    result = subprocess.run([sys.executable, "-m", "megatron_jp.train", "--model.preset", "tiny",
                             "--model.vocab_size", "3072", "--model.num_layers", "1000000000", "--dry-run"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error: model: about")
    assert "Traceback" not in result.stderr
