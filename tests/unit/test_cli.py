"""The train CLI's dry run and the converters, driven through their entry points."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_jp.config import Config
from megatron_jp.models.config import preset
from megatron_jp.models.encoder import build_encoder
from megatron_jp.train import main as train_main
from megatron_jp.training.checkpoint import save_model_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_prints_the_contract_json_as_its_last_line(capsys):
    assert train_main(["--dry-run", "--model.preset", "tohoku-bert-500m", "--parallel.tensor", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["params_total"] == 581_485_568
    assert summary["params_non_embedding"] == summary["params_total"] - 99_584 * 1024
    assert summary["tensor"] == 2 and summary["world_size"] == 2


def test_dry_run_refuses_a_bad_config_naming_the_key(capsys):
    assert train_main(["--dry-run", "--model.preset", "tiny", "--model.num_heads", "3"]) == 2
    assert "model.hidden_size (64) must be divisible by model.num_heads (3)" in capsys.readouterr().err


def test_fp8_dry_run_plans_bf16_weights_and_names_the_fp8_peak(capsys):
    args = ["--dry-run", "--model.preset", "tohoku-bert-500m", "--data.seq_length", "4096"]
    assert train_main(args + ["--train.precision", "bf16"]) == 0
    bf16 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert train_main(args + ["--train.precision", "fp8", "--train.fp8_recipe", "rowwise"]) == 0
    fp8 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fp8["precision"] == "fp8" and fp8["mfu_peak_tflops"] == 1978.9 and bf16["mfu_peak_tflops"] == 989.4
    # FP8 runs keep bf16 weights, fp32 masters and bf16 saved activations: the same plan as bf16
    assert fp8["memory_per_rank_bytes"] == bf16["memory_per_rank_bytes"]


def test_fp8_dry_run_refuses_shapes_fp8_gemms_cannot_take_naming_the_key(capsys):
    assert train_main(["--dry-run", "--model.preset", "tiny", "--train.precision", "fp8",
                       "--model.ffn_hidden_size", "120"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.precision fp8") and "model.ffn_hidden_size" in err


def test_dry_run_runs_as_a_module_from_a_yaml_file():
    out = subprocess.run([sys.executable, "-m", "megatron_jp.train", "--config",
                          str(ROOT / "examples" / "retrieva-bert-1.3b.yaml"), "--dry-run"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out.splitlines()[-1])["params_total"] == 1_301_388_032


@pytest.mark.parametrize("name", ["tiny", "tiny-modernbert", "tiny-bert"])
def test_checkpoint_to_hf_to_checkpoint_round_trip_is_exact(tmp_path, name, tool):
    cfg = Config(model=preset(name, vocab_size=128))
    model = build_encoder(cfg.model, seed=5)
    save_model_checkpoint(tmp_path / "ckpt", 0, cfg, model.state_dict())
    assert tool("convert_to_hf")(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]) == 0
    assert tool("convert_from_hf")(["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "back")]) == 0
    assert tool("convert_to_hf")(["--checkpoint", str(tmp_path / "back" / "iter_0000000"),
                                  "--output", str(tmp_path / "hf2")]) == 0
    first, second = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_converter_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, capsys, tool):
    (tmp_path / "empty").mkdir()
    assert tool("convert_to_hf")(["--checkpoint", str(tmp_path / "empty"), "--output", str(tmp_path / "hf")]) == 2
    assert "neither a checkpoint iteration folder" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_converter_refuses_a_truncated_checkpoint_naming_it(tmp_path, capsys, tool):
    cfg = Config(model=preset("tiny", vocab_size=128))
    folder = save_model_checkpoint(tmp_path / "ckpt", 3, cfg, build_encoder(cfg.model).state_dict())
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    assert tool("convert_to_hf")(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]) == 2
    assert "iter_0000003" in capsys.readouterr().err
