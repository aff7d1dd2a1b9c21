#!/usr/bin/env python
"""Export a megatron_jp checkpoint to a Hugging Face folder.

    python tools/convert_to_hf.py --checkpoint CKPT_DIR_OR_ITER_DIR --output HF_DIR [--tokenizer PATH] [--overwrite]

Llama-style encoders become EuroBertForMaskedLM, ModernBERT shapes ModernBertForMaskedLM, classic BERT
BertForMaskedLM (all load with plain AutoModelForMaskedLM); anything else is written with our own
modeling code through auto_map (load with trust_remote_code=True).

HF_DIR must be new or empty; --overwrite replaces an existing one whole (the new folder is written
beside it, then swapped in: no stale weights of the old export stay beside the new ones). An output
that is, holds or lies inside a checkpoint or the tokenizer it reads is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from megatron_jp.files import describe_os_error, holds_files, overlaps
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder whole")
    return p.parse_args(argv)


def check_output(args) -> None:
    """Raise ValueError for an output this tool must not write: one that touches what it reads, a
    checkpoint directory, or (without --overwrite) a folder that already holds files."""
    out = Path(args.output)
    for given, what in ((args.checkpoint, "the checkpoint"), (args.tokenizer, "the tokenizer")):
        if given and overlaps(out, given):
            raise ValueError(f"--output {out} is, holds or lies inside {what} it reads ({given}); choose another "
                             "folder")
    if out.is_dir() and ((out / "latest").exists() or any(out.glob("iter_*")) or (out / "meta.json").exists()):
        raise ValueError(f"--output {out} holds a megatron_jp checkpoint; a Hugging Face export never goes there")
    if holds_files(out) and not args.overwrite:
        raise ValueError(f"--output {out} exists and is not empty: pass --overwrite to replace it whole, or choose "
                         "another folder")


def main(argv=None) -> int:
    from megatron_jp.data.tokenizers import TokenizerError, build_tokenizer, save_hf_tokenizer

    args = parse_args(argv)
    try:
        check_output(args)
        cfg, state = load_model_state(args.checkpoint)
        tokenizer_type = args.tokenizer_type or cfg.data.tokenizer_type
        tokenizer_model = args.tokenizer or cfg.data.tokenizer_model
        tokenizer, special = None, {}
        if tokenizer_model or tokenizer_type == "ByteTokenizer":  # loaded first: its ids go into config.json
            tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
            special = {"pad": tokenizer.pad_id, "cls": tokenizer.cls_id, "sep": tokenizer.sep_id,
                       "mask": tokenizer.mask_id}
        # model and tokenizer files are written into one temporary folder, then moved in
        module = export_hf(state, cfg.model, args.output, special, args.target, DTYPES[args.dtype], replace=True,
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
