"""One owner per folder: a run holds `RUN_DIR/.lock` and `CKPT_DIR/.lock` for its whole life, so a
second run (or a tool writing checkpoints) on the same folders is refused before it writes anything.

The lock is a file created with O_EXCL holding the owner's host, pid and start time; a thread
refreshes its mtime every HEARTBEAT_S seconds. A lock is stale, and taken over with a note, when
its owner is on this host and its pid is gone (or now names another process: the kernel's start
time of the pid differs), or when its owner is on another host and its heartbeat stopped for
STALE_S seconds (a crashed node: no pid can be checked from here). An owner alive on this host is
never judged by its heartbeat: a process stopped by Ctrl-Z, a SLURM suspend, a debugger or a frozen
NFS mount beats no more, yet it still owns its folders. O_EXCL and rename are atomic on local file
systems and on NFS v3+/Lustre/GPFS, where flock() is often unavailable or node-local.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_jp.files import remove_quietly

LOCK = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class LockedError(RuntimeError):
    """The folder belongs to a live run; the message names its host and pid."""


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot, /proc/PID/stat field 22), which
    tells a live owner from a later process that got its pid; None where /proc cannot say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]  # fields after "(comm)" start at field 3
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Holder:
    host: str
    pid: int
    started: str
    what: str
    proc_start: str | None = None

    @classmethod
    def read(cls, path: Path) -> "Holder | None":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(str(raw["host"]), int(raw["pid"]), str(raw.get("started", "?")), str(raw.get("what", "?")),
                       raw.get("proc_start"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return cls("?", -1, "?", "?")  # half written, or not ours: judged by its heartbeat alone

    def alive(self, path: Path, stale_s: float) -> bool:
        if self.host == socket.gethostname() and self.pid > 0:
            return self._pid_alive()  # a suspended owner beats no more but is alive: never judged by age
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False
        return age <= stale_s

    def _pid_alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's live process
        now = process_start(self.pid)
        return self.proc_start is None or now is None or now == self.proc_start


class DirLock:
    """An exclusive lock on a folder, held until release(); see the module doc."""

    def __init__(self, folder: str | os.PathLike, what: str, stale_s: float = STALE_S,
                 heartbeat_s: float = HEARTBEAT_S):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self.note: str | None = None  # set when a stale lock was taken over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"

    def acquire(self) -> "DirLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a racing process may take a stale lock between our look and our try
            if self._try_create():
                self._start_heartbeat()
                return self
            holder = Holder.read(self.path)
            if holder is None:
                continue  # released meanwhile
            if holder.alive(self.path, self.stale_s):
                raise LockedError(
                    f"{self.folder} is in use by {holder.what} on host {holder.host}, pid {holder.pid} (started "
                    f"{holder.started}): wait for it to finish, or use another folder{self._gone_hint(holder)}")
            self._take_over_stale(holder)
        raise LockedError(f"{self.path}: could not take the lock (other processes keep racing for it)")

    def _gone_hint(self, holder: Holder) -> str:
        if holder.host == socket.gethostname() and holder.pid > 0:
            return (f". That process is alive on this host (perhaps stopped: Ctrl-Z, a suspended job, a "
                    f"debugger); resume it with `kill -CONT {holder.pid}` or end it, and its lock goes with it")
        return (f". If that process is gone (e.g. its node crashed), the lock is taken over {self.stale_s:.0f} s "
                f"after its last heartbeat; if you know it is gone sooner, delete {self.path}")

    def _try_create(self) -> bool:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "what": self.what, "token": self._token,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "proc_start": process_start(os.getpid())}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        except OSError:
            os.close(fd)
            remove_quietly(self.path)
            raise
        os.close(fd)
        return True

    def _take_over_stale(self, holder: Holder):
        # move it aside under a unique name first: of two processes judging it stale, one wins the rename
        aside = self.folder / f".lock.stale.{os.getpid()}.{time.time_ns()}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        remove_quietly(aside)
        self.note = (f"note: took over the stale lock of {holder.what} (host {holder.host}, pid {holder.pid}, "
                     f"started {holder.started}) on {self.folder}: that process is gone")

    def _start_heartbeat(self):
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:
                    pass  # a full or read-only disk: the run itself will report it

        self._thread = threading.Thread(target=beat, name=f"lock-heartbeat {self.folder}", daemon=True)
        self._thread.start()

    def owned(self) -> bool:
        try:
            return json.loads(self.path.read_text(encoding="utf-8")).get("token") == self._token
        except (OSError, ValueError):
            return False

    def release(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.owned():
            remove_quietly(self.path)

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_all(folders: list[tuple[str | os.PathLike, str]]) -> list[DirLock]:
    """Lock each (folder, description) in order (the same folder once); all or none are held."""
    held: list[DirLock] = []
    seen = set()
    try:
        for folder, what in folders:
            key = os.path.realpath(folder)
            if key in seen:
                continue
            seen.add(key)
            held.append(DirLock(folder, what).acquire())
    except BaseException:
        for lock in reversed(held):
            lock.release()
        raise
    return held



def hold_run_dirs(run_dir: str | os.PathLike, ckpt_dir: str | os.PathLike, dims) -> list[DirLock]:
    """Rank 0 locks run.dir and the checkpoint directory for the run's life; every rank raises the
    same LockedError if it could not (collective over the world: nobody waits on a rank that left)."""
    locks, message = [], None
    if dims.rank == 0:
        try:
            locks = lock_all([(run_dir, "a training run"), (ckpt_dir, "a training run")])
        except (LockedError, OSError) as e:
            message = str(e)
    if dims.distributed:
        box = [message]
        dist.broadcast_object_list(box, src=0, group=dims.world_group, device=dims.device)
        message = box[0]
    if message:
        raise LockedError(message)
    return locks
