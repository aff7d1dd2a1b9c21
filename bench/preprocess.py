"""Benchmark: throughput of tools/preprocess_data.py, its main process's share, input formats, Megatron-LM.

    python bench/preprocess.py [--mb 50] [--workers 1 2] [--repeat 3] [--part-mb 4] [--files 8]
        [--sections workers formats megatron] [--megatron-lm CHECKOUT --megatron-python PYTHON]

Generates a Japanese JSONL corpus of --mb megabytes in a temp dir (sentences of
tests/data/ja_sample.txt shuffled into documents, with random numbers mixed in) and trains a small
SentencePiece model on the fixture. Then, --repeat times in turn (best of each kept, since the
machine may be shared):
- workers: in one process, blocks of 200 documents in turn (so a change of load hits all alike; CPU
  time, after a warm-up): MeCab alone, `fugashi.Tagger()` with unidic-lite (a node per word) and
  `GenericTagger -Owakati` (what preprocess_data calls), and a worker's whole word-boundary path on
  the same lines (JSON, tokenizer with offsets, MeCab, alignment); then preprocess_data with each
  worker count, without and with --word-boundaries unidic-lite. The main process only plans,
  watches and appends finished parts: its CPU after start-up per MB, and as a share of the workers'
  CPU, says how many workers one main process can feed.
- formats: the same documents as --files files of JSONL, .jsonl.zst, .jsonl.gz and parquet, with the
  most workers: MB (of JSONL) per second and per CPU-second, and whether the shards are identical.
- megatron: Megatron-LM's tools/preprocess_data.py (a checkout given by --megatron-lm, run by
  --megatron-python) on the same JSONL with the same workers, side by side; shards compared.
Speed per core is MB per CPU-second (wall-clock speeds on a loaded machine measure the load). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
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
from megatron_jp.data import inputs, tokenize_worker
from megatron_jp.data.segment import text_chunks
lines = open({corpus!r}, "rb").read().splitlines(keepends=True)
texts = [json.loads(line)["text"] for line in lines]
wakati = fugashi.GenericTagger(f'-d "{{unidic_lite.DICDIR}}" -r /dev/null -Owakati')
nodes = fugashi.Tagger()
tokenize_worker.init_worker({{"keys": ["text"], "tokenizer_type": {tokenizer_type!r}, "tokenizer_model": {model!r},
                         "word_boundaries": "unidic-lite", "append_eod": False, "dtype": "<u2"}})
runs = {{
    "wakati": lambda lo, hi: [wakati.parse(c) for t in texts[lo:hi] for _, c in text_chunks(t)],
    "tagger": lambda lo, hi: [w.surface for t in texts[lo:hi] for w in nodes(t)],
    "pipeline": lambda lo, hi: tokenize_worker.process_chunk(inputs.Chunk("x", list(enumerate(lines[lo:hi])))),
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


def _timed(cmd: list[str], **kw) -> tuple[subprocess.CompletedProcess, float, float]:
    """(finished process, wall seconds from its start, CPU seconds of it and its children)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return proc, wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def run(args, corpus, out: str, workers: int, word_boundaries: str) -> dict:
    corpus = corpus if isinstance(corpus, list) else [corpus]
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", *corpus,
           "--output-prefix", out, "--tokenizer-type", args.tokenizer_type, "--tokenizer-model", args.model,
           "--workers", str(workers), "--word-boundaries", word_boundaries, "--quiet",
           "--part-size-mb", str(args.part_mb)]
    proc, wall, _ = _timed(cmd)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary["wall"] = wall
    return summary


def best(a: dict | None, b: dict) -> dict:
    return b if a is None else {k: max(a[k], b[k]) for k in a}


