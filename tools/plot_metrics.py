#!/usr/bin/env python
"""Plot the loss and throughput of a run: RUN_DIR/metrics.jsonl -> PNG (needs matplotlib).

    python tools/plot_metrics.py RUN_DIR [--output RUN_DIR/metrics.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # a run killed mid-write leaves a partial last line; anything else is a real error
            if number == len(lines):
                break
            raise SystemExit(f"{path}:{number}: not a JSON object") from None
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
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    path = args.run_dir / "metrics.jsonl"
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    records = read_metrics(path)
    output = args.output or args.run_dir / "metrics.png"
    plot(records, output)
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
