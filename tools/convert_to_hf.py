#!/usr/bin/env python
"""Export a megatron_jp checkpoint to a Hugging Face folder.

    python tools/convert_to_hf.py --checkpoint CKPT_DIR_OR_ITER_DIR --output HF_DIR [--tokenizer PATH]

Llama-style encoders become EuroBertForMaskedLM, ModernBERT shapes ModernBertForMaskedLM, classic BERT
BertForMaskedLM (all load with plain AutoModelForMaskedLM); anything else is written with our own
modeling code through auto_map (load with trust_remote_code=True).
"""

from __future__ import annotations

import argparse
import sys

import torch

from megatron_jp.files import describe_os_error
from megatron_jp.models.hf import TARGETS, export_hf
from megatron_jp.training.checkpoint import CheckpointError, load_model_state

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (uses `latest`) or iter_* folder")
    p.add_argument("--output", required=True, help="Hugging Face folder to write")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer model or folder to bundle (default: the checkpoint's data.tokenizer_model)")
    p.add_argument("--tokenizer-type", default=None, help="default: the checkpoint's data.tokenizer_type")
    p.add_argument("--target", default="auto", choices=["auto", *TARGETS], help="transformers class to write")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of the written weights")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megatron_jp.data.tokenizers import TokenizerError, build_tokenizer, save_hf_tokenizer

    args = parse_args(argv)
    try:
        cfg, state = load_model_state(args.checkpoint)
        tokenizer_type = args.tokenizer_type or cfg.data.tokenizer_type
        tokenizer_model = args.tokenizer or cfg.data.tokenizer_model
        tokenizer, special = None, {}
        if tokenizer_model or tokenizer_type == "ByteTokenizer":  # loaded first: its ids go into config.json
            tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
            special = {"pad": tokenizer.pad_id, "cls": tokenizer.cls_id, "sep": tokenizer.sep_id,
                       "mask": tokenizer.mask_id}
        # model and tokenizer files are written into one temporary folder, then moved in
        module = export_hf(state, cfg.model, args.output, special, args.target, DTYPES[args.dtype],
                           extra=None if tokenizer is None else lambda folder: save_hf_tokenizer(tokenizer, folder))
    except (CheckpointError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: writing {args.output} failed: {describe_os_error(e) or e}", file=sys.stderr)
        return 2
    remote = " (load with trust_remote_code=True)" if module.__name__.endswith("custom") else ""
    print(f"wrote {args.output} as {module.ARCHITECTURE}{remote}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
