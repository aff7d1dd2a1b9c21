#!/usr/bin/env python
"""Quickstart: pretrain a tiny Japanese encoder on the bundled sample corpus, end to end, on a CPU.

    python examples/quickstart.py [--workdir runs/quickstart] [--steps N] [--section.key VALUE ...]
    python examples/quickstart.py --update-readme [--workdir runs/quickstart]

1. train a SentencePiece tokenizer on the training documents (every 10th document is held out);
2. preprocess both parts into Megatron shards with word boundaries (for whole word masking);
3. score the freshly initialised model: validation loss, pseudo-perplexity and masked-word accuracy on
   the held-out part, zero-shot STS on examples/data/jsts_sample.jsonl (tools/evaluate.py);
4. pretrain with `python -m megatron_jp.train --config examples/quickstart.yaml`;
5. export the last checkpoint to Hugging Face and fill in masks with transformers' pipeline;
6. score the trained model the same way as in 3;
7. plot the loss curve.

--steps N shortens the run (warmup and validation interval scale with it); any `--section.key
VALUE` goes to the trainer. The work directory is the quickstart's own: its data/, tokenizer/,
init/, run/, hf/ and eval/ folders and summary.json are replaced on every run. --update-readme
rewrites the README's summary block from the summary.json of a full run (nothing is rerun).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_jp.config import ConfigError, load_config, validate
from megatron_jp.files import write_text

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "quickstart.yaml"
CORPUS = ROOT / "examples" / "data" / "ja_sample.jsonl"
STS = ROOT / "examples" / "data" / "jsts_sample.jsonl"  # 40 JSTS-format pairs written for the quickstart
OUTPUTS = ("data", "tokenizer", "init", "run", "hf", "eval", "summary.json")  # what a run writes under --workdir

# Sentences in the corpus's style with one word masked, and that word: printed beside the predictions
# and counted when it is among the top 3.
FILL_MASK_SENTENCES = [
    ("春になると、公園の桜[MASK]きれいに咲きます。", "が"),
    ("日本の首都は東京[MASK]。", "です"),
    ("雨が降っているので、傘を持って[MASK]きましょう。", "行"),
    ("今日はとても天気[MASK]いいです。", "が"),
]


@dataclass
class Paths:
    """Where each stage writes, all under the work directory."""

    workdir: Path

    def __post_init__(self):
        w = self.workdir
        self.train_jsonl, self.heldout_jsonl = w / "data" / "train.jsonl", w / "data" / "heldout.jsonl"
        self.train_prefix, self.heldout_prefix = w / "data" / "train", w / "data" / "heldout"
        self.tokenizer = w / "tokenizer" / "spm"  # .model, -hf/
        self.init_checkpoint = w / "init"
        self.run_dir = w / "run"
        self.checkpoint = self.run_dir / "checkpoints"
        self.hf = w / "hf"
        self.eval = w / "eval"  # before/ and after/: tools/evaluate.py outputs (predictions.jsonl, result.json)


@dataclass
class Results:
    """Figures collected along the way for the summary."""

    seconds: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    summary_lines: list = field(default_factory=list)  # the printed summary, for summary.json and the README


# ------------------------------------------------------------------------------------------ helpers


def tool(*args: str, stream: bool = False) -> str:
    """Run a megatron_jp tool (or `-m module`) with this interpreter; stop the quickstart if it fails.

    Tools print their result as a last JSON line; `stream` shows the output live instead (training).
    """
    command = [sys.executable, *args]
    if stream:
        result = subprocess.run(command, cwd=ROOT)
        output = ""
    else:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        output = result.stdout
    if result.returncode != 0:
        detail = "" if stream else f"\n{result.stdout}{result.stderr}"
        sys.exit(f"quickstart: failed (exit {result.returncode}): {' '.join(command)}{detail}")
    return output


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ stages


def split_corpus(paths: Paths, heldout_every: int) -> tuple[int, int]:
    """Every `heldout_every`-th document is held out: the corpus mixes 28 topics, so a regular
    stride gives a held-out part with the same mix, which the tokenizer and the model never see."""
    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    heldout = lines[heldout_every - 1::heldout_every]
    train = [line for i, line in enumerate(lines) if (i + 1) % heldout_every]
    paths.train_jsonl.parent.mkdir(parents=True, exist_ok=True)
    paths.train_jsonl.write_text("\n".join(train) + "\n", encoding="utf-8")
    paths.heldout_jsonl.write_text("\n".join(heldout) + "\n", encoding="utf-8")
    return len(train), len(heldout)


def train_tokenizer(paths: Paths, vocab_size: int) -> dict:
    out = tool("tools/train_tokenizer.py", "--input", str(paths.train_jsonl), "--json-key", "text",
               "--model-prefix", str(paths.tokenizer), "--vocab-size", str(vocab_size))
    return last_json(out)


def preprocess(paths: Paths, jsonl: Path, prefix: Path) -> dict:
    out = tool("tools/preprocess_data.py", "--input", str(jsonl), "--output-prefix", str(prefix),
               "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(paths.tokenizer) + ".model",
               "--workers", "2", "--word-boundaries", "unidic-lite")
    return last_json(out)


def trainer_overrides(paths: Paths, steps: int | None, extra: list[str]) -> list[str]:
    """Point the YAML at the work directory; a shortened run scales warmup and validation with it."""
    overrides = ["--data.paths", f"{paths.train_prefix}_text_document",
                 "--data.valid_paths", f"{paths.heldout_prefix}_text_document",
                 "--data.tokenizer_model", f"{paths.tokenizer}.model",
                 "--run.dir", str(paths.run_dir)]
    if steps is not None:
        overrides += ["--train.steps", str(steps), "--optim.warmup_steps", str(max(1, steps // 10)),
                      "--eval.interval", str(max(1, steps // 6))]
    return overrides + extra


def initial_model(cfg, paths: Paths) -> dict:
    """Build the model exactly as the trainer will (same config, same seed: init_weights seeds every
    tensor by its name, so every parallel layout starts from these values), save it as a checkpoint
    for the pseudo-perplexity tool, and return its validation loss on the trainer's validation batches,
    a step-0 point the trainer itself does not log."""
    import torch

    from megatron_jp.data.datasets import VALID
    from megatron_jp.data.loader import ValidLoader, build_mlm_dataset
    from megatron_jp.models.encoder import build_encoder, masked_lm_loss
    from megatron_jp.training.checkpoint import save_model_checkpoint
    from megatron_jp.training.startup import resolve_vocab

    tokenizer = resolve_vocab(cfg)  # model.vocab_size from the tokenizer, as the trainer does
    model = build_encoder(cfg.model, seed=cfg.train.seed).eval()
    save_model_checkpoint(paths.init_checkpoint, 0, cfg, model.state_dict())
    d = cfg.data
    valid = ValidLoader(build_mlm_dataset(d, tokenizer, cfg.train.seed, VALID),
                        micro_batch_size=cfg.train.micro_batch_size, dp_rank=0, dp_size=1,
                        seq_length=d.seq_length, mask_prob=d.mask_prob, max_batches=cfg.eval.steps)
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in valid:
            out = model(batch["input_ids"], labels=batch["labels"], segment_ids=batch["segment_ids"],
                        position_ids=batch["position_ids"])
            loss_sum += masked_lm_loss(out, reduction="sum").item()
            tokens += out.targets.numel()
    return {"valid_loss": loss_sum / tokens, "vocab_size": cfg.model.vocab_size,
            "params": sum(p.numel() for p in model.parameters())}


def evaluate(paths: Paths, checkpoint: Path, when: str, pppl_docs: int, max_length: int) -> dict:
    """tools/evaluate.py on a checkpoint: `intrinsic` (masked-word accuracy and pseudo-perplexity on
    the held-out documents) and `sts` (zero-shot, mean-pooled embeddings); their metrics merged."""
    out = paths.eval / when
    common = ["--model", str(checkpoint), "--device", "cpu"]
    intrinsic = last_json(tool("tools/evaluate.py", "intrinsic", *common, "--input", str(paths.heldout_jsonl),
                               "--output", str(out / "intrinsic"), "--pppl-docs", str(pppl_docs),
                               "--max-length", str(max_length)))
    sts = last_json(tool("tools/evaluate.py", "sts", *common, "--input", str(STS), "--output", str(out / "sts")))
    m = intrinsic["metrics"]
    return {"pppl": m["pppl"], "tokens": m["pppl_tokens"], "documents": m["pppl_documents"],
            "masked_word_accuracy": m["masked_word_accuracy"], "masked_words": m["masked_words"],
            "sts_spearman": sts["metrics"]["spearman"], "sts_pairs": sts["metrics"]["pairs"]}


def export_to_hf(paths: Paths) -> str:
    return tool("tools/convert_to_hf.py", "--checkpoint", str(paths.checkpoint), "--output", str(paths.hf),
                "--tokenizer", f"{paths.tokenizer}.model").strip()


def export_logit_gap(paths: Paths) -> float:
    """Largest |logit| difference between our encoder and transformers on a held-out document:
    the export is faithful when this is at float32 rounding level."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from megatron_jp.models.encoder import Encoder
    from megatron_jp.training.checkpoint import load_model_state

    hf_logging.disable_progress_bar()
    cfg, state = load_model_state(paths.checkpoint)
    ours = Encoder(cfg.model).eval()
    ours.load_state_dict(state)
    hf = AutoModelForMaskedLM.from_pretrained(str(paths.hf)).eval()
    text = json.loads(paths.heldout_jsonl.read_text(encoding="utf-8").splitlines()[0])["text"]
    ids = AutoTokenizer.from_pretrained(str(paths.hf))(text, return_tensors="pt", truncation=True,
                                                  max_length=cfg.data.seq_length)["input_ids"]
    with torch.no_grad():
        gap = ours(ids).logits - hf(input_ids=ids).logits
    return gap.abs().max().item()


