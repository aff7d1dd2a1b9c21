"""Shared helpers of the data tests (no tests here): fixture corpus, a trained SentencePiece model,
JSONL writers and shard builders. Everything is generated under pytest's temporary folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(ROOT, "tests", "data", "ja_sample.txt")
TOOLS = os.path.join(ROOT, "tools")


def sample_lines() -> list[str]:
    with open(SAMPLE, encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip()]


def run_tool(name: str, *args, check: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, name), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    if check and proc.returncode:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def train_spm(folder) -> str:
    """Train the fixture tokenizer with tools/train_tokenizer.py; return the .model path."""
    prefix = os.path.join(str(folder), "spm")
    run_tool("train_tokenizer.py", "--input", SAMPLE, "--model-prefix", prefix, "--vocab-size", "800", check=True)
    return prefix + ".model"


def write_jsonl(path, records, raw_lines=()) -> str:
    """JSONL with one record per line (dicts are dumped), then raw byte lines appended."""
    with open(path, "wb") as f:
        for rec in records:
            f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        for raw in raw_lines:
            f.write(raw)
    return str(path)


def documents(n: int = 30) -> list[dict]:
    lines = sample_lines()
    return [{"text": "".join(lines[(i * 3 + j) % len(lines)] for j in range(1 + i % 4)), "id": i} for i in range(n)]


def write_shard(prefix: str, docs: list, dtype=np.uint16, words: list | None = None) -> str:
    from megatron_jp.data import indexed

    w = indexed.IndexedDatasetWriter(prefix, dtype)
    for d in docs:
        w.add_document(np.asarray(d))
    w.commit()
    if words is not None:
        ww = indexed.IndexedDatasetWriter(indexed.words_prefix(prefix), np.uint8)
        for f in words:
            ww.add_document(np.asarray(f, dtype=np.uint8))
        ww.commit()
    return prefix


def loader_config(paths, cache_dir, **kw):
    """The data section the loader reads, as a plain namespace: byte tokens, 64-token rows packed
    best-fit, no whole word masking, in-process loading, index cache in `cache_dir`."""
    base = dict(paths=paths, valid_paths="", split="90,10", tokenizer_type="ByteTokenizer", tokenizer_model="",
                seq_length=64, packing="best_fit", mask_prob=0.15, mask_token_prob=0.8, random_token_prob=0.1,
                whole_word_masking=False, num_workers=0, cache_dir=str(cache_dir))
    base.update(kw)
    return types.SimpleNamespace(**base)
