"""Checkpoints: the layout (docs/DESIGN.md), atomic publishing, and the readers and writers.

    CKPT_DIR/latest                         text: the name of the last complete iteration folder
    CKPT_DIR/iter_0000100/.metadata         torch.distributed.checkpoint (DCP) files. Tensors under
    CKPT_DIR/iter_0000100/__<rank>_0.distcp   "model.<full name>" (the single-process Encoder's names and
                                              shapes; a tied decoder once, under the embedding's name) and
                                              "optim.{exp_avg,exp_avg_sq,master}.<full name>" (master
                                              only when parameters are not fp32: otherwise the
                                              parameter is the master)
    CKPT_DIR/iter_0000100/rank_state/rank_00003.pt   each rank's own state (RNG, ...), torch.save
    CKPT_DIR/iter_0000100/config.yaml       the run configuration
    CKPT_DIR/iter_0000100/meta.json         {"meta": the caller's (step, consumed samples, ...),
                                              "world_size", "layout", "optimizer_step", "run_id",
                                              "files": {relative path: {"bytes", "sha256"}} of every
                                              data file, .metadata included (manifest.py)}

Publishing: every rank writes into CKPT_DIR/.iter_0000100.tmp; when all have finished, rank 0 writes
config.yaml and meta.json, renames the folder to iter_0000100, replaces `latest` (temporary file +
os.replace) and prunes old iterations. A process killed at any point leaves `latest` naming the
previous complete folder; leftover .tmp folders are removed by the next save (the run holds the
directory's lock, training/runtime/run_lock.py, so they are not another run's). Saving the same step twice
replaces the folder only if this run wrote it.

Nothing is lost: a save is refused when the weights or optimizer moments are not finite (the
previous checkpoint stays `latest`); pruning deletes only folders this run wrote (its run_id, carried
over by resumes), never the newest one with finite weights; a directory holding iter_* folders but
no `latest` is refused with a listing instead of being started over (and pruned) at step 0.

Nothing is trusted: reading refuses, with CheckpointError naming the file, a data file missing, of
another size or another SHA-256 than meta.json records (checked before any tensor or the .metadata
pickle is read), a missing or invalid config.yaml or meta.json, a `latest` that is not a text file
naming a complete folder, non-finite weights, and a model whose parameter shapes differ from the
current config. config.yaml is not in the manifest: it may be edited (e.g. to point at a moved
tokenizer). A checkpoint folder is as trusted as a pickle: DCP's .metadata is one. It is unpickled
with only DCP's own classes allowed (dcp_pieces.SafeReader) and its hash checked first, but whoever
can write the folder can also rewrite meta.json: load checkpoints only from people you trust.

The package's modules: checkpointer.py (the distributed Checkpointer, the tools' model-state reader and
writer), store.py (the directory: `latest`, reading and checking a folder, publishing, pruning),
dcp_pieces.py (torch.distributed.checkpoint with streamed, hashed pieces: the one place that uses DCP's
private APIs) and manifest.py (sizes and SHA-256 of every file). The model and the optimizer hand the
Checkpointer named tensors and their shard layout through `sharded_state_dict()` /
`load_sharded_state_dict()` and `local_tensors()`; nothing here reads their attributes.
"""

from megatron_jp.training.checkpoint.checkpointer import (Checkpointer, Loaded, checkpoint_bytes, load_model_state,
                                                          save_model_checkpoint)
from megatron_jp.training.checkpoint.store import (CheckpointError, check_files, find_latest, non_finite_names,
                                                   read_config, read_meta, resolve_checkpoint)

__all__ = ["Checkpointer", "CheckpointError", "Loaded", "check_files", "checkpoint_bytes", "find_latest",
           "load_model_state", "non_finite_names", "read_config", "read_meta", "resolve_checkpoint",
           "save_model_checkpoint"]