def fill_mask(paths: Paths) -> tuple[str, int]:
    """Top-3 predictions of transformers' fill-mask pipeline on the export (plain Auto classes);
    returns the model class and how many sentences have their original word among the three."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load would bury the predictions
    model = AutoModelForMaskedLM.from_pretrained(str(paths.hf))
    tokenizer = AutoTokenizer.from_pretrained(str(paths.hf))
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, top_k=3)
    hits = 0
    for sentence, original in FILL_MASK_SENTENCES:
        predictions = fill(sentence)
        hits += original in [p["token_str"] for p in predictions]
        shown = "  ".join(f"{p['token_str']} ({p['score']:.2f})" for p in predictions)
        print(f"   {sentence}\n      -> {shown}    [original: {original}]")
    return type(model).__name__, hits


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def validation_losses(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]


def training_speed(records: list[dict]) -> float:
    """Mean tokens/s over the logged intervals."""
    speeds = [r["tokens_per_second"] for r in records if "tokens_per_second" in r]
    return sum(speeds) / max(len(speeds), 1)


# ------------------------------------------------------------------------------------------ main


class stage:
    """`with stage(results, 3, "before", "title"):` prints the stage's banner and records its wall time."""

    def __init__(self, results: Results, number: int, name: str, title: str):
        self.results, self.number, self.name, self.title = results, number, name, title

    def __enter__(self):
        print(f"\n== {self.number}/7 {self.title}", flush=True)
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.results.seconds[self.name] = time.perf_counter() - self.start


