"""`python tests/cluster/faults.py FAULT TRAINER_ARGS...`: the trainer with one rank dying during the
publication of the checkpoint of step FAULT_STEP (10), as a node fails at the worst moment.

    peer-dies-while-rank0-publishes  rank 1 passes the "every file is written" gathering of hashes,
                                     then is SIGKILLed while rank 0 renames the folder and writes `latest`
    rank0-dies-while-publishing      rank 0 is SIGKILLed after renaming the folder, before `latest`
    pause-while-saving               rank FAULT_RANK, about to write its pieces of that checkpoint, waits 3 s,
                                     creates the file FAULT_MARKER and sleeps (the test pulls its host away)
"""

import os
import signal
import sys
import time

from megatron_jp.training.checkpoint import checkpointer as checkpoint  # where the faults are injected

FAULT_STEP = 10


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def inject(fault: str):
    if fault == "peer-dies-while-rank0-publishes":
        publish_step, on_rank0 = checkpoint.Checkpointer._publish, checkpoint.Checkpointer._on_rank0

        def _publish(self, step, *args, **kwargs):
            self.fault_now = step == FAULT_STEP and self.dims.rank == 1
            return publish_step(self, step, *args, **kwargs)

        def _on_rank0(self, work):
            if getattr(self, "fault_now", False):  # every rank's files are complete: rank 0 publishes now
                die()
            return on_rank0(self, work)

        checkpoint.Checkpointer._publish, checkpoint.Checkpointer._on_rank0 = _publish, _on_rank0
    elif fault == "rank0-dies-while-publishing":
        original = checkpoint.publish

        def publish(ckpt_dir, tmp, step, *args, **kwargs):
            if step == FAULT_STEP:
                os.replace(tmp, ckpt_dir / checkpoint.iteration_name(step))
                die()  # `latest` still names the previous checkpoint
            return original(ckpt_dir, tmp, step, *args, **kwargs)

        checkpoint.publish = publish
    elif fault == "pause-while-saving":
        original_save = checkpoint.dcp_pieces.save

        def save(state, tmp, *args, **kwargs):
            if tmp.name == f".{checkpoint.iteration_name(FAULT_STEP)}.tmp" and \
                    os.environ["SLURM_PROCID"] == os.environ["FAULT_RANK"]:
                time.sleep(3)  # a few heartbeats: the others' watchdogs see this rank in the save
                open(os.environ["FAULT_MARKER"], "w").close()
                time.sleep(120)
            return original_save(state, tmp, *args, **kwargs)

        checkpoint.dcp_pieces.save = save
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    inject(sys.argv[1])
    from megatron_jp.train import main

    sys.exit(main(sys.argv[2:]))
