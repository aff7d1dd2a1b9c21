"""Benchmark: throughput of tools/preprocess_data.py (docs/s, MB/s, tokens/s).

    python bench/preprocess.py [--mb 50] [--workers 1 2] [--tokenizer-type SentencePieceTokenizer]

Generates a Japanese JSONL corpus of --mb megabytes in a temp dir (sentences of
tests/data/ja_sample.txt shuffled into documents, with random numbers mixed in), trains a small
SentencePiece model on the fixture, then runs preprocess_data with each worker count, without and
with --word-boundaries unidic-lite. Prints one line per run; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "data", "ja_sample.txt")


def generate_corpus(path: str, megabytes: float, seed: int = 0) -> int:
    """Write documents of 5-40 sentences until the file reaches `megabytes`; return documents."""
    rng = random.Random(seed)
    sentences = [s for s in open(FIXTURE, encoding="utf-8").read().splitlines() if s.strip()]
    target, n_docs, size = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            parts = []
            for _ in range(rng.randint(5, 40)):
                s = rng.choice(sentences)
                parts.append(s.replace("2024", str(rng.randint(1900, 2100))))
            line = json.dumps({"text": "".join(parts) + "\n" + rng.choice(sentences), "id": n_docs},
                              ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            n_docs += 1
    return n_docs


def run(args, corpus: str, out: str, workers: int, word_boundaries: str) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus,
           "--output-prefix", out, "--tokenizer-type", args.tokenizer_type, "--tokenizer-model", args.model,
           "--workers", str(workers), "--word-boundaries", word_boundaries, "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary["wall"] = wall
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=50)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                   choices=["SentencePieceTokenizer", "ByteTokenizer"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        n_docs = generate_corpus(corpus, args.mb)
        mb = os.path.getsize(corpus) / 1e6
        args.model = ""
        if args.tokenizer_type == "SentencePieceTokenizer":
            subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", FIXTURE,
                            "--model-prefix", os.path.join(tmp, "spm"), "--vocab-size", "1000"],
                           check=True, capture_output=True)
            args.model = os.path.join(tmp, "spm.model")
        print(f"corpus: {n_docs:,} documents, {mb:.1f} MB; tokenizer {args.tokenizer_type}; {os.cpu_count()} cores")
        for words in ("none", "unidic-lite"):
            for workers in args.workers:
                s = run(args, corpus, os.path.join(tmp, f"out{workers}{words}"), workers, words)
                print(f"workers {workers} word-boundaries {words:11s}: {s['documents'] / s['wall']:8,.0f} docs/s "
                      f"{mb / s['wall']:6.2f} MB/s {s['tokens'] / s['wall'] / 1e6:6.2f} M tokens/s "
                      f"({s['wall']:.1f} s wall, {s['tokens']:,} tokens)")


if __name__ == "__main__":
    main()
