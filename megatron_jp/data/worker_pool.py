"""Worker processes for preprocess_data that cannot hang: each has its own pipe and is watched.

multiprocessing.Pool replaces a worker that dies (the out-of-memory killer, a segfault in a native
tokenizer) and never finishes its task, so the caller waits forever. Here the main process waits on
every worker's pipe and on its process sentinel together: a worker that exits without answering is
seen at once, and the run stops naming the cause (the signal) and the part it was reading.

Protocol: the main process sends a task (a Part and its key), the worker answers with any number of
("progress", documents, bytes) and then ("done", index, record), ("failed", index, message) for a bad
input, or ("crashed", index, traceback) for an exception; None tells it to exit.
"""

from __future__ import annotations

import collections
import multiprocessing
import signal
import traceback
from multiprocessing.connection import wait

from megatron_jp.data import tokenize_worker

JOIN_SECONDS = 5.0  # how long a worker has to exit when told to, before it is terminated, then killed
_CAUSES = {
    signal.SIGKILL: "killed by SIGKILL, most often the out-of-memory killer (see `dmesg`): lower --workers, "
                    "or --max-document-bytes if a document is huge",
    signal.SIGSEGV: "segmentation fault (SIGSEGV) in native code: the tokenizer or MeCab",
    signal.SIGBUS: "bus error (SIGBUS): a file it read or wrote shrank, or the disk failed",
    signal.SIGABRT: "aborted (SIGABRT) by native code",
}


class WorkerDied(RuntimeError):
    """A worker exited (a signal or an exit status) while it held a part."""


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "closed its pipe while still running"
    if exitcode < 0:
        sig = signal.Signals(-exitcode)
        return _CAUSES.get(sig, f"killed by {sig.name}")
    return f"exited with status {exitcode}"


def _worker_main(conn, opts: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops us
    try:
        tokenize_worker.init_worker(opts)
    except Exception:
        conn.send(("crashed", None, traceback.format_exc()))
        return
    while (task := conn.recv()) is not None:
        part, key = task
        try:
            record = tokenize_worker.run_part(part, key, lambda docs, nbytes: conn.send(("progress", docs, nbytes)))
            conn.send(("done", part.index, record))
        except tokenize_worker.PartFailed as err:
            conn.send(("failed", part.index, str(err)))
        except Exception:
            conn.send(("crashed", part.index, traceback.format_exc()))


class _Slot:
    def __init__(self, process, conn):
        self.process, self.conn, self.part = process, conn, None


class WorkerPool:
    """`workers` spawned processes (no inherited tokenizer threads or open files), each loading the
    tokenizer once. Use as a context manager: leaving it stops every worker."""

    def __init__(self, workers: int, opts: dict):
        ctx = multiprocessing.get_context("spawn")
        self.slots = []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=_worker_main, args=(child, opts), daemon=True, name="preprocess-worker")
            process.start()
            child.close()
            self.slots.append(_Slot(process, parent))

    @property
    def pids(self) -> list[int]:
        return [s.process.pid for s in self.slots]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run(self, tasks):
        """Run (part, key) tasks; yield the messages ("progress", ...) and ("done", index, record) as they
        come. Raises WorkerDied, or PartFailed / RuntimeError for what a worker reported."""
        queue = collections.deque(tasks)
        for slot in self.slots:
            self._give(slot, queue)
        while busy := [s for s in self.slots if s.part is not None]:
            ready = wait([s.conn for s in busy] + [s.process.sentinel for s in busy], timeout=10)
            for slot in busy:
                if slot.conn in ready or slot.conn.poll():
                    yield from self._receive(slot, queue)
                elif slot.process.sentinel in ready:
                    self._died(slot)

    def _give(self, slot: _Slot, queue) -> None:
        slot.part = queue.popleft() if queue else None
        if slot.part is not None:
            slot.conn.send(slot.part)

    def _receive(self, slot: _Slot, queue):
        try:
            message = slot.conn.recv()
        except (EOFError, OSError):
            slot.process.join(JOIN_SECONDS)
            self._died(slot)
        kind, index = message[0], message[1]
        if kind == "progress":
            yield message
        elif kind == "done":
            yield message
            self._give(slot, queue)
        elif kind == "failed":
            raise tokenize_worker.PartFailed(message[2])
        else:
            where = "" if index is None else f" reading {self._part_text(slot)}"
            raise RuntimeError(f"a worker failed{where}:\n{message[2]}")

    @staticmethod
    def _part_text(slot: _Slot) -> str:
        part = slot.part[0]
        return f"part {part.index} ({part.describe()})"

    def _died(self, slot: _Slot) -> None:
        slot.process.join(JOIN_SECONDS)
        raise WorkerDied(f"worker pid {slot.process.pid} {describe_exit(slot.process.exitcode)}, while "
                         f"tokenizing {self._part_text(slot)}")

    def close(self) -> None:
        """Tell idle workers to exit; terminate, then kill, the others; wait for all."""
        for slot in self.slots:
            if slot.part is None and slot.process.is_alive():
                try:
                    slot.conn.send(None)
                except OSError:
                    pass
        for slot in self.slots:
            slot.process.join(JOIN_SECONDS if slot.part is None else 0)
            if slot.process.is_alive():
                slot.process.terminate()
                slot.process.join(JOIN_SECONDS)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            slot.conn.close()
