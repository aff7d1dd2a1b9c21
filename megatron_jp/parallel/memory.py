"""Per-rank memory of parameters, gradients and optimizer state for a configured layout.

Builds each pipeline stage's chunks on the meta device exactly as training would (same sharding,
same bucket layout and padding), so the estimate is the size of the buffers training allocates:

  parameters  bucket elements x parameter bytes (4 fp32, 2 bf16)
  gradients   bucket elements x 4 (fp32 accumulation buffers)
  optimizer   owned elements x (8 for the Adam moments + 4 for fp32 master weights under bf16;
              fp32 masters are the parameters themselves); owned = 1/dp of each bucket under ZeRO-1
Activations are not included.
"""

from __future__ import annotations

from megatron_jp.config import Config, data_parallel_size
from megatron_jp.parallel.data_parallel import DEFAULT_BUCKET_SIZE, plan_buckets
from megatron_jp.parallel.dims import ParallelDims
from megatron_jp.parallel.model import DTYPES, build_parallel_model


def memory_breakdown(cfg: Config, world_size: int, bucket_size: int = DEFAULT_BUCKET_SIZE) -> list[dict]:
    """One dict per pipeline stage (bytes of params, grads, optimizer, total) for its first tensor-
    and data-parallel rank of a validated config; other ranks of a stage hold the same amounts."""
    p = cfg.parallel
    dp = data_parallel_size(cfg, world_size)
    stages = []
    for stage in range(p.pipeline):
        rank = stage * dp * p.tensor  # grid coordinates (stage, 0, 0)
        dims = ParallelDims.layout(p.tensor, p.pipeline, dp, p.virtual_pipeline, rank)
        model = build_parallel_model(cfg.model, dims, device="meta", precision=cfg.train.precision,
                                     sequence_parallel=p.sequence_parallel, zero1=p.zero1)
        numel = sum(b.numel for b in plan_buckets(model.infos, dp, bucket_size))
        owned = numel // dp if p.zero1 and dp > 1 else numel
        param_bytes = DTYPES[cfg.train.precision].itemsize
        master = 4 if param_bytes != 4 else 0
        stage_bytes = {"params": numel * param_bytes, "grads": numel * 4, "optimizer": owned * (8 + master)}
        stage_bytes["total"] = sum(stage_bytes.values())
        stages.append(stage_bytes)
    return stages


def estimate_memory(cfg: Config, world_size: int) -> int:
    """Bytes of parameters + gradients + optimizer state on the most loaded rank."""
    return max(stage["total"] for stage in memory_breakdown(cfg, world_size))
