"""A table across models and tasks from result.json files, and metric-vs-step plots for the
checkpoints of one run.

    leaderboard(["out/a", "out/b/result.json", ...], "board.md")
      -> board.md (markdown), board.json (the same table), board_<task>_<metric>.png for every metric of
         every run with two or more evaluated checkpoints (one line per run).

A row is a model (the path given to the evaluation); a column is task/metric. Only scores are
columns: counts (documents, pairs, the corpus size...) are integers and are left out. Two results for
the same model and task are refused, naming both files (which one is meant cannot be guessed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from megatron_jp.eval.records import EvalInputError, read_json, refuse_overlap, write_atomically

SKIPPED = {"documents", "masked_words", "masked_tokens", "pppl_tokens", "pppl_documents", "sentences",
           "positive_pairs", "queries", "fill_mask_probes", "pairs", "corpus"}  # counts, not scores


def result_file(path: str) -> Path:
    p = Path(path)
    return p / "result.json" if p.is_dir() else p


def board_files(output: str) -> list[Path]:
    out = Path(output)
    return [out, out.with_suffix(".json"), *sorted(out.parent.glob(f"{out.stem}_*.png"))]


def claim_board(inputs: list[str], output: str, overwrite: bool) -> None:
    """Refuse a board written over one of its inputs, and an earlier board unless `overwrite`."""
    out = Path(output)
    refuse_overlap([*inputs, *map(result_file, inputs)], [out, out.with_suffix(".json")])
    earlier = [str(p) for p in board_files(output) if p.exists()]
    if earlier and not overwrite:
        raise EvalInputError(f"{', '.join(earlier)} exist from an earlier leaderboard: pass --overwrite to replace "
                             "them, or choose another --output")


def read_result(path: str) -> dict:
    p = result_file(path)
    result = read_json(p, "an evaluation result", "no result.json (pass an evaluation's --output folder or its "
                                                  "result.json)")
    if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict) or "task" not in result:
        raise EvalInputError(f"{p}: expected an evaluation result, a JSON object with 'task' and 'metrics'")
    result["_file"] = str(p)
    return result


def scores(result: dict) -> dict[str, float]:
    return {f"{result['task']}/{k}": float(v) for k, v in result["metrics"].items()
            if isinstance(v, float) and k not in SKIPPED}


def refuse_duplicates(results: list[dict]) -> None:
    first: dict[tuple[str, str], str] = {}
    for r in results:
        key = (model_name(r), str(r["task"]))
        if key in first:
            raise EvalInputError(f"{first[key]} and {r['_file']} both hold {key[1]} results of {key[0]}: pass only "
                                 "the one the board should show")
        first[key] = r["_file"]


def table(results: list[dict]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(columns, {model: {column: value}})."""
    refuse_duplicates(results)
    rows: dict[str, dict[str, float]] = {}
    columns: list[str] = []
    for r in results:
        for column, value in scores(r).items():
            rows.setdefault(model_name(r), {})[column] = value
            if column not in columns:
                columns.append(column)
    return columns, rows


def model_name(result: dict) -> str:
    info = result.get("model_info") or {}
    if info.get("kind") == "checkpoint":
        return f"{info.get('run', result.get('model'))}@{info.get('step')}"
    return str(result.get("model"))


def markdown(columns: list[str], rows: dict[str, dict[str, float]]) -> str:
    lines = ["| model | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for model, values in rows.items():
        cells = [f"{values[c]:.4g}" if c in values else "" for c in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curves(results: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{column: {run: [(step, value), ...]}} for runs with two or more evaluated checkpoints."""
    by_run: dict[str, dict[str, dict[int, float]]] = {}
    for r in results:
        info = r.get("model_info") or {}
        if info.get("kind") != "checkpoint":
            continue
        for column, value in scores(r).items():
            by_run.setdefault(column, {}).setdefault(info["run"], {})[int(info["step"])] = value
    return {column: {run: sorted(points.items()) for run, points in runs.items() if len(points) > 1}
            for column, runs in by_run.items()
            if any(len(points) > 1 for points in runs.values())}


def plot(column: str, runs: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for run, points in runs.items():
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=Path(run).parent.name or run)
    ax.set_xlabel("training step")
    ax.set_ylabel(column)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def leaderboard(inputs: list[str], output: str) -> dict:
    if not inputs:
        raise EvalInputError("leaderboard: give at least one result (an evaluation's --output folder)")
    results = [read_result(p) for p in inputs]
    columns, rows = table(results)
    out = Path(output)
    write_atomically(out, markdown(columns, rows))
    board = out.with_suffix(".json")
    write_atomically(board, json.dumps({"columns": columns, "rows": rows}, indent=2, ensure_ascii=False) + "\n")
    pngs = [str(plot(column, runs, out.with_name(f"{out.stem}_{_slug(column)}.png")))
            for column, runs in curves(results).items()]
    return {"task": "leaderboard", "metrics": {"models": len(rows), "columns": len(columns)},
            "markdown": str(out), "json": str(board), "png": pngs}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
