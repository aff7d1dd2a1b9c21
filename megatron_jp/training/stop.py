"""Stop requests: SIGTERM or SIGUSR1 make the run save after the current step and exit.

Slurm sends them before a time limit (`#SBATCH --signal=USR1@180`), or on preemption. The handlers are
installed first thing (megatron_jp.train, before torch is imported): a warning that arrives during
start-up is kept and honoured at the first step boundary instead of killing the process, whose
default action for SIGUSR1 is to die. This module imports torch only when asked.
"""

from __future__ import annotations

import signal


class StopRequest:
    """Ranks may get the signal at different moments, so the decision is an all-reduce: every rank
    stops after the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, dims=None):
        self.dims, self.name = dims, None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def attach(self, dims) -> "StopRequest":
        """The ParallelDims to agree over, once the process groups exist."""
        self.dims = dims
        return self

    def _handle(self, signum, frame):
        self.name = signal.Signals(signum).name

    def requested(self) -> bool:
        if self.dims is None or not self.dims.distributed:
            return self.name is not None
        import torch
        import torch.distributed as dist

        # a CPU tensor over a gloo group: the check never waits for the GPU's queue
        flag = torch.tensor(float(self.name is not None))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.dims.host_group)
        self.name = self.name or ("a signal to another rank" if flag.item() else None)
        return self.name is not None
