"""Configs are read from YAML and the command line, and bad ones are refused naming the key."""

import dataclasses

import pytest
import yaml

from megatron_jp.config import (Config, ConfigError, RampUp, TrainConfig, config_from_dict, describe, field_docs,
                                load_config, padded_vocab_size, section_fields, to_yaml, validate)
from megatron_jp.models.config import ModelConfig, preset


def checked(overrides: list[str], world_size: int = 1):
    """What the CLI does: build the config, then validate it once for the world size."""
    cfg = load_config(None, overrides)
    validate(cfg, world_size)
    return cfg


def write_yaml(tmp_path, data) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_yaml_then_overrides_then_preset_resolve_in_order(tmp_path):
    path = write_yaml(tmp_path, {"model": {"preset": "tiny", "num_layers": 2}, "train": {"steps": 7}})
    cfg = load_config(path, ["--train.steps", "9", "--optim.lr=3e-4", "--parallel.zero1", "true"])
    assert cfg.model.num_layers == 2  # YAML beats the preset
    assert cfg.model.num_kv_heads == 2  # from the preset
    assert cfg.train.steps == 9 and cfg.optim.lr == 3e-4 and cfg.parallel.zero1 is True


def test_every_field_has_a_docstring():
    for name, section in vars(Config()).items():
        fields = {f.name for f in dataclasses.fields(section)}
        assert fields == set(field_docs(type(section))), f"{name}: undocumented fields"
    assert "  preset: ''  # Name of a preset" in describe()


@pytest.mark.parametrize("overrides, key", [
    (["--model.presett", "tiny"], "model.preset"),
    (["--trian.steps", "3"], "train"),
    (["--optim.warmup_step", "1"], "optim.warmup_steps"),
])
def test_unknown_keys_are_refused_with_the_closest_names(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides, key", [
    (["--model.preset", "tiny", "--model.hidden_size", "66", "--model.num_heads", "4"], "model.hidden_size"),
    (["--model.preset", "tiny", "--model.num_kv_heads", "3"], "model.num_kv_heads"),
    (["--model.preset", "tiny-modernbert", "--model.sliding_window", "0"], "model.sliding_window"),
    (["--model.preset", "tiny-modernbert", "--model.sliding_window", "15"], "model.sliding_window"),
    (["--model.preset", "tiny", "--parallel.tensor", "8"], "parallel.tensor"),
    (["--model.preset", "tiny", "--parallel.pipeline", "3"], "parallel.pipeline"),
    (["--model.preset", "tiny", "--model.vocab_size", "1001", "--parallel.tensor", "2"], "model.vocab_size"),
    (["--model.preset", "tiny", "--model.activation", "relu"], "model.activation"),
    (["--model.preset", "nope"], "model.preset"),
    (["--train.steps", "ten"], "train.steps"),
    (["--train.global_batch_size", "6", "--train.micro_batch_size", "4"], "train.global_batch_size"),
    (["--data.packing", "greedy"], "data.packing"),
    (["--data.mask_prob", "1.5"], "data.mask_prob"),
    (["--optim.min_lr", "1", "--optim.lr", "0.1"], "optim.min_lr"),
    (["--model.position_embedding", "learned", "--model.max_position_embeddings", "128",
      "--data.seq_length", "512"], "model.max_position_embeddings"),
])
def test_bad_values_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        checked(overrides)


def test_layout_is_checked_against_the_world_size():
    cfg = load_config(None, ["--parallel.tensor", "2", "--train.global_batch_size", "8",
                             "--train.micro_batch_size", "4"])
    validate(cfg, world_size=4)  # dp = 2, 8 = 4 x 2
    with pytest.raises(ConfigError, match="world size 3"):
        validate(cfg, world_size=3)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        validate(cfg, world_size=8)  # dp = 4 needs a multiple of 16


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        load_config(write_yaml(tmp_path, {"model": 3}))


def test_tokenizer_vocabulary_is_padded_for_tensor_parallel_shards():
    m = ModelConfig()
    assert padded_vocab_size(32000, m, tensor=1) == 32000
    assert padded_vocab_size(32001, m, tensor=1) == 32128
    assert padded_vocab_size(32001, m, tensor=4) == 32256 and 32256 % (128 * 4) == 0


