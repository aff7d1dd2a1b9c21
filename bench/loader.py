"""Benchmark: tokens/s of sample construction + MLM masking in one process (one DataLoader worker).

    python bench/loader.py [--seq-length 1024] [--packing best_fit] [--docs 200000] [--batches 200]

Generates a synthetic shard (geometric document lengths, mean --mean-doc tokens, random word
flags) in a temp dir, builds the packed index (timed separately) and then times `MLMDataset.batch`
for micro-batches of --micro-batch-size rows with whole word masking. Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jp.data import indexed, packing  # noqa: E402
from megatron_jp.data.loader import build_mlm_dataset  # noqa: E402
from megatron_jp.data.datasets import TRAIN  # noqa: E402
from megatron_jp.data.tokenizers import ByteTokenizer  # noqa: E402


class FakeVocab:
    """A 32k vocabulary with the byte tokenizer's special ids (the masker only needs ids)."""

    def __init__(self, vocab_size: int = 32000):
        base = ByteTokenizer()
        self.vocab_size, self.special_ids = vocab_size, base.special_ids
        for key in ("cls", "sep", "mask", "pad", "unk", "eod"):
            setattr(self, f"{key}_id", getattr(base, f"{key}_id"))


def write_corpus(prefix: str, n_docs: int, mean_len: int, vocab: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    lengths = rng.geometric(1.0 / mean_len, size=n_docs)
    tok = indexed.IndexedDatasetWriter(prefix, indexed.optimal_dtype(vocab))
    words = indexed.IndexedDatasetWriter(indexed.words_prefix(prefix), np.uint8)
    for lo in range(0, n_docs, 10000):
        part = lengths[lo:lo + 10000]
        tok.add_documents(rng.integers(5, vocab, size=part.sum()), part)
        words.add_documents((rng.random(part.sum()) < 0.6).astype(np.uint8), part)
    tok.commit()
    words.commit()
    return int(lengths.sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--packing", default="best_fit", choices=packing.PACKING_METHODS)
    p.add_argument("--docs", type=int, default=200_000)
    p.add_argument("--mean-doc", type=int, default=400)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--no-whole-word", action="store_true")
    args = p.parse_args()
    vocab = FakeVocab()
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "bench_text_document")
        n_tokens = write_corpus(prefix, args.docs, args.mean_doc, vocab.vocab_size)
        cfg = types.SimpleNamespace(paths=prefix, valid_paths="", split="100,0", packing=args.packing,
                                    mask_prob=0.15, mask_token_prob=0.8, random_token_prob=0.1,
                                    whole_word_masking=not args.no_whole_word)
        mlm = build_mlm_dataset(cfg, vocab, seed=1234, stream=TRAIN)
        t0 = time.perf_counter()
        mlm.prepare(args.seq_length)
        t_index = time.perf_counter() - t0
        index = mlm.sources[0].index(args.seq_length)
        mbs = args.micro_batch_size
        mlm.batch(range(mbs), args.seq_length, 0.15)  # warm the epoch permutation
        t0 = time.perf_counter()
        for b in range(args.batches):
            mlm.batch(range(b * mbs, (b + 1) * mbs), args.seq_length, 0.15)
        dt = time.perf_counter() - t0
    rows = args.batches * mbs
    helper = "C++ _helpers" if packing._helpers is not None else "Python fallback"
    print(f"corpus: {args.docs:,} docs, {n_tokens:,} tokens; packing {args.packing} ({helper}): "
          f"{index.num_rows:,} rows of {args.seq_length}, padding {100 * index.summary['padding']:.2f}%, "
          f"index built in {t_index:.2f} s ({n_tokens / t_index / 1e6:.1f} M tokens/s)")
    print(f"sample construction + {'whole word ' if cfg.whole_word_masking else ''}masking: {rows:,} rows in "
          f"{dt:.2f} s = {rows / dt:,.0f} rows/s = {rows * args.seq_length / dt / 1e6:.2f} M tokens/s (one process)")


if __name__ == "__main__":
    main()
