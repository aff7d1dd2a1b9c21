"""Issue 19, item 1: a lock whose owner is alive on this host is never taken over, whatever its
heartbeat; only a dead pid (this host) or a silent heartbeat (another host) makes a lock stale.
The owner is a real process, stopped with SIGSTOP as Ctrl-Z, a SLURM suspend or a debugger would."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from megatron_jp.training.runtime.run_lock import DirLock, LockedError

HOLD = ("import sys, time; from megatron_jp.training.runtime.run_lock import DirLock; "
        "DirLock(sys.argv[1], 'a training run', heartbeat_s=0.05).acquire(); print('held', flush=True); time.sleep(60)")


def age(lock_file, seconds: float):
    then = time.time() - seconds
    os.utime(lock_file, (then, then))


@pytest.fixture
def stopped_owner(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        os.kill(owner.pid, signal.SIGSTOP)
        yield owner
    finally:
        os.kill(owner.pid, signal.SIGCONT)
        owner.kill()
        owner.wait(timeout=30)


def test_a_suspended_owner_on_this_host_keeps_its_lock_however_old_its_heartbeat(tmp_path, stopped_owner):
    time.sleep(0.2)  # the heartbeat thread is stopped with its process
    age(tmp_path / ".lock", 3600)
    with pytest.raises(LockedError, match=rf"pid {stopped_owner.pid}.*alive on this host.*kill -CONT {stopped_owner.pid}"):
        DirLock(tmp_path, "a second run", stale_s=1).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == stopped_owner.pid  # untouched


def test_a_lock_whose_pid_now_names_another_process_is_stale(tmp_path):
    # a crashed owner's pid reused by a later process: same host, live pid, another start time
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                "what": "a run", "proc_start": "1"}))
    lock = DirLock(tmp_path, "me").acquire()
    assert "took over the stale lock" in lock.note
    lock.release()


def test_a_fresh_lock_of_another_host_is_kept_and_a_silent_one_taken_over(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": os.getpid(), "what": "a run"}))
    with pytest.raises(LockedError, match=r"host elsewhere.*delete .*\.lock"):
        DirLock(tmp_path, "me", stale_s=60).acquire()
    age(tmp_path / ".lock", 120)
    lock = DirLock(tmp_path, "me", stale_s=60).acquire()
    assert lock.owned()
    lock.release()