def split_formats(corpus: str, folder: str, n_files: int) -> dict:
    """The corpus as n_files files in each format (same documents, same order): JSONL, .jsonl.zst
    (level 3, checksummed as the zstd command writes), .jsonl.gz and parquet (zstd, ~5 MB row groups)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = open(corpus, "rb").read().splitlines(keepends=True)
    per = -(-len(lines) // n_files)
    out = {k: [] for k in ("jsonl", "zst", "gz", "parquet")}
    for i in range(n_files):
        part = lines[i * per:(i + 1) * per]
        base = os.path.join(folder, f"f{i:03d}")
        data = b"".join(part)
        open(base + ".jsonl", "wb").write(data)
        open(base + ".jsonl.zst", "wb").write(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data))
        open(base + ".jsonl.gz", "wb").write(gzip.compress(data, 6))
        table = pa.Table.from_pylist([json.loads(line) for line in part])
        pq.write_table(table, base + ".parquet", compression="zstd", row_group_size=max(1, len(part) * 5_000_000
                                                                                          // max(len(data), 1)))
        for k, ext in (("jsonl", ".jsonl"), ("zst", ".jsonl.zst"), ("gz", ".jsonl.gz"), ("parquet", ".parquet")):
            out[k].append(base + ext)
    return out


def megatron_lm(args, corpus: str, out: str, workers: int) -> dict:
    """Megatron-LM's tools/preprocess_data.py on the same JSONL (SentencePiece, no word boundaries):
    wall and CPU seconds from its process start, and the start-up it reports (its imports excluded)."""
    cmd = [args.megatron_python, os.path.join(args.megatron_lm, "tools", "preprocess_data.py"), "--input", corpus,
           "--output-prefix", out, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", args.model,
           "--workers", str(workers), "--log-interval", "500"]
    proc, wall, cpu = _timed(cmd, env=dict(os.environ, PYTHONPATH=args.megatron_lm), cwd=args.megatron_lm)
    # its own rate: from after its imports and pool start-up to its last progress line
    rates = re.findall(r"docs/s, ([0-9.]+) MB/s", proc.stdout + proc.stderr)
    return {"wall": wall, "cpu": cpu, "own": float(rates[-1]) if rates else 0.0}


def same_bytes(a: str, b: str) -> bool:
    return all(open(a + ext, "rb").read() == open(b + ext, "rb").read() for ext in (".bin", ".idx"))


def report_workers(args, speed: dict, alone: dict, ratios: list) -> None:
    print(f"per core, in turn on the same documents (best): MeCab alone {alone['tagger']:.2f} (fugashi.Tagger()) "
          f"and {alone['wakati']:.2f} (GenericTagger -Owakati) MB per CPU-second, the word-boundary pipeline of "
          f"a worker {alone['pipeline']:.2f}")
    wakati, tagger = (sorted(r[i] for r in ratios) for i in (0, 1))
    print(f"the pipeline per core, median (min-max) of {len(ratios)} runs: {100 * wakati[len(wakati) // 2]:.0f}% "
          f"({100 * wakati[0]:.0f}-{100 * wakati[-1]:.0f}%) of MeCab -Owakati alone, "
          f"{100 * tagger[len(tagger) // 2]:.0f}% ({100 * tagger[0]:.0f}-{100 * tagger[-1]:.0f}%) of fugashi.Tagger()")
    for (words, workers), f in speed.items():
        print(f"preprocess_data --workers {workers} --word-boundaries {words:11s}: {f['cpu']:6.2f} MB per "
              f"CPU-second, {f['wall']:6.2f} MB/s, {f['tokens'] / 1e6:5.2f} M tokens/s, a worker's peak RSS "
              f"{f['rss']:.0f} MB")
    one = speed["unidic-lite", args.workers[0]]
    print(f"preprocess_data --word-boundaries unidic-lite per core: {100 * one['cpu'] / alone['wakati']:.0f}% of "
          f"MeCab -Owakati alone, {100 * one['cpu'] / alone['tagger']:.0f}% of fugashi.Tagger() alone")
    for workers in args.workers[1:]:
        gain = speed["unidic-lite", workers]["wall"] / one["wall"]
        print(f"word boundaries, {workers} workers: {gain:.2f}x the wall-clock speed of {args.workers[0]} "
              f"({100 * gain * args.workers[0] / workers:.0f}% of linear; wall-clock on a loaded machine "
              f"measures the load too)")


def report_main(args, speed: dict) -> None:
    """The main process's CPU against its workers': how many workers one main process can feed."""
    many = max(args.workers)
    if many < 2:
        return
    for words in ("none", "unidic-lite"):
        f = speed[words, many]
        print(f"--word-boundaries {words}, --workers {many}: the main process spends {1000 * f['main_per_mb']:.2f} ms "
              f"of CPU per MB after start-up ({f['main_startup']:.2f} s start-up: tokenizer hash, plan, spawning), "
              f"{100 * f['main_share']:.2f}% of the workers' CPU ({100 * f['main_share_all']:.1f}% with start-up "
              f"on this {args.mb:.0f} MB corpus): one main process feeds ~{1 / max(f['main_share'], 1e-9):,.0f} "
              "workers")


def bench_workers(args, corpus: str, tmp: str, mb: float):
    alone, speed, ratios = None, {}, []
    for _ in range(args.repeat):
        paired = mecab_alone(args, corpus)
        ratios.append((paired["pipeline"] / paired["wakati"], paired["pipeline"] / paired["tagger"]))
        alone = best(alone, paired)
        for words in ("none", "unidic-lite"):
            for workers in args.workers:
                s = run(args, corpus, os.path.join(tmp, f"out{workers}{words}"), workers, words)
                worker_cpu = max(s["cpu_seconds"] - s["main_cpu_seconds"], 1e-9) if workers > 1 else s["cpu_seconds"]
                main_run = s["main_cpu_seconds"] - s["main_cpu_startup_seconds"]
                figures = {"wall": mb / s["seconds"], "cpu": mb / s["cpu_seconds"],
                           "tokens": s["tokens"] / s["seconds"], "main_per_mb": -main_run / mb, "rss": s["peak_rss_mb"],
                           "main_share": -main_run / worker_cpu, "main_share_all": -s["main_cpu_seconds"] / worker_cpu,
                           "main_startup": -s["main_cpu_startup_seconds"]}  # negated: best() keeps the max
                speed[words, workers] = best(speed.get((words, workers)), figures)
    for f in speed.values():
        for k in ("main_per_mb", "main_share", "main_share_all", "main_startup"):
            f[k] = -f[k]
    report_workers(args, speed, alone, ratios)
    report_main(args, speed)


def bench_formats(args, corpus: str, tmp: str, mb: float) -> None:
    files = split_formats(corpus, tmp, args.files)
    workers = max(args.workers)
    speed = {}
    for _ in range(args.repeat):
        for kind, paths in files.items():
            s = run(args, paths, os.path.join(tmp, f"fmt_{kind}"), workers, "none")
            speed[kind] = best(speed.get(kind), {"wall": mb / s["seconds"], "cpu": mb / s["cpu_seconds"]})
    ref = os.path.join(tmp, "fmt_jsonl_text_document")
    for kind, f in speed.items():
        same = same_bytes(os.path.join(tmp, f"fmt_{kind}_text_document"), ref)
        print(f"input as {args.files} {kind:7s} files, --workers {workers}: {f['wall']:6.2f} MB/s, {f['cpu']:6.2f} MB "
              f"(of JSONL) per CPU-second, {100 * f['wall'] / speed['jsonl']['wall']:4.0f}% of JSONL's wall speed; "
              f"shards {'identical to' if same else 'DIFFERENT from'} JSONL's")


def bench_megatron(args, corpus: str, tmp: str, mb: float) -> None:
    for workers in args.workers:
        ours, theirs = None, None
        for _ in range(args.repeat):
            s = run(args, corpus, os.path.join(tmp, f"ours{workers}"), workers, "none")
            ours = best(ours, {"wall": mb / s["wall"], "cpu": mb / s["cpu_seconds"], "own": mb / s["seconds"]})
            m = megatron_lm(args, corpus, os.path.join(tmp, f"mlm{workers}"), workers)
            theirs = best(theirs, {"wall": mb / m["wall"], "cpu": mb / m["cpu"], "own": m["own"]})
        same = same_bytes(os.path.join(tmp, f"ours{workers}_text_document"),
                          os.path.join(tmp, f"mlm{workers}_text_document"))
        print(f"--workers {workers}, SentencePiece, no word boundaries: preprocess_data {ours['wall']:.2f} MB/s from "
              f"process start ({ours['own']:.2f} MB/s by its own timer, {ours['cpu']:.2f} MB per CPU-second), "
              f"Megatron-LM's {theirs['wall']:.2f} MB/s from process start ({theirs['own']:.2f} MB/s by its own "
              f"timer, after its imports; {theirs['cpu']:.2f} MB per CPU-second, imports included); shards "
              f"{'byte-identical' if same else 'DIFFERENT'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=50)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--part-mb", type=float, default=4, help="--part-size-mb of preprocess_data (parts per worker)")
    p.add_argument("--files", type=int, default=8, help="files per format in the format comparison")
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                   choices=["SentencePieceTokenizer", "ByteTokenizer"])
    p.add_argument("--sections", nargs="+", default=["workers", "formats", "megatron"],
                   choices=["workers", "formats", "megatron"])
    p.add_argument("--megatron-lm", default="", help="a Megatron-LM checkout: compare its tools/preprocess_data.py")
    p.add_argument("--megatron-python", default=sys.executable, help="the Python that runs Megatron-LM")
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
              f"load average {os.getloadavg()[0]:.1f}; best of {args.repeat}; parts of {args.part_mb} MB")
        if "workers" in args.sections:
            bench_workers(args, corpus, tmp, mb)
        if "formats" in args.sections:
            bench_formats(args, corpus, tmp, mb)
        if "megatron" in args.sections:
            if args.megatron_lm:
                bench_megatron(args, corpus, tmp, mb)
            else:
                print("Megatron-LM: not compared (pass --megatron-lm CHECKOUT [--megatron-python PYTHON])")


if __name__ == "__main__":
    main()