@pytest.mark.parametrize("overrides, key", [
    (["--data.seq_length_stages", "0:128,100:4"], "data.seq_length_stages"),
    (["--data.mask_prob_stages", "0:0.5,10:1.2"], "data.mask_prob_stages"),
    (["--train.rampup_batch_size", "3 4 100"], "train.rampup_batch_size"),
])
def test_bad_curricula_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        checked(overrides)


def numeric_fields():
    """(section, key, FieldType) of every int and float field."""
    for name in Config().to_dict():
        section_cls = type(getattr(Config(), name))
        for key, ftype in section_fields(section_cls).items():
            if ftype.base in (int, float):
                yield name, key, ftype


def out_of_range(ftype) -> list:
    r, bad = ftype.range, []
    if r.low is not None:
        bad.append(r.low if r.low_open else r.low - (1 if ftype.base is int else 1e-3))
    if r.high is not None:
        bad.append(r.high if r.high_open else r.high + (1 if ftype.base is int else 1e-3))
    if ftype.base is float:
        bad += [float("nan"), float("inf")]
    return bad


def test_every_numeric_key_declares_its_range():
    unbounded = [f"{name}.{key}" for name, key, ftype in numeric_fields() if ftype.range is None]
    assert not unbounded, f"numeric keys without a Range: {unbounded}"


@pytest.mark.parametrize("name, key, ftype", list(numeric_fields()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_numeric_key_refuses_its_out_of_range_values_naming_the_key(name, key, ftype):
    for value in out_of_range(ftype):
        with pytest.raises(ConfigError, match=rf"{name}\.{key} = .* out of range"):
            load_config(None, [f"--{name}.{key}", str(value)])
        section = type(getattr(Config(), name))
        with pytest.raises(ConfigError, match=rf"{name}\.{key} = .* out of range"):
            section(**{key: value})  # built in Python: the same check as the command line
        if not section.__dataclass_params__.frozen:
            cfg = Config()  # a value set after building is caught by validate
            setattr(getattr(cfg, name), key, value)
            with pytest.raises(ConfigError, match=rf"{name}\.{key}"):
                validate(cfg, 1)


def test_choices_come_from_the_literal_types():
    with pytest.raises(ConfigError, match="model.norm = 'batchnorm'; choose one of rmsnorm, layernorm"):
        load_config(None, ["--model.norm", "batchnorm"])
    with pytest.raises(ConfigError, match="model.head_activation = 'silu'; choose one of gelu, gelu_tanh"):
        preset("tiny-modernbert", head_activation="silu")  # built in Python: checked as the CLI checks
    with pytest.raises(ConfigError, match="train.precision = 'fp16'; choose one of"):
        TrainConfig(precision="fp16")
    assert section_fields(ModelConfig)["activation"].choices == ("gelu", "swiglu", "geglu", "geglu_tanh")


def test_a_config_written_to_yaml_reads_back_equal(tmp_path):
    cfg = load_config(None, ["--model.preset", "tiny-modernbert", "--data.seq_length_stages", "0:64,10:128",
                             "--train.rampup_batch_size", "4 4 10", "--data.mask_prob_stages", "0:0.3,5:0.15"])
    again = config_from_dict(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg and str(again.data.seq_length_stages) == "0:64,10:128"
    assert again.train.rampup_batch_size == RampUp(4, 4, 10)


def test_a_data_blend_is_parsed_once_when_read_and_written_back_as_given():
    cfg = load_config(None, ["--data.paths", "3 data/wiki_text_document 1 data/cc_text_document"])
    assert cfg.data.paths.sources == ((0.75, "data/wiki_text_document"), (0.25, "data/cc_text_document"))
    assert cfg.to_dict()["data"]["paths"] == "3 data/wiki_text_document 1 data/cc_text_document"
    assert config_from_dict(yaml.safe_load(to_yaml(cfg))) == cfg
    for bad, why in (("0.5 a 0.5", "odd number"), ("x a 1 b", "'x' is not a weight"), ("0 a 0 b", "not all 0")):
        with pytest.raises(ConfigError, match=rf"command line: data.paths = .*{why}"):
            load_config(None, ["--data.paths", bad])
