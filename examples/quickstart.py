#!/usr/bin/env python
"""Quickstart: check every seed configuration, then take a model through a checkpoint to Hugging Face
and back, showing that transformers computes the same logits as our encoder.

    python examples/quickstart.py [--workdir runs/quickstart]
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM

from megatron_jp.config import Config
from megatron_jp.models.encoder import build_encoder
from megatron_jp.models.presets import preset
from megatron_jp.training.checkpoint import save_model_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{result.stderr}")
    return result.stdout


def dry_run_seed_configs():
    print("== dry run of every seed configuration")
    for path in sorted(glob.glob(str(ROOT / "examples" / "*.yaml"))):
        summary = json.loads(run("-m", "megatron_jp.train", "--config", path, "--dry-run").splitlines()[-1])
        print(f"{Path(path).stem:<26} {summary['params_total'] / 1e6:8.1f}M parameters "
              f"({summary['params_non_embedding'] / 1e6:.1f}M non-embedding)")


def export_round_trip(workdir: Path, name: str):
    cfg = Config(model=preset(name, vocab_size=512))
    model = build_encoder(cfg.model, seed=1234).eval()
    ckpt, hf_dir = workdir / name / "checkpoints", workdir / name / "hf"
    save_model_checkpoint(ckpt, 0, cfg, model.state_dict())
    print(run("tools/convert_to_hf.py", "--checkpoint", str(ckpt), "--output", str(hf_dir)).strip())
    hf = AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    ids = torch.randint(5, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    with torch.no_grad():
        diff = (model(ids, segment_ids=mask).logits - hf(input_ids=ids, attention_mask=mask).logits)[mask.bool()]
    print(f"   {type(hf).__name__}: max |logit difference| = {diff.abs().max().item():.2e}")
    print("   " + run("tools/convert_from_hf.py", "--hf", str(hf_dir), "--output", str(workdir / name / "back")).strip())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/quickstart")
    workdir = Path(parser.parse_args().workdir)
    dry_run_seed_configs()
    print("== checkpoint -> Hugging Face -> checkpoint")
    for name in ("tiny", "tiny-modernbert", "tiny-bert"):
        export_round_trip(workdir, name)


if __name__ == "__main__":
    main()
