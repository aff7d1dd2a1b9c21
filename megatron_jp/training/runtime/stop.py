"""Stop requests: SIGTERM, SIGUSR1 or Ctrl-C make the run save after the current step and exit.

Slurm sends SIGTERM/SIGUSR1 before a time limit (`#SBATCH --signal=USR1@180`) or on preemption. Their
handlers are installed first thing (megatron_jp.train, before torch is imported): a warning that
arrives during start-up is kept and honoured at the first step boundary instead of killing the
process, whose default action for SIGUSR1 is to die. Ctrl-C is taken over only when the loop starts
(`attach`): during start-up it interrupts at once, as usual. This module imports torch only when asked.
"""

from __future__ import annotations

import signal
import sys


class StopRequest:
    """A second Ctrl-C exits at once (KeyboardInterrupt; the last published checkpoint stays
    `latest`). Ranks may get the signal at different moments, so the decision is an all-reduce: every
    rank stops after the same step. It runs on a CPU tensor over a gloo group, so the check never
    waits for the GPU's queue."""

    EARLY = (signal.SIGTERM, signal.SIGUSR1)
    SIGNALS = (*EARLY, signal.SIGINT)

    def __init__(self, dims=None):
        self.dims, self.name = dims, None
        self.previous: dict = {}
        self._install(self.EARLY)

    def _install(self, signals):
        for sig in signals:
            if sig not in self.previous:
                self.previous[sig] = signal.signal(sig, self._handle)

    def attach(self, dims) -> "StopRequest":
        """The ParallelDims to agree over, once the process groups exist; Ctrl-C from now on too."""
        self.dims = dims
        self._install(self.SIGNALS)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.name is not None:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("\ninterrupt: saving after this step and exiting (Ctrl-C again to exit at once)",
                  file=sys.stderr, flush=True)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        if self.dims is None or not self.dims.distributed:
            return self.name is not None
        import torch
        import torch.distributed as dist

        flag = torch.tensor(float(self.name is not None))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.dims.host_group)
        self.name = self.name or ("a signal to another rank" if flag.item() else None)
        return self.name is not None
