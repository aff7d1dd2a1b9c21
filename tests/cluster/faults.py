"""`python tests/cluster/faults.py FAULT TRAINER_ARGS...`: the trainer with one rank dying during the
publication of the checkpoint of step FAULT_STEP (10), as a node fails at the worst moment.

    peer-dies-while-rank0-publishes  rank 1 passes the "every file is written" barrier, then is
                                     SIGKILLed while rank 0 renames the folder and writes `latest`
    rank0-dies-while-publishing      rank 0 is SIGKILLed after renaming the folder, before `latest`
"""

import os
import signal
import sys

from megatron_jp.training import checkpoint

FAULT_STEP = 10


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def inject(fault: str):
    if fault == "peer-dies-while-rank0-publishes":
        original = checkpoint.Checkpointer._publish

        def _publish(self, step, tmp, info):
            if step == FAULT_STEP and self.dims.rank == 1:
                self._barrier()  # every rank's files are complete: rank 0 publishes now
                die()
            return original(self, step, tmp, info)

        checkpoint.Checkpointer._publish = _publish
    elif fault == "rank0-dies-while-publishing":
        original = checkpoint.publish

        def publish(ckpt_dir, tmp, step, keep):
            if step == FAULT_STEP:
                os.replace(tmp, ckpt_dir / checkpoint.iteration_name(step))
                die()  # `latest` still names the previous checkpoint
            return original(ckpt_dir, tmp, step, keep)

        checkpoint.publish = publish
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    inject(sys.argv[1])
    from megatron_jp.train import main

    sys.exit(main(sys.argv[2:]))
