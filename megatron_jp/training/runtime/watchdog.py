"""No hung ranks: every rank exits, naming the step and the stuck rank, when the run stops progressing.

A collective waits for every peer: a frozen rank (SIGSTOP, a wedged GPU, a swapped-out node), a dead
one that the backend does not notice, or a node that never joins would keep every other rank waiting
for torch.distributed's timeout, with a message that names neither the step nor the culprit.

Each rank runs one daemon thread that
  - publishes a heartbeat into the rendezvous store (the TCPStore behind MASTER_ADDR:MASTER_PORT:
    torchrun's agent on the first node, or rank 0's process under srun) every `interval` seconds:
    a counter, the rank's step and what it is doing (`Watchdog.mark`, called by the training loop);
  - watches its own main thread: no `mark` for `startup_s` before `started()` (rendezvous, process
    groups) or for `timeout_s` afterwards means the rank is stuck waiting;
  - then reads every heartbeat twice, `window` seconds apart. A counter that did not move is a rank
    that stopped responding (frozen or dead; no clock is compared across hosts); a rank that never
    wrote one never joined; otherwise the ranks behind the others are named;
  - prints one line and ends the process (os._exit: the main thread is blocked inside a collective
    and cannot be interrupted). The launcher (srun --kill-on-bad-exit, torchrun) then ends the rest.

The thread's store client is separate from the process group's, and every call on it runs in a
helper thread that is given up on after a few intervals: a TCPStore client waits for a reply forever
when the store's host is frozen (checked with torch 2.13), so an unanswering store is itself a
finding (its host is the stuck one) rather than another hang.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

HUNG_EXIT_STATUS = 1  # as any stopped training (training.train.fail)
BACKSTOP_S = 60.0  # torch.distributed's own timeout is this much longer than ours: ours speaks first


@dataclass
class Beat:
    """One rank's heartbeat as stored: a counter that moves while the rank lives, its position, and its
    host (a lost host is named: the node to drain or replace)."""

    count: int
    step: int
    phase: str
    host: str = ""

    def encode(self) -> str:
        return f"{self.count} {self.step} {self.host or '-'} {self.phase}"

    @classmethod
    def decode(cls, text: str) -> "Beat":
        count, step, host, phase = text.split(" ", 3)
        return cls(int(count), int(step), phase, "" if host == "-" else host)


def diagnose(before: dict[int, Beat | None] | None, after: dict[int, Beat | None] | None, store: str,
             agent_store: bool = False, startup: bool = False, step: int | None = None) -> str:
    """Name the stuck ranks from two readings of every heartbeat taken a few intervals apart (None: the
    store did not answer). `agent_store`: torchrun's agent hosts the store, else rank 0's process.
    `step`: the step this rank is in; a store host that no longer answers has no heartbeat to read, but
    it finished the step before (every step ends in collectives over all ranks), so that one is named."""
    host = "the torchrun agent of the first node" if agent_store else "rank 0"
    if after is None or before is None:
        if startup:
            return (f"the rendezvous store at {store} cannot be reached: {host} has not started it (yet), or "
                    f"MASTER_ADDR does not lead to that node from here (check MASTER_ADDR and the interfaces)")
        reached = f"; every rank had completed step {step - 1}, this one is in step {step}" if step else ""
        return (f"{host} stopped responding (frozen or dead): it hosts the rendezvous store at {store}, "
                f"which does not answer{reached}")
    missing = [r for r, beat in after.items() if beat is None]
    if missing:
        return f"{_ranks(missing)} never joined (no heartbeat in the rendezvous store)"
    frozen = [r for r in after if before.get(r) is not None and after[r].count == before[r].count]
    if frozen:
        where = "; ".join(f"rank {r} at step {after[r].step} ({after[r].phase})"
                          f"{' on ' + after[r].host if after[r].host else ''}" for r in frozen[:8])
        return f"{_ranks(frozen)} stopped responding (frozen or dead): last seen {where}"
    lowest = min(beat.step for beat in after.values())
    behind = [r for r, beat in after.items() if beat.step == lowest]
    if len(behind) < len(after):
        phases = sorted({after[r].phase for r in behind})
        return f"{_ranks(behind)} alive but still at step {lowest} ({', '.join(phases)})"
    phases = sorted({beat.phase for beat in after.values()})
    return (f"every rank is alive at step {lowest} ({', '.join(phases)}): a collective inside it never "
            f"completed (a network or backend problem rather than one rank)")


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(str(r) for r in ranks[:16]) + (f" and {len(ranks) - 16} more" if len(ranks) > 16 else "")
    return f"rank {shown}" if len(ranks) == 1 else f"ranks {shown}"


class Watchdog:
    """Start with `start()` before the process group exists; `started()` once it does; `mark(step,
    phase)` whenever the main thread makes progress; `stop()` before the process group is destroyed.

    A world of one needs no watchdog: `NullWatchdog` has the same methods and does nothing.
    """

    def __init__(self, rank: int, world: int, timeout_s: float, startup_s: float, host: str, port: int,
                 prefix: str = "megatron_jp/watchdog", out=None, exit=os._exit):
        self.rank, self.world = rank, world
        self.timeout_s, self.startup_s = timeout_s, startup_s
        self.host, self.port, self.prefix = host, port, prefix
        self.hostname = socket.gethostname()
        # a heartbeat every 1/20 of the limit: a stuck rank is named within a few percent of it
        self.interval = min(max(min(timeout_s, startup_s) / 20, 0.2), 10.0)
        self.window = 3 * self.interval  # > 2 intervals: a live rank's counter always moves in it
        self.out, self._exit = out, exit
        self.step, self.phase = 0, "start-up"
        self._last = time.monotonic()
        self._in_startup = True
        self._count = 0
        self.agent_store = False
        self._store = TimedStore(self._connect, timeout_s=max(self.window, 2.0))
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="megatron_jp-watchdog", daemon=True)

    @classmethod
    def from_config(cls, parallel, rank: int, world: int, environ=None) -> "Watchdog | NullWatchdog":
        env = os.environ if environ is None else environ
        if world == 1 or "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            return NullWatchdog()
        # torchrun restarts reuse the agent's store: keep generations apart
        prefix = f"megatron_jp/watchdog/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        dog = cls(rank, world, parallel.timeout_minutes * 60, parallel.startup_timeout_minutes * 60,
                  env["MASTER_ADDR"], int(env["MASTER_PORT"]), prefix)
        dog.agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        return dog

    @property
    def backstop_s(self) -> float:
        """The process group's timeout: longer than ours, so the named diagnosis comes first."""
        return max(self.timeout_s, self.startup_s) + BACKSTOP_S

    # --------------------------------------------------------------------- main thread

    def start(self) -> "Watchdog":
        self._last = time.monotonic()
        self._thread.start()
        return self

    def started(self):
        """The start-up phase is over: from now on `timeout_s` applies. Beats at once (the store is up
        now): a rank frozen in its first steps, before the thread's next beat, is then named as frozen,
        not as a rank that never joined."""
        self._in_startup = False
        self.mark(self.step, "start-up done")
        self._beat()

    def mark(self, step: int, phase: str):
        """The main thread made progress: it is at `step`, doing `phase` (a few words)."""
        self.step, self.phase = step, phase
        self._last = time.monotonic()

    def where(self) -> str:
        return "start-up" if self._in_startup else f"step {self.step} ({self.phase})"

    def collective_failed(self, error: BaseException):
        """After `error` (gloo raises a plain RuntimeError when a peer's connection closes): if a rank
        stopped responding, name it on stderr and end the process like a hang (the process group is
        broken: its destructors may block or abort). Returns when every rank is alive: the error is
        this rank's own, for the caller to re-raise. Takes `window` seconds."""
        first = self._read_all()
        time.sleep(self.window)
        second = self._read_all()
        if first is not None and second is not None and not any(
                b is None or b.count == a.count for a, b in zip(first.values(), second.values())):
            return
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        self._say(f"error: rank {self.rank}: {self.where()}: a collective failed ({cause}): "
                  f"{self._diagnose(first, second)}")
        self._linger()
        self._exit(HUNG_EXIT_STATUS)

    def _diagnose(self, first, second) -> str:
        return diagnose(first, second, f"{self.host}:{self.port}", self.agent_store, self._in_startup,
                        None if self._in_startup else self.step)

    def stop(self):
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5 * self.interval + 5)

    # --------------------------------------------------------------------- the thread

    @property
    def limit_s(self) -> float:
        return self.startup_s if self._in_startup else self.timeout_s

    def idle_s(self) -> float:
        return time.monotonic() - self._last

    def _run(self):
        first: dict | None = None  # the first reading of every heartbeat, once this rank looks stuck
        first_at = None
        while not self._stopped.wait(self.interval):
            self._beat()
            if self.idle_s() < self.limit_s - self.window:
                first_at = None  # progress: forget a half-done diagnosis
                continue
            if first_at is None:
                first_at = time.monotonic()  # before reading: an unanswering store takes its timeout
                first = self._read_all()
                continue
            if time.monotonic() - first_at >= self.window and self.idle_s() >= self.limit_s:
                self._fail(self._diagnose(first, self._read_all()))
                return

    def _connect(self):
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=max(self.window, 2.0))  # how long to retry connecting
        # no world_size, no waiting for workers: this client must not count as a rank joining
        store = dist.TCPStore(self.host, self.port, is_master=False, timeout=timeout, wait_for_workers=False)
        return dist.PrefixStore(self.prefix, store)

    def _beat(self):
        """Publish this rank's heartbeat (an unreachable store is left to the diagnosis). Called by the
        thread, and once by the main thread in `started` (a race between the two repeats a count at
        worst; the counter still moves)."""
        self._count += 1
        beat = Beat(self._count, self.step, self.phase, self.hostname).encode()
        try:
            self._store.call(lambda store: store.set(f"beat/{self.rank}", beat))
        except Exception:  # not up yet, or its host stuck: _read_all finds out
            pass

    def _read_all(self) -> dict[int, Beat | None] | None:
        """Every rank's heartbeat (None where a rank never wrote one); None if the store does not answer."""
        keys = [f"beat/{r}" for r in range(self.world)]

        def read(store):
            if store.check(keys):  # the usual case: one round trip for all
                return {r: Beat.decode(v.decode()) for r, v in enumerate(store.multi_get(keys))}
            return {r: Beat.decode(store.get(k).decode()) if store.check([k]) else None for r, k in enumerate(keys)}

        try:
            return self._store.call(read)
        except Exception:
            return None

    def _fail(self, finding: str):
        what, limit = self.where(), self.limit_s
        key = "parallel.startup_timeout_minutes" if self._in_startup else "parallel.timeout_minutes"
        message = (f"error: rank {self.rank}: no progress for {self.idle_s():.0f} s in {what}, over the "
                   f"{limit / 60:g} min of {key}: {finding}. Exiting so that no rank waits forever")
        self._say(message)
        self._linger()
        self._exit(HUNG_EXIT_STATUS)

    def _say(self, message: str):
        sys.stdout.flush()
        print(message, file=self.out or sys.stderr, flush=True)

    def _linger(self):
        """Rank 0 under srun serves the store: it stays a little, so that the ranks still diagnosing
        read the heartbeats instead of finding the store gone and blaming rank 0."""
        if self.rank == 0 and not self.agent_store:
            time.sleep(2 * self.window + self._store.timeout_s)


