"""3D parallelism (tensor x pipeline x data) on plain torch.distributed; NCCL on GPUs, gloo on CPU.

The training driver's view::

    rank, world, device = init_process_group()      # torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or srun
                                                     # (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) with
                                                     # MASTER_ADDR/MASTER_PORT; a world of 1 needs nothing
    dims = ParallelDims.from_config(cfg, world, rank, device)   # a validated cfg; creates the groups
    model = build_parallel_model(cfg.model, dims, seed=cfg.train.seed, precision=Precision.of(cfg),
                                 recompute=cfg.train.recompute, zero1=cfg.parallel.zero1,
                                 sequence_parallel=cfg.parallel.sequence_parallel)
    optimizer = build_optimizer(model, cfg.optim, dims)
    out = train_step(model, optimizer, micro_batches, dims, lr)   # StepResult(loss, grad_norm, num_tokens, skipped)
    out = eval_step(model, micro_batches, dims)                   # EvalResult(loss, accuracy, num_tokens)

`micro_batches` is this data-parallel rank's list of micro-batch dicts of (B, S) int64 tensors:
input_ids, labels (-100 where nothing is predicted), segment_ids (0 = padding), position_ids (and
token_type_ids for BERT shapes). Every pipeline stage of a data-parallel rank passes the same list:
only hidden states travel between stages. With interleaved pipelining (virtual_pipeline > 1) the
number of micro-batches must be a multiple of the pipeline size. With sequence parallelism the
sequence length must be a multiple of the tensor-parallel size.

Results: `loss` is the sum of token cross-entropies over all predicted tokens of the global batch
divided by their number, the same in every layout; `grad_norm` is the global L2 norm before
clipping (optim.clip_grad). The optimizer's `.zero_grad()` and `.step(lr)` (returns the norm) can be
used directly; train_step calls both.

Checkpoints in any layout (full names are those of the single-process Encoder; a tied decoder is
known by the embedding's name, models.encoder.TIED_EMBEDDING):

    model.sharded_state_dict()       {full name: [ShardedPiece(name, tensor, global_shape, offsets,
                                      primary)]}: views of the local parameters; a parameter is one
                                      piece, or several (fused qkv: q, k, v parts; GLU fc1: two
                                      halves). Exactly one rank is `primary` for every block of every
                                      full tensor: it writes it. Fill the views in place to load.
    optimizer.sharded_state_dict()   {"step", "master", "exp_avg", "exp_avg_sq"}: the same pieces per
                                      full name (ZeRO-1 shards are gathered over data parallelism);
    optimizer.load_sharded_state_dict(state) takes that structure back, from any source layout.
    optimizer.state_dict() / load_state_dict()   this rank's own layout (same-layout resume).
    model.full_state_dict()          full fp32 tensors on global rank 0 (HF export); collective.
    model.load_full_state_dict(full) every rank cuts its shards out of full tensors; then
                                      optimizer.sync_master_from_params().

estimate_memory(cfg, world_size) -> {"memory_per_rank_bytes", "activation_bytes"} of the most loaded
rank: parameters, gradients, optimizer state and activations (memory_breakdown() gives the per-stage
parts; memory_warning() the advice when they exceed train.device_memory_gb).
"""

from megatron_jp.parallel.dims import ParallelDims, init_process_group, launch_env, rank_grid
from megatron_jp.parallel.memory import estimate_memory, memory_breakdown, memory_warning
from megatron_jp.parallel.model import ParallelModel, build_parallel_model
from megatron_jp.parallel.optimizer import DistributedOptimizer, build_optimizer
from megatron_jp.parallel.sharding import ShardedPiece, assemble_full
from megatron_jp.parallel.step import EvalResult, StepResult, eval_step, train_step

__all__ = [
    "ParallelDims", "init_process_group", "launch_env", "rank_grid",
    "build_parallel_model", "ParallelModel", "build_optimizer", "DistributedOptimizer",
    "train_step", "eval_step", "StepResult", "EvalResult", "estimate_memory", "memory_breakdown", "memory_warning",
    "ShardedPiece", "assemble_full",
]
