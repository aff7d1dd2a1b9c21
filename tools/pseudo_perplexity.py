#!/usr/bin/env python
"""Pseudo-perplexity of a checkpoint or an exported Hugging Face folder on a JSONL file.

    python tools/pseudo_perplexity.py (--checkpoint CKPT | --hf HF_DIR) --input FILE.jsonl
                                      [--max-docs N] [--max-length L] [--json-key text] [--trust-remote-code]

The last line printed is one JSON object with `pppl`, `tokens` and `documents`. Bad input exits with
status 2 and one line naming it; a non-finite result is printed and exits with status 1. A folder
whose config.json asks for its own code (`auto_map`) is refused unless --trust-remote-code is given:
that code runs with your permissions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from megatron_jp.data.tokenizers import TokenizerError
from megatron_jp.training.checkpoint import CheckpointError
from megatron_jp.eval.pseudo_perplexity import SpecialIds, encoder_scorer, hf_scorer, pseudo_perplexity


class InputError(ValueError):
    """Bad input; the message names it."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint directory (uses `latest`) or iter_* folder")
    source.add_argument("--hf", help="Hugging Face folder with model and tokenizer")
    p.add_argument("--input", required=True, help="JSONL file, one document per line")
    p.add_argument("--json-key", default="text")
    p.add_argument("--max-docs", type=int, default=100)
    p.add_argument("--max-length", type=int, default=512, help="tokens per document, CLS and SEP included")
    p.add_argument("--batch-size", type=int, default=32, help="masked copies per forward pass")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let an --hf folder with auto_map run its own Python code (only for folders you trust)")
    args = p.parse_args(argv)
    for name, low in (("max_docs", 1), ("max_length", 3), ("batch_size", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    return args


def read_texts(path: str, key: str, limit: int) -> list[str]:
    texts = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if len(texts) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[key]
                except (json.JSONDecodeError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise InputError(f"{path}:{number}: expected a JSON object with a {key!r} string")
                texts.append(text)
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it as UTF-8 JSONL ({e})") from None
    if not texts:
        raise InputError(f"{path}: no document to score")
    return texts


def from_checkpoint(path: str, texts: list[str]):
    from megatron_jp.data.tokenizers import build_tokenizer
    from megatron_jp.models.encoder import Encoder
    from megatron_jp.training.checkpoint import load_model_state

    cfg, state = load_model_state(path)
    model = Encoder(cfg.model)
    model.load_state_dict(state)
    tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    docs = [tok.encode(t).tolist() for t in texts]
    return encoder_scorer(model.eval()), docs, SpecialIds(tok.cls_id, tok.sep_id, tok.mask_id)


def from_hf(folder: str, texts: list[str], trust_remote_code: bool = False):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    config = Path(folder) / "config.json"
    try:
        remote = "auto_map" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{config}: not a Hugging Face model folder ({e})") from None
    if remote and not trust_remote_code:
        raise InputError(f"{config} names its own modeling code (auto_map), which would run as Python with "
                         f"your permissions: pass --trust-remote-code if you trust {folder}")
    try:
        model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=trust_remote_code).eval()
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{folder}: transformers cannot load it ({str(e).splitlines()[0][:300]})") from None
    docs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return hf_scorer(model), docs, SpecialIds(tok.cls_token_id, tok.sep_token_id, tok.mask_token_id)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with torch.no_grad():
            return report(args)
    except (InputError, CheckpointError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def report(args) -> int:
    """Score and print the JSON line; 1 when the result is not finite."""
    texts = read_texts(args.input, args.json_key, args.max_docs)
    if args.checkpoint:
        scorer, docs, special = from_checkpoint(args.checkpoint, texts)
    else:
        scorer, docs, special = from_hf(args.hf, texts, args.trust_remote_code)
    result = pseudo_perplexity(docs, special, scorer, args.max_length, args.batch_size)
    print(json.dumps(result))
    if not math.isfinite(result["pppl"]):
        print(f"error: the pseudo-perplexity is not finite ({result['pppl']}): the model's weights or logits "
              f"overflow", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
