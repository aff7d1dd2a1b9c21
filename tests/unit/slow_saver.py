"""A process for test_checkpoint's kill test: saves a tiny model at steps 1, 2, 3, ... with the second
save slowed down at one point, where it creates a marker file and sleeps until it is killed.

    python tests/unit/slow_saver.py CKPT_DIR MARKER {write,publish}

write:   after the tensor files are written, before .metadata, meta.json and the rename
publish: after the folder is renamed to iter_0000002, before `latest` is replaced
"""

import sys
import time
from pathlib import Path

from megatron_jp.config import Config
from megatron_jp.models.config import preset
from megatron_jp.parallel import ParallelDims, build_optimizer, build_parallel_model
from megatron_jp.training import checkpoint
from megatron_jp.training.checkpoint import dcp_pieces, store

SLOW_STEP = 2


def stall(marker: Path):
    marker.write_text("stalled\n")
    time.sleep(600)  # the test kills us long before


def slow_down(where: str, marker: Path, step: list[int]):
    if where == "write":
        write_data = dcp_pieces.StreamingWriter.write_data

        def slow_write_data(self, plan, planner):
            done = write_data(self, plan, planner)
            if step[0] == SLOW_STEP:
                stall(marker)
            return done

        dcp_pieces.StreamingWriter.write_data = slow_write_data
    else:
        write_durably = store._write_durably

        def slow_write_durably(path, text):
            if step[0] == SLOW_STEP and path.name == f".{store.LATEST}.tmp":
                stall(marker)
            write_durably(path, text)

        store._write_durably = slow_write_durably


def main(ckpt_dir: str, marker: str, where: str):
    cfg = Config(model=preset("tiny", vocab_size=128, hidden_size=32, num_layers=2))
    dims = ParallelDims.layout(1, 1, 1)
    model = build_parallel_model(cfg.model, dims, seed=1)
    optimizer = build_optimizer(model, cfg.optim, dims)
    saver = checkpoint.Checkpointer(ckpt_dir, cfg, dims, keep=0)
    step = [0]
    slow_down(where, Path(marker), step)
    for step[0] in range(1, 10):
        saver.save(step[0], model, optimizer, meta={"step": step[0]})


if __name__ == "__main__":
    main(*sys.argv[1:])
