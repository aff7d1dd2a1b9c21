"""Issue 19, item 16: the documented second Ctrl-C during a save exits at once with status 130, leaves
no half-written checkpoint folder, and `latest` still names the last complete checkpoint. A real
process gets both SIGINTs; its checkpoint writes stall (tests/integration/stalled_save.py) so the
second one lands inside the save."""

import signal
import subprocess
import sys
import time

from train_runs import ROOT, base_args, environment, last_step

import pytest


def wait_for(condition, process, what: str, timeout_s: float = 240):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{what} did not happen:\n{process.communicate()[1][-3000:]}")
        time.sleep(0.05)


def test_a_second_ctrl_c_during_a_save_exits_130_leaving_latest_complete(data, tmp_path):
    marker = tmp_path / "saving"
    args = base_args(data, tmp_path / "run", **{"checkpoint.interval": 0, "train.steps": 200})
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "integration" / "stalled_save.py"), str(marker),
                                *args], cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_for(lambda: last_step(tmp_path / "run") >= 2, process, "step 2")
        process.send_signal(signal.SIGINT)  # first: save after this step
        wait_for(marker.exists, process, "the save")
        process.send_signal(signal.SIGINT)  # second, during the save: out at once
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err[-3000:]
    assert "interrupted: exiting without saving" in err and "Traceback" not in err
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not (checkpoints / "latest").exists()  # no save had completed: nothing claims one
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith((".iter", "iter"))] == []
