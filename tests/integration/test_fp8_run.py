"""`python -m megatron_jp.train --train.precision fp8` end to end on CPU (torchao emulates the FP8
GEMMs): the run trains and logs MFU against the FP8 peak, and its checkpoint exports to a Hugging Face
model whose logits are the trained model's. Bitwise resume of FP8 runs is proven at the checkpointer
(tests/unit/test_checkpoint.py, fp8 case); FP8 numerics against bf16 in tests/unit/test_fp8.py."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForMaskedLM

from megatron_jp.models.encoder import build_encoder
from megatron_jp.precision import H100_FP8_PEAK_FLOPS
from megatron_jp.training.checkpoint import load_model_state
from train_runs import ROOT, base_args, make_shards, records, train_ok

pytest.importorskip("torchao.float8")


def test_an_fp8_run_trains_reports_mfu_against_the_fp8_peak_and_exports_a_matching_hf_model(tmp_path):
    data = make_shards(tmp_path / "shards")
    run_dir = tmp_path / "run"
    train_ok(base_args(data, run_dir, **{"train.precision": "fp8", "train.steps": 8, "checkpoint.interval": 0}))
    lines = [r for r in records(run_dir) if "loss" in r]
    assert [r["step"] for r in lines] == list(range(1, 9)) and lines[-1]["loss"] < lines[0]["loss"]
    assert lines[-1]["mfu"] == pytest.approx(lines[-1]["tflops_per_gpu"] * 1e12 / H100_FP8_PEAK_FLOPS)

    hf = tmp_path / "hf"
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), "--checkpoint",
                    str(run_dir / "checkpoints"), "--output", str(hf)], check=True, capture_output=True, timeout=120)
    cfg, state = load_model_state(run_dir / "checkpoints")
    ours = build_encoder(cfg.model)
    ours.load_state_dict(state)
    exported = AutoModelForMaskedLM.from_pretrained(hf).eval()
    ids = torch.randint(4, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = ours.eval()(ids).logits, exported(input_ids=ids).logits
    # the trained bf16 weights, read as fp32 on both sides: they differ only in kernel order
    assert (got - expected).abs().max().item() <= 1e-4
