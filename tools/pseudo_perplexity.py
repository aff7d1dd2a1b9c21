#!/usr/bin/env python
"""Pseudo-perplexity of a checkpoint or an exported Hugging Face folder on a JSONL file.

    python tools/pseudo_perplexity.py (--checkpoint CKPT | --hf HF_DIR) --input FILE.jsonl
                                      [--max-docs N] [--max-length L] [--json-key text]

The last line printed is one JSON object with `pppl`, `tokens` and `documents`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from megatron_jp.training.pseudo_perplexity import SpecialIds, encoder_scorer, hf_scorer, pseudo_perplexity


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
    return p.parse_args(argv)


def read_texts(path: str, key: str, limit: int) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if len(texts) >= limit:
                break
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)[key])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SystemExit(f"error: {path}:{number}: expected a JSON object with a {key!r} string")
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


def from_hf(folder: str, texts: list[str]):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    remote = "auto_map" in json.loads((Path(folder) / "config.json").read_text())
    model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=remote).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    docs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return hf_scorer(model), docs, SpecialIds(tok.cls_token_id, tok.sep_token_id, tok.mask_token_id)


def main(argv=None) -> int:
    args = parse_args(argv)
    texts = read_texts(args.input, args.json_key, args.max_docs)
    torch.set_grad_enabled(False)
    scorer, docs, special = from_checkpoint(args.checkpoint, texts) if args.checkpoint else from_hf(args.hf, texts)
    result = pseudo_perplexity(docs, special, scorer, args.max_length, args.batch_size)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
