#!/usr/bin/env python
"""Plot the loss and throughput of a run: RUN_DIR/metrics.jsonl -> PNG (needs matplotlib).

    python tools/plot_metrics.py RUN_DIR [--output RUN_DIR/metrics.png]

Bad input (no metrics.jsonl, a damaged line, nothing to plot) exits with status 2 and one line; the
PNG is written under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jp.files import describe_os_error, output_file  # noqa: E402


class InputError(ValueError):
    """Bad input; the message names it."""


def read_metrics(path: Path) -> list[dict]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot be read as text ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # a run killed mid-write leaves a partial last line; anything else is a real error
            if number == len(lines):
                break
            raise InputError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            raise InputError(f"{path}:{number}: not a metrics record (a JSON object with a numeric 'step')")
        records.append(record)
    if not any(r.get("loss") is not None for r in records):
        raise InputError(f"{path}: no line with a 'loss': nothing to plot")
    return records


def series(records, key):
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot(records: list[dict], output: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(*series(records, "loss"), label="train loss", linewidth=1)
    steps, valid = series(records, "valid_loss")
    if steps:
        ax_loss.plot(steps, valid, "o-", label="validation loss")
    ax_loss.set(xlabel="step", ylabel="MLM loss", title="loss")
    ax_loss.legend()
    ax_speed.plot(*series(records, "tokens_per_second"), color="tab:green", linewidth=1)
    ax_speed.set(xlabel="step", ylabel="tokens / s", title="throughput")
    fig.tight_layout()
    with output_file(output) as tmp:
        fig.savefig(tmp, dpi=110, format=output.suffix.lstrip(".") or "png")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--output", type=Path, default=None,
                   help="image to write (default RUN_DIR/metrics.png, replaced on every run); an existing file "
                        "given here is replaced only with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = p.parse_args(argv)
    path = args.run_dir / "metrics.jsonl"
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    output = args.output or args.run_dir / "metrics.png"
    if output.exists() and os.path.samefile(output, path):
        print(f"error: --output {output} is the metrics file it reads; write the image elsewhere", file=sys.stderr)
        return 2
    if args.output is not None and output.exists() and not args.overwrite:
        print(f"error: {output} exists: pass --overwrite to replace it, or choose another --output", file=sys.stderr)
        return 2
    try:
        records = read_metrics(path)
        plot(records, output)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # an unwritable output, an unknown image format
        print(f"error: writing {output} failed: {describe_os_error(e) or e}", file=sys.stderr)
        return 2
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
