"""Benchmark: data-loader start-up at corpus scale (first start builds the index cache, later starts map it).

    python bench/loader_scale.py [--docs 1000000 10000000 100000000] [--seq-length 1024] [--packing best_fit]
                                 [--dir /tmp] [--ranks 1]

For each size a synthetic shard: a real .idx (geometric document lengths, mean --mean-doc tokens)
and a sparse .bin of the right size (reads return zeros; no disk used). Each case runs in its own
process, which builds the train loader of one rank (cache in a fresh folder for "first", the same
folder again for "cached") and draws the first batch; with --ranks N, N such processes start at
once for each case (one builds under the lock, the others wait and map; the table shows the
slowest and the largest of them). Each reports the seconds from the call to the
first batch and its peak RSS (VmHWM of /proc/self/status: anonymous memory plus the file pages it
mapped and touched; not ru_maxrss, which Linux carries over from the parent across fork and exec).
"base" is the peak RSS of the same process after its imports, before any data. Prints a table
and the growth per million documents; not a test. Shards and caches go to a temporary folder under
--dir that is deleted at the end (100M documents: a 1.6 GB .idx and ~1.6 GB of cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASE = r"""
import json, sys, time, types
sys.path.insert(0, {root!r})
from megatron_jp.data.loader import build_data_loaders
from megatron_jp.data.tokenizers import ByteTokenizer

class Vocab:
    vocab_size, special_ids = 32000, ByteTokenizer().special_ids
    cls_id, sep_id, mask_id, pad_id, unk_id, eod_id = 2, 3, 4, 0, 1, 3

def peak_rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

base = peak_rss_mb()
cfg = types.SimpleNamespace(paths={prefix!r}, valid_paths="", split="100,0", packing={packing!r},
                            seq_length={seq}, mask_prob=0.15, mask_token_prob=0.8, random_token_prob=0.1,
                            whole_word_masking=False, num_workers=0, cache_dir={cache!r})
t0 = time.perf_counter()
train, _ = build_data_loaders(cfg, Vocab(), micro_batch_size=8, dp_rank=0, dp_size=1, seed=1234)
batch = next(train)
seconds = time.perf_counter() - t0
rows = train.mlm.sources[0].index({seq})
print(json.dumps({{"seconds": seconds, "rss_mb": peak_rss_mb(),
                  "base_mb": base, "rows": rows.num_rows, "tokens": rows.summary["tokens"],
                  "padding": rows.summary["padding"], "built": train.mlm.cache.built}}))
"""


def write_shard(prefix: str, n_docs: int, mean: int, seed: int = 0) -> int:
    """A real .idx for n_docs geometric lengths and a sparse .bin; returns the token count."""
    from megatron_jp.data import indexed

    chunk, total = 10_000_000, 0
    with open(indexed.idx_path(prefix), "wb") as f:
        f.write(indexed.MAGIC + np.array([1], "<u8").tobytes() + bytes([8])
                + np.array([n_docs, n_docs + 1], "<u8").tobytes())
        for lo in range(0, n_docs, chunk):  # lengths first, pointers after: two passes with one seed
            f.write(np.random.default_rng([seed, lo]).geometric(1 / mean, min(chunk, n_docs - lo)).astype("<i4"))
        for lo in range(0, n_docs, chunk):
            lengths = np.random.default_rng([seed, lo]).geometric(1 / mean, min(chunk, n_docs - lo))
            ends = total + np.cumsum(lengths)
            f.write((2 * np.concatenate(([total], ends[:-1]))).astype("<i8"))
            total = int(ends[-1])
        for lo in range(0, n_docs + 1, chunk):
            f.write(np.arange(lo, min(lo + chunk, n_docs + 1), dtype="<i8"))
    with open(indexed.bin_path(prefix), "wb") as f:
        f.truncate(2 * total)  # sparse: uint16 tokens, all zero
    return total


def run_case(prefix: str, cache: str, args) -> dict:
    """--ranks processes started together; the slowest time, the largest peak RSS, the builds made."""
    code = CASE.format(root=ROOT, prefix=prefix, cache=cache, packing=args.packing, seq=args.seq_length)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(args.ranks)]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(err)
        results.append(json.loads(out.strip().splitlines()[-1]))
    worst = dict(results[0])
    worst.update(seconds=max(r["seconds"] for r in results), rss_mb=max(r["rss_mb"] for r in results),
                 built=sum(r["built"] for r in results))
    return worst


def disk_mb(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--packing", default="best_fit", choices=["none", "concat", "best_fit"])
    p.add_argument("--mean-doc", type=int, default=400)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary shards and caches go")
    p.add_argument("--ranks", type=int, default=1, help="processes started at once per case (one rank each)")
    args = p.parse_args()
    from megatron_jp.data import packing

    helper = "C++ _helpers" if packing._helpers is not None else "Python fallback"
    print(f"packing {args.packing} ({helper}), seq_length {args.seq_length}, mean document {args.mean_doc} "
          f"tokens, {os.cpu_count()} cores; {args.ranks} process(es) per case")
    print(f"{'documents':>12} {'tokens':>15} {'rows':>12} {'first s':>8} {'first MB':>9} {'cached s':>9} "
          f"{'cached MB':>10} {'base MB':>8} {'cache MB':>9}")
    results = []
    tmp = tempfile.mkdtemp(prefix="loader_scale_", dir=args.dir)
    try:
        for n in (int(d) for d in args.docs):
            prefix = os.path.join(tmp, f"synthetic_{n}")
            write_shard(prefix, n, args.mean_doc)
            cache = os.path.join(tmp, f"cache_{n}")
            first, cached = run_case(prefix, cache, args), run_case(prefix, cache, args)
            assert first["built"] == 1 and cached["built"] == 0, (first, cached)  # one builder, whatever --ranks
            size = disk_mb(cache)
            results.append((n, first, cached, size))
            print(f"{n:12,} {first['tokens']:15,} {first['rows']:12,} {first['seconds']:8.2f} {first['rss_mb']:9.0f} "
                  f"{cached['seconds']:9.2f} {cached['rss_mb']:10.0f} {cached['base_mb']:8.0f} {size:9.0f}",
                  flush=True)
            for f in os.listdir(tmp):  # free the disk before the next size
                path = os.path.join(tmp, f)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if len(results) >= 2:
        report_growth(results)


def report_growth(results) -> None:
    """Growth per million documents between the smallest and largest size, and the 1B extrapolation."""
    (n0, f0, c0, s0), (n1, f1, c1, s1) = results[0], results[-1]
    growth = {"first s": (f0["seconds"], f1["seconds"]), "first MB": (f0["rss_mb"], f1["rss_mb"]),
              "cached s": (c0["seconds"], c1["seconds"]), "cached MB": (c0["rss_mb"], c1["rss_mb"]),
              "cache MB": (s0, s1)}
    per_m = {k: (b - a) / ((n1 - n0) / 1e6) for k, (a, b) in growth.items()}
    print(f"growth per million documents ({n0:,} -> {n1:,}): "
          + ", ".join(f"{k} {v:+.4f}" for k, v in per_m.items()))
    scale = (1e9 - n1) / 1e6
    print("extrapolated linearly to 1,000,000,000 documents: "
          + ", ".join(f"{k} {b + scale * per_m[k]:,.2f}" for k, (_, b) in growth.items()))

if __name__ == "__main__":
    main()
