"""Run `python -m megatron_jp.train` as a user would (one process or torchrun) and read what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CORPUS = ROOT / "examples" / "data" / "ja_sample.jsonl"


def make_shards(folder: Path) -> str:
    """Byte-tokenized shards of the bundled corpus with word flags; returns the data prefix."""
    prefix = folder / "ja"
    subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(EXAMPLE_CORPUS),
                    "--tokenizer-type", "ByteTokenizer", "--word-boundaries", "unidic-lite",
                    "--output-prefix", str(prefix), "--quiet"], check=True, capture_output=True, timeout=120)
    return f"{prefix}_text_document"


def base_args(data: str, run_dir: Path, **overrides) -> list[str]:
    """A tiny Llama-style run on the shards, logging every step; overrides {"section.key": value}."""
    args = {"model.preset": "tiny", "data.paths": data, "data.tokenizer_type": "ByteTokenizer",
            "data.seq_length": 64, "data.whole_word_masking": "true", "data.num_workers": 0,
            "train.steps": 20, "train.global_batch_size": 8, "train.micro_batch_size": 2,
            "optim.warmup_steps": 3, "optim.lr": 2e-3, "log.interval": 1, "checkpoint.interval": 5,
            "checkpoint.keep": 0, "run.dir": str(run_dir)}
    args.update(overrides)
    return [item for key, value in args.items() for item in (f"--{key}", str(value))]


def command(args: list[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "megatron_jp.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megatron_jp.train", *args]


def environment() -> dict:
    # one thread per process: several processes on two cores would otherwise spin against each other
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train(args: list[str], nproc: int = 1, timeout_s: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command(args, nproc), cwd=ROOT, env=environment(), capture_output=True, text=True,
                            timeout=timeout_s)
    return result


def train_ok(args: list[str], nproc: int = 1, timeout_s: float = 300) -> subprocess.CompletedProcess:
    result = train(args, nproc, timeout_s)
    assert result.returncode == 0, f"training failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def train_until_killed(args: list[str], run_dir: Path, kill_after_step: int, nproc: int = 1,
                       timeout_s: float = 300):
    """Start a run and SIGKILL its whole process group once metrics.jsonl shows `kill_after_step`."""
    process = subprocess.Popen(command(args, nproc), cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"the run ended before it could be killed:\n{process.stderr.read().decode()[-3000:]}")
            if last_step(run_dir) >= kill_after_step:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
                return
            time.sleep(0.05)
        pytest.fail(f"step {kill_after_step} not reached within {timeout_s} s")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_step(run_dir: Path) -> int:
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    return max(steps, default=0)


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step; a resumed run's later lines replace the killed run's."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def train_until_signalled(args: list[str], run_dir: Path, after_step: int, sig=signal.SIGTERM,
                          timeout_s: float = 300) -> subprocess.Popen:
    """Start a single-process run, send `sig` once metrics.jsonl shows `after_step`, wait for its exit."""
    process = subprocess.Popen(command(args, 1), cwd=ROOT, env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    while last_step(run_dir) < after_step:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"step {after_step} not reached:\n{process.stderr.read()[-3000:]}")
        time.sleep(0.05)
    process.send_signal(sig)
    process.wait(timeout=120)
    return process
