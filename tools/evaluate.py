#!/usr/bin/env python
"""Evaluate a megatron_jp checkpoint or any Hugging Face folder (the library: megatron_jp/eval/).

    python tools/evaluate.py finetune --model M --task {marc_ja,jsts,jnli,jcola,jcommonsenseqa,jsquad}
                                      --train F --valid F --output DIR [--lr --epochs --seed --max-length
                                      --batch-size] [--sweep [--seeds S ...]]
    python tools/evaluate.py intrinsic --model M --input F.jsonl --output DIR [--pairs jsts.jsonl]
                                       [--probes probes.jsonl] [--no-pppl]
    python tools/evaluate.py sts --model M --input jsts.jsonl --output DIR [--pooling mean|cls]
    python tools/evaluate.py retrieval --model M --queries Q.jsonl --corpus C.jsonl --qrels R.tsv --output DIR
    python tools/evaluate.py export-sentence-transformers --model M --output DIR [--pooling mean|cls]
    python tools/evaluate.py leaderboard RESULT_DIR... --output board.md

M is a checkpoint directory (its `latest`), an iter_* folder or a Hugging Face folder; folders with
custom modeling code need --trust-remote-code. Every command reads local files only, writes
DIR/predictions.jsonl (id, prediction, gold) and DIR/result.json (export-sentence-transformers: the
folder and its result.json; leaderboard: board.md, board.json, PNGs), and prints that result, one JSON
object {"task", "metrics", "model", "config", ...}, as its last line. Bad input stops it before any
model is loaded, with the file and line at fault (exit status 2). An --output that holds earlier
results is refused unless --overwrite; an output that is also an input is always refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jp.eval.records import (RESULTS, EvalInputError, claim_results_folder, refuse_overlap,  # noqa: E402
                                     write_predictions, write_result)
from megatron_jp.eval.tasks import TASKS  # noqa: E402
from megatron_jp.files import holds_files, inside  # noqa: E402


def add_model(p, output_required: bool = True):
    p.add_argument("--model", required=True, help="checkpoint directory, iter_* folder, or Hugging Face folder")
    p.add_argument("--output", required=output_required, help="folder for predictions.jsonl and result.json")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a folder's own modeling code (auto_map)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    add_overwrite(p)


def add_overwrite(p):
    p.add_argument("--overwrite", action="store_true", help="replace the earlier results of --output")


def add_pooling(p, max_length: int):
    p.add_argument("--pooling", default="mean", choices=["mean", "cls"], help="sentence embedding")
    p.add_argument("--max-length", type=int, default=max_length, help="tokens per text, CLS and SEP included")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", help="fine-tune on a JGLUE task, score on its dev file", allow_abbrev=False)
    add_model(p)
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--train", required=True, help="training file in the task's JGLUE format")
    p.add_argument("--valid", required=True, help="dev file scored after training")
    p.add_argument("--lr", type=float, default=3e-5, help="peak learning rate (a single run)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-length", type=int, default=0, help="0: the task's JGLUE default")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-train-examples", type=int, default=0, help="use only the first N (0: all)")
    p.add_argument("--sweep", action="store_true", help="lr {5e-5,3e-5,2e-5} x epochs {3,4} x --seeds; keep the best")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the sweep (default: --seed)")

    p = sub.add_parser("intrinsic", help="masked-word accuracy, pseudo-perplexity, alignment/uniformity, "
                                         "fill-mask", allow_abbrev=False)
    add_model(p)
    p.add_argument("--input", required=True, help="JSONL documents")
    p.add_argument("--json-key", default="text")
    p.add_argument("--max-docs", type=int, default=1000)
    p.add_argument("--word-boundaries", default="unidic-lite", choices=["unidic-lite", "sudachi", "none"],
                   help="as preprocess_data's (none: every token is a word)")
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0, help="seeds which words are masked")
    p.add_argument("--no-pppl", action="store_true", help="skip pseudo-perplexity (one forward per token)")
    p.add_argument("--pppl-docs", type=int, default=100, help="documents scored for pseudo-perplexity")
    p.add_argument("--pairs", default=None, help="JSTS-style pairs for alignment and uniformity")
    p.add_argument("--positive-score", type=float, default=4.0, help="pairs scoring at least this are positives")
    p.add_argument("--probes", default=None, help='fill-mask probes: {"text": "...[MASK]...", "answer": "..."}')
    p.add_argument("--top-k", type=int, default=3)
    add_pooling(p, 512)

    p = sub.add_parser("sts", help="zero-shot STS: cosine of embeddings against the gold score", allow_abbrev=False)
    add_model(p)
    p.add_argument("--input", required=True, help="JSTS-format JSONL")
    add_pooling(p, 128)

    p = sub.add_parser("retrieval", help="zero-shot retrieval: Recall@k, MRR@10, nDCG@10", allow_abbrev=False)
    add_model(p)
    p.add_argument("--queries", required=True, help='JSONL {"_id" or "id", "text"}')
    p.add_argument("--corpus", required=True, help='JSONL {"_id" or "id", "text", "title" (optional)}')
    p.add_argument("--qrels", required=True, help="TSV query-id, corpus-id, score (BEIR) or TREC qrels")
    p.add_argument("--k", default="1,5,10,100", help="Recall@k cut-offs, comma-separated")
    p.add_argument("--query-prefix", default="", help='prepended to every query (e.g. "query: ")')
    p.add_argument("--passage-prefix", default="", help='prepended to every document (e.g. "passage: ")')
    add_pooling(p, 512)

    p = sub.add_parser("export-sentence-transformers", help="a folder SentenceTransformer(DIR) loads",
                       allow_abbrev=False)
    add_model(p)
    p.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    p.add_argument("--max-seq-length", type=int, default=512)

    p = sub.add_parser("leaderboard", help="markdown + JSON table across results, PNG per metric vs step",
                       allow_abbrev=False)
    p.add_argument("results", nargs="+", help="--output folders (or their result.json) of evaluations")
    p.add_argument("--output", required=True, help="board.md; board.json and board_*.png beside it")
    add_overwrite(p)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- outputs

INPUTS = ("model", "train", "valid", "input", "pairs", "probes", "queries", "corpus", "qrels")


def claim_outputs(args) -> None:
    """Before any model loads: refuse outputs that are inputs, and earlier results unless --overwrite."""
    inputs = [getattr(args, name, None) for name in INPUTS]
    if args.command == "leaderboard":
        from megatron_jp.eval.leaderboard import claim_board

        return claim_board(args.results, args.output, args.overwrite)
    out = Path(args.output)
    if args.command == "export-sentence-transformers":
        refuse_overlap(inputs, [], replaced=[out])
        if holds_files(out) and not args.overwrite:
            raise EvalInputError(f"--output {out} exists and is not empty: pass --overwrite to replace it (the new "
                                 "folder is written beside it, then swapped in), or choose another folder")
        return None
    refuse_overlap(inputs, [out / name for name in RESULTS], replaced=[out / "sweep"])
    if inside(out, args.model):
        raise EvalInputError(f"--output {out} is inside the model folder {args.model}; write results elsewhere")
    claim_results_folder(out, args.overwrite)


# ----------------------------------------------------------------------------- commands


def cmd_finetune(args, log):
    from megatron_jp.eval.finetune import finetune, sweep_grid
    from megatron_jp.eval.models import open_model
    from megatron_jp.eval.tasks import Hyper, read_examples, task_spec
    from megatron_jp.files import remove_quietly

    spec = task_spec(args.task)
    train, valid = read_examples(spec, args.train), read_examples(spec, args.valid)
    hp = Hyper(lr=args.lr, epochs=args.epochs, seed=args.seed, max_length=args.max_length,
               batch_size=args.batch_size, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
               max_train_examples=args.max_train_examples)
    grid = sweep_grid(hp, args.seeds or [args.seed]) if args.sweep else [hp]
    if args.overwrite:  # the earlier sweep's runs would mix with this one's
        remove_quietly(Path(args.output) / "sweep")
    with open_model(args.model, args.trust_remote_code, args.device) as model:
        return finetune(model, spec, train, valid, grid, args.output, public_info(model), log)


def cmd_intrinsic(args, log):
    from megatron_jp.eval import intrinsic
    from megatron_jp.eval.embed import read_sts
    from megatron_jp.eval.models import open_model

    docs = intrinsic.read_documents(args.input, args.json_key, args.max_docs)
    pairs = read_sts(args.pairs) if args.pairs else None
    probes = intrinsic.read_probes(args.probes) if args.probes else None
    settings = intrinsic.Settings(args.max_length, args.word_boundaries, args.seed, args.mask_prob,
                                  0 if args.no_pppl else args.pppl_docs, args.positive_score, args.top_k, args.pooling)
    with open_model(args.model, args.trust_remote_code, args.device) as model:
        metrics, rows = intrinsic.evaluate(model, docs, pairs, probes, settings, args.output)
        return finish(args, "intrinsic", metrics, rows, dataclasses.asdict(settings), model)


def cmd_sts(args, log):
    from megatron_jp.eval.embed import read_sts, sts
    from megatron_jp.eval.models import open_model

    pairs = read_sts(args.input)
    with open_model(args.model, args.trust_remote_code, args.device) as model:
        metrics, rows = sts(model.backbone(), model.tokenizer, pairs, model.device, args.pooling, args.max_length)
        metrics["pairs"] = len(pairs)
        return finish(args, "sts", metrics, rows, {"pooling": args.pooling, "max_length": args.max_length}, model)


def cmd_retrieval(args, log):
    from megatron_jp.eval.embed import read_qrels, read_texts, retrieval
    from megatron_jp.eval.models import open_model

    try:
        ks = sorted({int(k) for k in args.k.split(",")})
    except ValueError:
        raise EvalInputError(f"--k {args.k!r}: expected comma-separated integers such as 1,5,10") from None
    queries, corpus = read_texts(args.queries, "query"), read_texts(args.corpus, "document")
    qrels = read_qrels(args.qrels, set(queries[0]), set(corpus[0]))
    config = {"pooling": args.pooling, "max_length": args.max_length, "k": ks,
              "query_prefix": args.query_prefix, "passage_prefix": args.passage_prefix}
    with open_model(args.model, args.trust_remote_code, args.device) as model:
        metrics, rows = retrieval(model.backbone(), model.tokenizer, model.device, queries, corpus, qrels, ks,
                                  args.pooling, args.max_length, args.query_prefix, args.passage_prefix)
        metrics["corpus"] = len(corpus[0])
        return finish(args, "retrieval", metrics, rows, config, model)


def cmd_export(args, log):
    from megatron_jp.eval.export_st import export_sentence_transformers
    from megatron_jp.eval.models import open_model

    with open_model(args.model, args.trust_remote_code, args.device) as model:
        out = export_sentence_transformers(model, args.output, args.pooling, args.max_seq_length)
        result = {"task": "export-sentence-transformers", "metrics": {"max_difference": out["max_difference"]},
                  "model": model.source, "model_info": public_info(model), "config": out}
        write_result(args.output, result)
        return result


def cmd_leaderboard(args, log):
    from megatron_jp.eval.leaderboard import leaderboard

    return leaderboard(args.results, args.output)


def public_info(model) -> dict:
    return {k: v for k, v in model.info.items() if k != "auto_map"}


def finish(args, task: str, metrics: dict, rows: list, config: dict, model) -> dict:
    result = {"task": task, "metrics": metrics, "model": model.source, "model_info": public_info(model),
              "config": config}
    write_predictions(args.output, rows)
    write_result(args.output, result)
    return result


COMMANDS = {"finetune": cmd_finetune, "intrinsic": cmd_intrinsic, "sts": cmd_sts, "retrieval": cmd_retrieval,
            "export-sentence-transformers": cmd_export, "leaderboard": cmd_leaderboard}


def main(argv=None) -> int:
    args = parse_args(argv)

    def log(message: str):
        print(message, file=sys.stderr, flush=True)

    begin = time.perf_counter()
    try:
        claim_outputs(args)
        result = COMMANDS[args.command](args, log)
    except EvalInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["seconds"] = round(time.perf_counter() - begin, 2)
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
