#!/usr/bin/env python
"""Import a Hugging Face EuroBERT, ModernBERT or BERT masked-LM folder as a megatron_jp checkpoint,
e.g. to continue pretraining ModernBERT-Ja or BERT-base-japanese.

    python tools/convert_from_hf.py --hf HF_DIR --output CKPT_DIR

The checkpoint is step 0 of a new run: start from it with `checkpoint.load: CKPT_DIR`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_jp.config import Config, validate
from megatron_jp.models.hf import import_hf
from megatron_jp.training.checkpoint import save_model_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + model.safetensors)")
    p.add_argument("--output", required=True, help="checkpoint directory to write (iter_0000000 + latest)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model_cfg, state = import_hf(args.hf)
        cfg = Config(model=model_cfg)
        validate(cfg, world_size=1)
    except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (Path(args.hf) / "tokenizer.json").exists():
        cfg.data.tokenizer_type, cfg.data.tokenizer_model = "HuggingFaceTokenizer", str(Path(args.hf).resolve())
    folder = save_model_checkpoint(args.output, 0, cfg, state, {"imported_from": str(args.hf)})
    print(f"wrote {folder} ({sum(v.numel() for v in state.values()):,} values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
