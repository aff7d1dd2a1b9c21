"""`python -m megatron_jp.train` whose checkpoint writes stall once a stop was requested, for the test of
a second Ctrl-C during a save (tests/integration/test_interrupted_save.py).

    python tests/integration/stalled_save.py MARKER [train arguments...]

The writer creates MARKER, then sleeps where it would write the tensors: a slow disk, seen from the
process, so the test can press Ctrl-C a second time while the save is in progress.
"""

import sys
import time
from pathlib import Path

from megatron_jp import train
from megatron_jp.training.checkpoint import dcp_pieces


def stall_writes(marker: Path):
    write_data = dcp_pieces.StreamingWriter.write_data

    def slow_write_data(self, plan, planner):
        marker.write_text("saving\n")
        time.sleep(600)  # the second Ctrl-C ends this
        return write_data(self, plan, planner)

    dcp_pieces.StreamingWriter.write_data = slow_write_data


if __name__ == "__main__":
    stall_writes(Path(sys.argv[1]))
    sys.exit(train.main(sys.argv[2:]))
