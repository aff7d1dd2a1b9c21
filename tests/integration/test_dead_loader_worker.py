"""Issue 19, item 2 (the data loading that has workers): a data-loader worker that dies (the OOM killer,
a segfault) stops the run within seconds with one `error:` line naming the cause, never a hang or a
traceback. merge_datasets and evaluation's data loading use no worker processes (checked in the code:
merge reads in its own process, ValidLoader and tools/evaluate.py load in the main process)."""

import os
import signal
import subprocess
import time
from pathlib import Path

from train_runs import ROOT, base_args, command, environment, last_step


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_a_killed_loader_worker_stops_the_run_within_seconds_naming_the_cause(data, tmp_path):
    args = base_args(data, tmp_path, **{"data.num_workers": 1, "train.steps": 100000, "optim.warmup_steps": 1,
                                        "checkpoint.interval": 0, "log.interval": 1})
    process = subprocess.Popen(command(args, 1), cwd=ROOT, env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while last_step(tmp_path) < 2:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.05)
        workers = children(process.pid)
        assert workers, "no data-loader worker process found"
        os.kill(workers[0], signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = process.communicate(timeout=60)
        assert time.monotonic() - killed_at < 30
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "data loader worker" in lines[0] and "Traceback" not in err, err[-3000:]