def make_tokenizer(paths: Paths, args, facts: dict):
    facts["train_docs"], facts["heldout_docs"] = split_corpus(paths, args.heldout_every)
    tok = train_tokenizer(paths, args.vocab_size)
    print(f"   {facts['train_docs']} training documents, {facts['heldout_docs']} held out (one in "
          f"{args.heldout_every})")
    print(f"   SentencePiece unigram, {tok['vocab_size']:,} pieces -> {relative(Path(tok['model']))} "
          f"(+ {relative(Path(tok['hf']))}/)")


def make_shards(paths: Paths, facts: dict):
    for name, jsonl, prefix in (("train", paths.train_jsonl, paths.train_prefix),
                                ("heldout", paths.heldout_jsonl, paths.heldout_prefix)):
        shard = preprocess(paths, jsonl, prefix)
        facts[f"{name}_tokens"] = shard["tokens"]
        print(f"   {name:<8} {shard['documents']:>4} documents {shard['tokens']:>7,} tokens "
              f"-> {relative(Path(shard['outputs'][0]))}.bin/.idx (+ _words.bin/.idx)")


def score_initial_model(cfg, paths: Paths, args, facts: dict):
    init = initial_model(cfg, paths)
    facts["valid_loss_init"], facts["params"], vocab = init["valid_loss"], init["params"], init["vocab_size"]
    facts["before"] = before = evaluate(paths, paths.init_checkpoint, "before", args.pppl_docs,
                                             cfg.data.seq_length)
    print(f"   validation loss {facts['valid_loss_init']:.3f} (a uniform guess over {vocab:,} ids: "
          f"{math.log(vocab):.3f})")
    print(f"   pseudo-perplexity {before['pppl']:,.1f} over {before['tokens']:,} tokens of {before['documents']} "
          f"documents")
    print(f"   masked-word accuracy {before['masked_word_accuracy']:.1%} ({before['masked_words']} whole words "
          f"masked at 15%), zero-shot STS Spearman {before['sts_spearman']:.3f} ({before['sts_pairs']} pairs)")


def pretrain(overrides: list[str]):
    command = f"python -m megatron_jp.train --config {relative(CONFIG)}"
    print(f"   {command} \\\n       {' '.join(overrides)}", flush=True)
    tool("-m", "megatron_jp.train", "--config", str(CONFIG), *overrides, stream=True)


