#!/usr/bin/env python
"""Import a Hugging Face EuroBERT, ModernBERT or BERT masked-LM folder as a megatron_jp checkpoint,
e.g. to continue pretraining ModernBERT-Ja or BERT-base-japanese.

    python tools/convert_from_hf.py --hf HF_DIR --output CKPT_DIR [--iteration N]

The checkpoint is step 0 of a new run: start from it with `checkpoint.load: CKPT_DIR`. CKPT_DIR must
not hold checkpoints yet (a run's directory is refused: its `latest` would be repointed) unless
--iteration N adds iter_N beside them. Bad input (weights that disagree with config.json, layers beyond
it, non-finite values) exits with status 2 and one line, before anything is written. The written
config's data.seq_length is 512, or the model's max_position_embeddings where that is smaller.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_jp.config import Config, validate
from megatron_jp.files import overlaps
from megatron_jp.models.hf import import_hf
from megatron_jp.training.checkpoint import CheckpointError, save_model_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + model.safetensors)")
    p.add_argument("--output", required=True, help="checkpoint directory to write (iter_0000000 + latest)")
    p.add_argument("--iteration", type=int, default=None,
                   help="write iter_N (a new folder) into an --output that already holds checkpoints")
    args = p.parse_args(argv)
    if args.iteration is not None and args.iteration < 0:
        p.error(f"--iteration must be >= 0, got {args.iteration}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if overlaps(args.output, args.hf):
            raise ValueError(f"--output {args.output} is, holds or lies inside the Hugging Face folder it reads "
                             f"({args.hf}); choose another folder")
        model_cfg, state = import_hf(args.hf)
        cfg = Config(model=model_cfg)
        # the default data.seq_length (512) is no property of the model: the written config takes what it can
        cfg.data.seq_length = min(cfg.data.seq_length, model_cfg.max_position_embeddings)
        validate(cfg, world_size=1)
    except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (Path(args.hf) / "tokenizer.json").exists():
        cfg.data.tokenizer_type, cfg.data.tokenizer_model = "HuggingFaceTokenizer", str(Path(args.hf).resolve())
    try:
        folder = save_model_checkpoint(args.output, args.iteration or 0, cfg, state, {"imported_from": str(args.hf)},
                                       into_existing=args.iteration is not None)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {folder} ({sum(v.numel() for v in state.values()):,} values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
