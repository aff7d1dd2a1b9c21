#!/usr/bin/env python
"""Wall time of every `tools/evaluate.py` subcommand on one model, with task files made up from the
bundled corpus (the scores mean nothing: the labels are arbitrary; the time is the point).

    python bench/evaluate.py [--model runs/quickstart/run/checkpoints] [--examples 64] [--device cpu]

Each subcommand runs as a user runs it (a fresh process: imports and model loading included) and
prints one line: its wall and CPU seconds and its metrics. Fine-tuning is one epoch at the task's JGLUE
max length, batch 32.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "examples" / "data" / "ja_sample.jsonl"
STS = ROOT / "examples" / "data" / "jsts_sample.jsonl"


def sentences() -> list[str]:
    out = []
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        out += [s + "。" for s in json.loads(line)["text"].split("。") if len(s) > 8]
    return out


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def task_files(folder: Path, n: int) -> dict[str, str]:
    s = sentences()
    pick = lambda i: s[(i * 7) % len(s)]  # noqa: E731
    files = {
        "marc_ja": [{"review_id": str(i), "sentence": pick(i) + pick(i + 1), "label": ("positive", "negative")[i % 2]}
                    for i in range(n)],
        "jsts": [{"sentence_pair_id": str(i), "sentence1": pick(i), "sentence2": pick(i + 3), "label": i % 6}
                 for i in range(n)],
        "jnli": [{"sentence_pair_id": str(i), "sentence1": pick(i), "sentence2": pick(i + 3),
                  "label": ("entailment", "contradiction", "neutral")[i % 3]} for i in range(n)],
        "jcola": [{"uid": i, "sentence": pick(i), "label": i % 2} for i in range(n)],
        "jcommonsenseqa": [{"q_id": i, "question": pick(i), **{f"choice{c}": pick(i + c)[:6] for c in range(5)},
                            "label": i % 5} for i in range(n)],
    }
    paths = {task: write_jsonl(folder / f"{task}.jsonl", records) for task, records in files.items()}
    paragraphs = []
    for i in range(n // 4):
        context = "".join(pick(i * 4 + k) for k in range(4))
        answer = pick(i * 4 + 2)[:6]
        qas = [{"id": f"{i}-{k}", "question": pick(i + k + 1)[:20] + "？",
                "answers": [{"text": answer, "answer_start": context.index(answer)}]} for k in range(4)]
        paragraphs.append({"context": context, "qas": qas})
    squad = {"version": "v1.0", "data": [{"title": "t", "paragraphs": paragraphs}]}
    (folder / "jsquad.json").write_text(json.dumps(squad, ensure_ascii=False), encoding="utf-8")
    paths["jsquad"] = str(folder / "jsquad.json")
    docs = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()[:n]]
    paths["docs"] = write_jsonl(folder / "docs.jsonl", docs)
    paths["queries"] = write_jsonl(folder / "queries.jsonl", [{"_id": f"q{i}", "text": pick(i)[:12]} for i in range(n)])
    paths["corpus"] = write_jsonl(folder / "corpus.jsonl", [{"_id": f"d{i}", "text": pick(i)} for i in range(4 * n)])
    (folder / "qrels.tsv").write_text("".join(f"q{i}\td{i}\t1\n" for i in range(n)), encoding="utf-8")
    paths["qrels"] = str(folder / "qrels.tsv")
    return paths


def timed(args: list[str]) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds of the process, its result): CPU time is the steadier figure on a
    shared machine."""
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    begin = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), *args], cwd=ROOT,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - begin
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{result.stderr[-3000:]}")
    used = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    return seconds, used, json.loads(result.stdout.splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "runs" / "quickstart" / "run" / "checkpoints"))
    p.add_argument("--examples", type=int, default=64, help="training = dev examples per task")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    common = ["--model", args.model, "--device", args.device]
    common += ["--trust-remote-code"] if args.trust_remote_code else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = task_files(tmp, args.examples)
        runs = [(f"finetune {task}", ["finetune", *common, "--task", task, "--train", files[task],
                                      "--valid", files[task], "--epochs", "1", "--output", str(tmp / task)])
                for task in ("marc_ja", "jsts", "jnli", "jcola", "jcommonsenseqa", "jsquad")]
        runs += [("intrinsic", ["intrinsic", *common, "--input", files["docs"], "--pairs", str(STS),
                                "--output", str(tmp / "intrinsic"), "--pppl-docs", str(min(args.examples, 16))]),
                 ("sts", ["sts", *common, "--input", str(STS), "--output", str(tmp / "sts")]),
                 ("retrieval", ["retrieval", *common, "--queries", files["queries"], "--corpus", files["corpus"],
                                "--qrels", files["qrels"], "--output", str(tmp / "retrieval")]),
                 ("export-sentence-transformers", ["export-sentence-transformers", *common,
                                                   "--output", str(tmp / "st")])]
        print(f"model {args.model} on {args.device}, {args.examples} examples per task (train = dev)")
        print(f"  {'command':<30} {'wall':>7} {'CPU':>7}   metrics")
        for name, command in runs:
            seconds, cpu, result = timed(command)
            print(f"  {name:<30} {seconds:6.1f}s {cpu:6.1f}s   {json.dumps(result['metrics'])[:80]}", flush=True)
        seconds, cpu, _ = timed(["leaderboard", str(tmp / "sts"), str(tmp / "jsts"), "--output", str(tmp / "board.md")])
        print(f"  {'leaderboard':<30} {seconds:6.1f}s {cpu:6.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