def export_and_fill_masks(paths: Paths, facts: dict):
    print("   " + export_to_hf(paths))
    facts["logit_gap"] = export_logit_gap(paths)
    print(f"   max |logit difference| between megatron_jp and transformers: {facts['logit_gap']:.1e}")
    facts["hf_class"], facts["fill_mask_hits"] = fill_mask(paths)


def score_trained_model(cfg, paths: Paths, args, facts: dict):
    facts["after"] = after = evaluate(paths, paths.checkpoint, "after", args.pppl_docs, cfg.data.seq_length)
    before = facts["before"]
    print(f"   pseudo-perplexity {after['pppl']:,.1f} (before training: {before['pppl']:,.1f})")
    print(f"   masked-word accuracy {after['masked_word_accuracy']:.1%} (before: {before['masked_word_accuracy']:.1%}),"
          f" zero-shot STS Spearman {after['sts_spearman']:.3f} (before: {before['sts_spearman']:.3f})")
    records = read_metrics(paths.run_dir)
    facts["valid"], facts["tokens_per_second"] = validation_losses(records), training_speed(records)
    (first_step, first), (last_step, last) = facts["valid"][0], facts["valid"][-1]
    print(f"   validation loss {first:.3f} at step {first_step} -> {last:.3f} at step {last_step} (metrics.jsonl)")


def plot_loss_curve(paths: Paths, facts: dict):
    facts["png"] = Path(tool("tools/plot_metrics.py", str(paths.run_dir)).strip().splitlines()[-1])
    print(f"   {relative(facts['png'])}")


