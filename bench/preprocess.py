"""Benchmark: throughput of tools/preprocess_data.py (docs/s, MB/s, tokens/s), against MeCab alone.

    python bench/preprocess.py [--mb 50] [--workers 1 2] [--repeat 3] [--tokenizer-type SentencePieceTokenizer]

Generates a Japanese JSONL corpus of --mb megabytes in a temp dir (sentences of
tests/data/ja_sample.txt shuffled into documents, with random numbers mixed in) and trains a small
SentencePiece model on the fixture. Then, --repeat times in turn (best of each kept, since the
machine may be shared):
- in one process, blocks of 200 documents in turn (so a change of load hits all alike; CPU time,
  after a warm-up): MeCab alone, `fugashi.Tagger()` with unidic-lite (the usual fugashi call, a
  node per word) and `GenericTagger -Owakati` line by line (the cheapest way to get word
  boundaries from MeCab, and what preprocess_data calls), and a worker's whole word-boundary path
  on the same lines (JSON, tokenizer with offsets, MeCab, alignment);
- preprocess_data with each worker count, without and with --word-boundaries unidic-lite (its own
  timers: reading, JSON, tokenizing, MeCab, alignment, writing, the pool's start-up).
Speed per core is MB per CPU-second (wall-clock speeds on a loaded machine measure the load);
scaling with workers is wall-clock, and the main process's own CPU time (it reads, hands out and
writes for every worker) bounds how many workers it can keep busy. Prints one line per configuration, the ratios of
word-boundary preprocessing to MeCab alone and the scaling; not a test.
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


MECAB_ALONE = r"""
import json, sys, time
import fugashi, unidic_lite
sys.path.insert(0, {root!r})
from megatron_jp.data import preprocess
from megatron_jp.data.segment import text_chunks
lines = open({corpus!r}, "rb").read().splitlines(keepends=True)
texts = [json.loads(line)["text"] for line in lines]
wakati = fugashi.GenericTagger(f'-d "{{unidic_lite.DICDIR}}" -r /dev/null -Owakati')
nodes = fugashi.Tagger()
preprocess.init_worker({{"keys": ["text"], "tokenizer_type": {tokenizer_type!r}, "tokenizer_model": {model!r},
                         "word_boundaries": "unidic-lite", "append_eod": False, "dtype": "<u2"}})
runs = {{
    "wakati": lambda lo, hi: [wakati.parse(c) for t in texts[lo:hi] for _, c in text_chunks(t)],
    "tagger": lambda lo, hi: [w.surface for t in texts[lo:hi] for w in nodes(t)],
    "pipeline": lambda lo, hi: preprocess.process_chunk(preprocess.Chunk("x", list(enumerate(lines[lo:hi])))),
}}
for run in runs.values():  # warm up: the first pass pages the dictionary in
    run(0, 300)
cpu = dict.fromkeys(runs, 0.0)
for lo in range(0, len(texts), 200):  # blocks in turn: a change of load hits all three alike
    for name, run in runs.items():
        c0 = time.process_time()
        run(lo, lo + 200)
        cpu[name] += time.process_time() - c0
mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
print(json.dumps({{name: mb / seconds for name, seconds in cpu.items()}}))
"""


def mecab_alone(args, corpus: str) -> dict:
    """MB per CPU-second of MeCab alone ("wakati", "tagger") and of the word-boundary pipeline of one
    worker ("pipeline": JSON, tokenizer, MeCab, alignment), measured in turn on the same documents."""
    code = MECAB_ALONE.format(root=ROOT, corpus=corpus, tokenizer_type=args.tokenizer_type, model=args.model)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


def best(a: dict | None, b: dict) -> dict:
    return b if a is None else {k: max(a[k], b[k]) for k in a}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=50)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
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
        print(f"corpus: {n_docs:,} documents, {mb:.1f} MB; tokenizer {args.tokenizer_type}; {os.cpu_count()} cores; "
              f"load average {os.getloadavg()[0]:.1f}; best of {args.repeat}")
        alone, speed, ratios = None, {}, []
        for _ in range(args.repeat):
            paired = mecab_alone(args, corpus)
            ratios.append((paired["pipeline"] / paired["wakati"], paired["pipeline"] / paired["tagger"]))
            alone = best(alone, paired)
            for words in ("none", "unidic-lite"):
                for workers in args.workers:
                    s = run(args, corpus, os.path.join(tmp, f"out{workers}{words}"), workers, words)
                    figures = {"wall": mb / s["seconds"], "cpu": mb / s["cpu_seconds"],
                               "tokens": s["tokens"] / s["seconds"], "main": mb / max(s["main_cpu_seconds"], 1e-9)}
                    speed[words, workers] = best(speed.get((words, workers)), figures)
        print(f"per core, in turn on the same documents (best): MeCab alone {alone['tagger']:.2f} (fugashi.Tagger()) "
              f"and {alone['wakati']:.2f} (GenericTagger -Owakati) MB per CPU-second, the word-boundary pipeline of "
              f"a worker {alone['pipeline']:.2f}")
        wakati, tagger = (sorted(r[i] for r in ratios) for i in (0, 1))
        print(f"the pipeline per core, median (min-max) of {len(ratios)} runs: {100 * wakati[len(wakati) // 2]:.0f}% "
              f"({100 * wakati[0]:.0f}-{100 * wakati[-1]:.0f}%) of MeCab -Owakati alone, "
              f"{100 * tagger[len(tagger) // 2]:.0f}% ({100 * tagger[0]:.0f}-{100 * tagger[-1]:.0f}%) of fugashi.Tagger()")
        for (words, workers), f in speed.items():
            print(f"preprocess_data --workers {workers} --word-boundaries {words:11s}: {f['cpu']:6.2f} MB per "
                  f"CPU-second, {f['wall']:6.2f} MB/s, {f['tokens'] / 1e6:5.2f} M tokens/s")
        one = speed["unidic-lite", args.workers[0]]
        print(f"preprocess_data --word-boundaries unidic-lite per core: {100 * one['cpu'] / alone['wakati']:.0f}% of "
              f"MeCab -Owakati alone, {100 * one['cpu'] / alone['tagger']:.0f}% of fugashi.Tagger() alone")
        for workers in args.workers[1:]:
            gain = speed["unidic-lite", workers]["wall"] / one["wall"]
            print(f"word boundaries, {workers} workers: {gain:.2f}x the wall-clock speed of {args.workers[0]} "
                  f"({100 * gain * args.workers[0] / workers:.0f}% of linear; wall-clock on a loaded machine "
                  f"measures the load too)")
        for words in ("none", "unidic-lite"):  # Amdahl: the main process reads and writes for all workers
            many = max(w for (k, w) in speed if k == words)
            feeds = speed[words, many]["main"] / speed[words, args.workers[0]]["cpu"]
            print(f"--word-boundaries {words}: the main process handles {speed[words, many]['main']:.0f} MB per "
                  f"CPU-second (with --workers {many}, start-up included), enough to keep ~{feeds:.0f} workers busy")

if __name__ == "__main__":
    main()