class TimedStore:
    """Calls on a lazily connected store, each in a daemon thread of its own, given up on after
    `timeout_s` (TimeoutError). One call at a time: while a given-up call still hangs, every later call
    fails at once (the client is not thread-safe, and its store is evidently not answering)."""

    def __init__(self, connect, timeout_s: float):
        self._connect, self.timeout_s = connect, timeout_s
        self._store = None
        self._pending: Future | None = None
        self._lock = threading.Lock()  # the watchdog thread and the main thread (diagnose_now) share it

    def call(self, fn):
        with self._lock:
            if self._pending is not None and not self._pending.done():
                raise TimeoutError("the previous store call has not returned")
            future: Future = Future()
            self._pending = future
            threading.Thread(target=self._work, args=(fn, future), daemon=True).start()
            return future.result(timeout=self.timeout_s)

    def _work(self, fn, future: Future):
        try:
            if self._store is None:
                self._store = self._connect()
            future.set_result(fn(self._store))
        except BaseException as e:  # handed to the caller
            if not isinstance(e, TimeoutError):
                self._store = None  # a refused or broken connection: connect afresh next time
            future.set_exception(e)


class NullWatchdog:
    """The watchdog of a single process: nothing to wait for, nothing to watch."""

    backstop_s = 600.0

    def start(self):
        return self

    def started(self):
        pass

    def mark(self, step: int, phase: str):
        pass

    def where(self) -> str:
        return "a single process"

    def collective_failed(self, error: BaseException):
        pass  # a single process has no peer to blame

    def stop(self):
        pass