PASS_THROUGH = """Any other option of the form --section.key VALUE goes to the trainer (python -m megatron_jp.train),
e.g. --optim.lr 1e-3 --data.mask_prob 0.15; `python -m megatron_jp.train --help-config` lists the keys."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False, epilog=PASS_THROUGH,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update-readme", action="store_true",
                        help="rewrite README.md's summary block from WORKDIR/summary.json of a full run with the "
                             "default --workdir and --steps (the README shows those paths), and exit")
    parser.add_argument("--workdir", type=Path, default=Path("runs/quickstart"),
                        help="where data, tokenizer, run and export go (relative to the repository root)")
    parser.add_argument("--steps", type=int, default=None, help="train.steps (default: the YAML's)")
    parser.add_argument("--vocab-size", type=int, default=3000, help="SentencePiece pieces (240 KB of text)")
    parser.add_argument("--heldout-every", type=int, default=10, help="hold out every N-th document")
    parser.add_argument("--pppl-docs", type=int, default=100, help="held-out documents scored for PPPL")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("--") and "." not in a]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (trainer options are --section.key VALUE)")
    return args, extra


def clear_outputs(workdir: Path):
    """Remove only what an earlier quickstart wrote: metrics.jsonl appends and a checkpoint resumes,
    so leftovers would mix two runs."""
    for name in OUTPUTS:
        if (workdir / name).is_dir():
            shutil.rmtree(workdir / name)
        elif (workdir / name).exists():
            (workdir / name).unlink()


def relative(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    start = time.perf_counter()
    paths = Paths(args.workdir if args.workdir.is_absolute() else ROOT / args.workdir)
    if args.update_readme:
        return update_readme(paths.workdir / "summary.json")
    overrides = trainer_overrides(paths, args.steps, extra)
    try:
        cfg = load_config(str(CONFIG), overrides)  # a bad --section.key fails now, not after minutes
        validate(cfg, world_size=1)
    except ConfigError as e:
        sys.exit(f"quickstart: {e}")
    clear_outputs(paths.workdir)
    results = Results()
    facts = results.facts

    with stage(results, 1, "tokenizer", "tokenizer, on the training documents"):
        make_tokenizer(paths, args, facts)
    with stage(results, 2, "preprocess", "Megatron shards with word boundaries (unidic-lite, 2 workers)"):
        make_shards(paths, facts)
    with stage(results, 3, "before", "the freshly initialised model on the held-out documents"):
        score_initial_model(cfg, paths, args, facts)
    with stage(results, 4, "train", "pretraining"):
        pretrain(overrides)
    with stage(results, 5, "export", "Hugging Face export, fill-mask with transformers"):
        export_and_fill_masks(paths, facts)
    with stage(results, 6, "after", "the trained model on the same held-out documents"):
        score_trained_model(cfg, paths, args, facts)
    with stage(results, 7, "plot", "loss curve"):
        plot_loss_curve(paths, facts)

    total_seconds = time.perf_counter() - start
    print_summary(cfg, paths, results, total_seconds)
    write_summary_json(paths, results, total_seconds)
    return 0


def print_summary(cfg, paths: Paths, results: Results, total_seconds: float):
    f, s = results.facts, results.seconds
    (first_step, first), (last_step, last) = f["valid"][0], f["valid"][-1]
    before, after = f["before"], f["after"]
    rows = [
        ("corpus", f"{f['train_docs']} documents ({f['train_tokens']:,} tokens) train, "
                   f"{f['heldout_docs']} ({f['heldout_tokens']:,} tokens) held out"),
        ("model", f"preset {cfg.model.preset} ({f['params'] / 1e6:.2f}M parameters): {cfg.model.num_layers} layers, "
                  f"hidden {cfg.model.hidden_size}, seq {cfg.data.seq_length}, "
                  f"{'whole word' if cfg.data.whole_word_masking else 'token'} masking {cfg.data.mask_prob:.0%}"),
        ("training", f"{cfg.train.steps} steps x {cfg.train.global_batch_size} sequences in {s['train']:.0f} s "
                     f"({f['tokens_per_second']:,.0f} tokens/s)"),
        ("validation loss", f"{f['valid_loss_init']:.3f} at step 0 -> {first:.3f} at step {first_step} "
                            f"-> {last:.3f} at step {last_step}"),
        ("pseudo-perplexity", f"{before['pppl']:,.1f} before -> {after['pppl']:,.1f} after "
                              f"({before['documents']} held-out documents, {before['tokens']:,} tokens)"),
        ("masked words", f"{before['masked_word_accuracy']:.1%} before -> {after['masked_word_accuracy']:.1%} after "
                         f"right ({after['masked_words']:,} held-out words masked at 15%)"),
        ("zero-shot STS", f"Spearman {before['sts_spearman']:.3f} before -> {after['sts_spearman']:.3f} after "
                          f"({after['sts_pairs']} pairs of {relative(STS)})"),
        ("fill-mask", f"original word in the top 3 for {f['fill_mask_hits']} of {len(FILL_MASK_SENTENCES)} sentences"),
        ("Hugging Face", f"{relative(paths.hf)} ({f['hf_class']}, max logit gap {f['logit_gap']:.1e})"),
        ("checkpoints", relative(paths.checkpoint)),
        ("metrics", relative(paths.run_dir / "metrics.jsonl")),
        ("loss curve", relative(f["png"])),
        ("wall time", f"{total_seconds:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in s.items()) + ")"),
    ]
    results.summary_lines = ["== summary", *(f"   {name:<18} {value}" for name, value in rows)]
    print("\n" + "\n".join(results.summary_lines))


def readme_block(readme: str) -> tuple[int, int]:
    """(start, end) offsets of the lines between the fence that opens with `== summary` and its end."""
    start = readme.index("```\n== summary\n") + 4
    return start, readme.index("```", start)


def update_readme(summary_json: Path) -> int:
    """Replace the README's summary block with the lines of a run's summary.json."""
    try:
        lines = json.loads(summary_json.read_text(encoding="utf-8"))["summary_lines"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"quickstart: {summary_json}: no summary of a finished run ({e}); run the quickstart first")
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text(encoding="utf-8")
    start, end = readme_block(readme)
    write_text(readme_path, readme[:start] + "\n".join(lines) + "\n" + readme[end:])
    print(f"{relative(readme_path)}: summary block rewritten from {summary_json}")
    return 0


def write_summary_json(paths: Paths, results: Results, total_seconds: float):
    """The same figures for scripts and CI: WORKDIR/summary.json."""
    f = results.facts
    summary = {"valid_loss_init": f["valid_loss_init"], "valid_loss": f["valid"],
               "pppl_before": f["before"]["pppl"], "pppl_after": f["after"]["pppl"],
               "pppl_tokens": f["after"]["tokens"], "fill_mask_hits": f["fill_mask_hits"],
               "masked_word_accuracy_before": f["before"]["masked_word_accuracy"],
               "masked_word_accuracy_after": f["after"]["masked_word_accuracy"],
               "sts_spearman_before": f["before"]["sts_spearman"],
               "sts_spearman_after": f["after"]["sts_spearman"], "eval": str(paths.eval),
               "logit_gap": f["logit_gap"], "hf": str(paths.hf), "checkpoint": str(paths.checkpoint),
               "png": str(f["png"]), "seconds": {**results.seconds, "total": total_seconds},
               "summary_lines": results.summary_lines}
    write_text(paths.workdir / "summary.json", json.dumps(summary, indent=2) + "\n")  # temporary name, renamed


if __name__ == "__main__":
    sys.exit(main())
