#!/usr/bin/env python
"""A short run of the real trainer (`python -m megatron_jp.train`) on a synthetic shard, for speed:
tokens/s, TFLOP/s per GPU and MFU as the trainer logs them, peak memory against the dry run's plan.

    python bench/train_synthetic.py --preset tohoku-bert-500m --seq 4096 --micro-batch 4 --steps 20
                                    [--json OUT.json] [--rehearse] [--workdir DIR] [-- --section.key VALUE ...]

The shard holds random documents (lengths 64..2*seq, packed best-fit, as real text is) over a
word-level tokenizer with the preset's vocabulary, written once into --workdir. Figures are the
medians over the steps after the first third (compilation and warm-up). --rehearse runs the same
code path on CPU with the preset's tiny counterpart and short sequences, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from megatron_jp.config import parse_overrides
from megatron_jp.data import indexed
from megatron_jp.models.config import preset

ROOT = Path(__file__).resolve().parents[1]
TINY = {"tohoku-bert-500m": "tiny", "bybert-100m": "tiny", "modernbert-ja-130m": "tiny-modernbert",
        "llm-jp-modernbert-base": "tiny-modernbert", "retrieva-bert-1.3b": "tiny"}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--preset", required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", help="write the summary here too")
    p.add_argument("--workdir", help="where the tokenizer, shard and run go (default: a temporary folder)")
    p.add_argument("--rehearse", action="store_true", help="CPU, the preset's tiny counterpart, short sequences")
    args, extra = p.parse_known_args(argv)
    return args, [a for a in extra if a != "--"]


def write_tokenizer(folder: Path, vocab_size: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIALS), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    names = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
             "mask_token": "[MASK]", "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(names))
    return folder


def write_shard(prefix: Path, vocab_size: int, tokens: int, seq: int, seed: int = 0) -> str:
    """Random documents of 64..2*seq tokens, [CLS] ... [SEP] each, `tokens` in all."""
    gen = np.random.default_rng(seed)
    dtype = np.uint16 if vocab_size < 65500 else np.int32
    writer = indexed.IndexedDatasetWriter(str(prefix), dtype)
    written = 0
    while written < tokens:
        n = int(gen.integers(64, 2 * seq))
        body = gen.integers(len(SPECIALS), vocab_size, n - 2)
        writer.add_document(np.concatenate([[2], body, [3]]).astype(dtype))
        written += n
    writer.commit()
    return str(prefix)


def run_args(args, model: str, seq: int, workdir: Path, tokenizer: Path, data: str, extra: list[str]) -> list[str]:
    device = "cpu" if args.rehearse else "cuda"
    overrides = {"model.preset": model, "data.paths": data, "data.tokenizer_type": "HuggingFaceTokenizer",
                 "data.tokenizer_model": str(tokenizer), "data.seq_length": seq, "data.packing": "best_fit",
                 "data.split": "100,0", "data.num_workers": 2, "train.steps": args.steps,
                 "train.micro_batch_size": args.micro_batch, "train.global_batch_size": args.micro_batch,
                 "train.precision": "fp32" if device == "cpu" else "bf16", "optim.warmup_steps": 1,
                 "log.interval": 1, "checkpoint.interval": 0, "checkpoint.keep": 1, "run.dir": str(workdir / "run")}
    # the trainer refuses a key given twice: what is passed after `--` replaces these defaults
    overrides |= {f"{section}.{key}": value for section, keys in parse_overrides(extra).items()
                  for key, value in keys.items()}
    return [item for key, value in overrides.items() for item in (f"--{key}", str(value))]


def median_after_warmup(records: list[dict], key: str) -> float:
    values = [r[key] for r in records[len(records) // 3:] if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    model = TINY.get(args.preset, args.preset) if args.rehearse else args.preset
    seq = min(args.seq, 256) if args.rehearse else args.seq
    if args.rehearse:
        args.micro_batch = min(args.micro_batch, 4)
    vocab = preset(model).vocab_size or 512
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="train_synthetic."))
    tokenizer = write_tokenizer(workdir / "tokenizer", vocab)
    data = write_shard(workdir / f"synthetic_{vocab}_text_document", vocab,
                       int(1.3 * args.steps * args.micro_batch * seq) + 4 * seq, seq)
    cli = run_args(args, model, seq, workdir, tokenizer, data, extra)
    dry = subprocess.run([sys.executable, "-m", "megatron_jp.train", *cli, "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True)
    if dry.returncode != 0:
        print(dry.stderr[-4000:], file=sys.stderr)
        return dry.returncode
    plan = json.loads(dry.stdout.splitlines()[-1])
    run = subprocess.run([sys.executable, "-m", "megatron_jp.train", *cli], cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        print(run.stdout[-2000:], run.stderr[-4000:], file=sys.stderr)
        return run.returncode
    lines = (workdir / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if '"loss"' in line]
    summary = {"preset": model, "seq_length": seq, "micro_batch": args.micro_batch, "steps": len(records),
               "tokens_per_second": median_after_warmup(records, "tokens_per_second"),
               "tflops_per_gpu": median_after_warmup(records, "tflops_per_gpu"),
               "mfu": median_after_warmup(records, "mfu"),
               "peak_memory_gb": max(r["memory_gb"] for r in records),
               "plan_memory_gb": plan["memory_per_rank_bytes"] / 1e9,
               "plan_activation_gb": plan["activation_bytes"] / 1e9,
               "final_loss": records[-1]["loss"]}
    text = json.dumps(summary)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
