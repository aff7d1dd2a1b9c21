"""Run metrics: RUN_DIR/metrics.jsonl (the contract), TensorBoard events, and a console line.

Only global rank 0 writes: train_step and eval_step reduce the loss and counts to every rank, so
rank 0 holds the run's figures whatever its pipeline stage; the others hold a disabled writer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

CONSOLE_KEYS = (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
                ("tokens_per_second", "{:,.0f} tok/s"), ("mfu", "MFU {:.1%}"), ("memory_gb", "mem {:.1f} GB"))


class MetricsWriter:
    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.file = None
        self.tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            self.tb = _summary_writer(run_dir / "tensorboard")

    def log(self, record: dict):
        """Append one JSON line (flushed, so a killed run keeps its history) and its scalars to TB."""
        if not self.enabled:
            return
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self):
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def _summary_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: metrics.jsonl is always written
        return None
    return SummaryWriter(str(folder))


def console_line(record: dict, total_steps: int) -> str:
    parts = [f"step {record['step']}/{total_steps}"]
    parts += [fmt.format(record[key]) for key, fmt in CONSOLE_KEYS if record.get(key) is not None]
    if "valid_loss" in record:
        parts.append(f"valid {record['valid_loss']:.4f} acc {record.get('valid_accuracy', 0):.3f}")
    return " | ".join(parts)
