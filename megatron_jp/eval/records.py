"""Reading evaluation inputs and writing evaluation outputs.

Inputs are refused with `EvalInputError`, whose message names the file, the line (or the JSON path
for SQuAD-style files) and what was expected, before any model is loaded. Outputs are written under a
temporary name and renamed, so an interrupted run never leaves a half-written predictions.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from megatron_jp.files import overlaps


class EvalInputError(ValueError):
    """An input file the evaluation cannot use; the message says where and what was expected."""


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(location "FILE:LINE", record) for every non-blank line; refuses a missing, empty or bad file."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: no such file")
    seen = False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalInputError(f"{where}: not valid JSON ({e.msg}); expected one JSON object per line") from None
            if not isinstance(record, dict):
                raise EvalInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
            seen = True
            yield where, record
    if not seen:
        raise EvalInputError(f"{path}: the file is empty; expected one JSON object per line")


def read_json(path: str | os.PathLike, expected: str, missing: str = "no such file"):
    """A whole JSON file; refuses a missing file or invalid JSON, naming the line."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected {expected}") from None


def field(record: dict, key: str, where: str, kind, expected: str = ""):
    """record[key], checked against `kind` (a type or tuple of types)."""
    if key not in record:
        raise EvalInputError(f"{where}: missing field {key!r}{f' ({expected})' if expected else ''}")
    value = record[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        value = None  # JSON true/false is not a number here
    if not isinstance(value, kind):
        raise EvalInputError(f"{where}: field {key!r} is {json.dumps(record[key], ensure_ascii=False)[:60]}; "
                             f"expected {expected or _kind_name(kind)}")
    return value


def text_field(record: dict, key: str, where: str) -> str:
    value = field(record, key, where, str, "a string")
    if not value.strip():
        raise EvalInputError(f"{where}: field {key!r} is empty; expected text")
    return value


def number_field(record: dict, key: str, where: str, low: float, high: float) -> float:
    value = field(record, key, where, (int, float), f"a number in [{low:g}, {high:g}]")
    if not (math.isfinite(value) and low <= value <= high):
        raise EvalInputError(f"{where}: field {key!r} is {value}; expected a number in [{low:g}, {high:g}]")
    return float(value)


def record_id(record: dict, where: str, keys: tuple[str, ...]) -> str:
    """The first of `keys` present (as a string), else the location itself."""
    for key in keys:
        if key in record and record[key] is not None:
            return str(record[key])
    return where


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({str: "a string", int: "an integer", float: "a number", list: "a list",
                        dict: "an object"}.get(k, k.__name__) for k in kinds)


def check_unique(ids: Iterable[tuple[str, str]], what: str) -> None:
    """ids: (id, location) pairs; refuses the second occurrence of an id."""
    first: dict[str, str] = {}
    for i, where in ids:
        if i in first:
            raise EvalInputError(f"{where}: {what} id {i!r} already appears at {first[i]}; ids must be unique")
        first[i] = where


# ----------------------------------------------------------------------------- outputs


def write_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_predictions(out_dir: str | os.PathLike, rows: list[dict]) -> Path:
    """OUT/predictions.jsonl: one JSON object per row (id, prediction, gold, ...)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return write_atomically(Path(out_dir) / "predictions.jsonl", text)


def write_result(out_dir: str | os.PathLike, result: dict) -> Path:
    """OUT/result.json: the JSON object the command prints last (read by `leaderboard`)."""
    return write_atomically(Path(out_dir) / "result.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")


def read_predictions(path: str | os.PathLike) -> list[dict]:
    return [record for _, record in read_jsonl(path)]


# ----------------------------------------------------------------------------- claiming an output

RESULTS = ("result.json", "predictions.jsonl", "sweep")  # what an evaluation writes in its --output


def refuse_overlap(inputs: Iterable, written: Iterable, replaced: Iterable = ()) -> None:
    """Refuse to write over what the command reads: an input that is one of the `written` files, or
    that lies in (or holds) a `replaced` folder; `inputs` may hold None for options not given."""
    given = [p for p in inputs if p]
    for out in written:
        for path in given:
            if os.path.realpath(out) == os.path.realpath(path):
                raise EvalInputError(f"{out} is also an input ({path}); write the output elsewhere")
    for folder in replaced:
        for path in given:
            if overlaps(path, folder):
                raise EvalInputError(f"--output {folder} would replace or sit inside the input {path}; "
                                     "choose another --output")


def claim_results_folder(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a --output folder that holds an earlier evaluation's results, unless --overwrite."""
    earlier = [name for name in RESULTS if (Path(out_dir) / name).exists()]
    if earlier and not overwrite:
        raise EvalInputError(f"--output {out_dir} holds earlier results ({', '.join(earlier)}): pass --overwrite "
                             "to replace them, or choose another folder")
