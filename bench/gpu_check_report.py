#!/usr/bin/env python
"""The report of bench/gpu_check.sh: one table (stage, status, seconds, headline figure) and, in
OUT_DIR, gpu_check.json (every stage's status, figures and log tail) plus gpu_check_logs.tar.gz (the
full logs): two files, inside the device's return limits (8 files, 16 MiB each, 2 folders deep).

    python bench/gpu_check_report.py WORK_DIR OUT_DIR

WORK_DIR holds stages.jsonl (one {"stage", "rc", "seconds", "limit"} line per stage), NAME.log and,
where the stage wrote one, NAME.json. Exit status 1 when any stage failed, timed out or did not run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
from pathlib import Path

TIMEOUT_CODES = (124, 137)  # timeout(1): the limit passed; 137: killed after the grace period
TAIL_LINES = 15


def status_of(record: dict) -> str:
    rc = record.get("rc")
    if rc is None:
        return "not run"
    if rc == 0:
        return "ok"
    return "timeout" if rc in TIMEOUT_CODES else f"failed (rc {rc})"


def _num(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "?"


def headline_train(fig: dict) -> str:
    return (f"{_num(fig.get('tokens_per_second'), ',.0f')} tok/s, MFU {_num(fig.get('mfu'), '.1%')}, "
            f"peak {_num(fig.get('peak_memory_gb'), '.2f')} GB (plan {_num(fig.get('plan_memory_gb'), '.2f')})")


def headline_kernels(fig: dict) -> str:
    verdicts = fig.get("verdicts", {})
    if not verdicts:
        return f"{len(fig.get('results', []))} op timings, no kernel rows (CPU or --no-compile)"
    return ", ".join(f"{op} {_num(v.get('speedup_vs_compiled'), '.2f')}x" for op, v in verdicts.items()) + " vs compiled"


def headline_model_step(fig: dict) -> str:
    return ", ".join(f"{row['arch']} {_num(row.get('ratio'), '.2f')}x" for row in fig.get("rows", [])) + " vs transformers"


def headline_attention(fig: list) -> str:
    if not fig:
        return ""
    last = fig[-1]
    return f"{last['case']}: " + ", ".join(f"{k} {v if isinstance(v, str) else _num(v, '.2f') + ' ms'}"
                                          for k, v in last["ms"].items())


HEADLINES = {"kernels": headline_kernels, "model_step": headline_model_step, "attention": headline_attention}


def headline(name: str, figures, log_tail: list[str]) -> str:
    """The one figure a reader wants from the stage: from its JSON where it wrote one, else its log."""
    if figures is not None:
        try:
            return (headline_train if name.startswith("train_") else HEADLINES.get(name, str))(figures)[:90]
        except (KeyError, TypeError, AttributeError) as e:
            return f"(figures unreadable: {type(e).__name__})"
    return next((line.strip()[:90] for line in reversed(log_tail) if line.strip()), "")


def load_figures(work: Path, name: str):
    path = work / f"{name}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return {"unreadable": f"{path.name}: {e}"}


def gather(work: Path) -> list[dict]:
    stages = []
    for line in (work / "stages.jsonl").read_text().splitlines():
        record = json.loads(line)
        name = record["stage"]
        log = work / f"{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-TAIL_LINES:] if log.exists() else []
        figures = load_figures(work, name)
        record.update(status=status_of(record), figures=figures, log_tail=tail,
                      headline=record.get("note") or headline(name, figures, tail))
        stages.append(record)
    return stages


def table(stages: list[dict]) -> str:
    lines = [f"{'stage':<22}{'status':<16}{'seconds':>8}  headline", "-" * 100]
    for s in stages:
        lines.append(f"{s['stage']:<22}{s['status']:<16}{s['seconds']:>8}  {s['headline']}")
    return "\n".join(lines)


def write_outputs(work: Path, out: Path, stages: list[dict]) -> None:
    """gpu_check.json and one archive of the logs, each written whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    ok = all(s["status"] == "ok" for s in stages)
    summary = {"ok": ok, "stages": stages}
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(out / "gpu_check.json")
    tmp = out / "gpu_check_logs.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(work.glob("*.log")) + sorted(work.glob("*.json")):
            tar.add(path, arcname=path.name)
    tmp.replace(out / "gpu_check_logs.tar.gz")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path, help="the check's working folder (stages.jsonl, logs, figures)")
    p.add_argument("out", type=Path, help="where gpu_check.json and gpu_check_logs.tar.gz go")
    args = p.parse_args(argv)
    if not (args.work / "stages.jsonl").exists():
        print(f"error: {args.work / 'stages.jsonl'} not found: run bench/gpu_check.sh, which writes it",
              file=sys.stderr)
        return 2
    stages = gather(args.work)
    write_outputs(args.work, args.out, stages)
    print(table(stages))
    bad = [s["stage"] for s in stages if s["status"] != "ok"]
    print(f"gpu_check: {len(stages) - len(bad)}/{len(stages)} stages ok" + (f"; not ok: {', '.join(bad)}" if bad else ""))
    if not stages:
        print("gpu_check: no stage ran (check --only)")
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
