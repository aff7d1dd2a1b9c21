"""Per-rank memory of a configured layout: parameters, gradients, optimizer state and activations.

Builds each pipeline stage's chunks on the meta device exactly as training would (same sharding,
same bucket layout and padding), so the first three are the sizes of the buffers training allocates:

  parameters   bucket elements x parameter bytes (4 fp32, 2 bf16 and fp8: FP8 runs keep bf16 weights,
               cast to FP8 per GEMM)
  gradients    bucket elements x 4 (fp32 accumulation buffers)
  optimizer    owned elements x (8 for the Adam moments + 4 for fp32 master weights under bf16;
               fp32 masters are the parameters themselves); owned = 1/dp of each bucket under ZeRO-1
  activations  what backward needs, at the stage's peak (parallel/activations.py: by recompute mode,
               attention kernel, micro-batch, the longest sequence of the run, the sparse head and the
               fused loss's chunk)
"""

from __future__ import annotations

from megatron_jp.config import Config, data_parallel_size
from megatron_jp.parallel.activations import CUDA, Target, stage_activation_bytes
from megatron_jp.parallel.data_parallel import DEFAULT_BUCKET_SIZE, plan_buckets
from megatron_jp.parallel.dims import ParallelDims
from megatron_jp.parallel.model import build_parallel_model
from megatron_jp.precision import Precision


def memory_breakdown(cfg: Config, world_size: int, bucket_size: int = DEFAULT_BUCKET_SIZE,
                     target: Target = CUDA) -> list[dict]:
    """One dict per pipeline stage (bytes of params, grads, optimizer, activations, total) for its
    first tensor- and data-parallel rank of a validated config; other ranks of a stage hold the same
    amounts. `target` says which kernels the activations are counted for (CUDA by default)."""
    p, precision = cfg.parallel, Precision.of(cfg)
    dp = data_parallel_size(cfg, world_size)
    stages = []
    for stage in range(p.pipeline):
        rank = stage * dp * p.tensor  # grid coordinates (stage, 0, 0)
        dims = ParallelDims.layout(p.tensor, p.pipeline, dp, p.virtual_pipeline, rank)
        model = build_parallel_model(cfg.model, dims, device="meta", precision=precision,
                                     sequence_parallel=p.sequence_parallel, zero1=p.zero1)
        numel = sum(b.numel for b in plan_buckets(model.infos, dp, bucket_size))
        owned = numel // dp if p.zero1 and dp > 1 else numel
        master = precision.master.itemsize if precision.separate_master else 0
        stage_bytes = {"params": numel * precision.params.itemsize, "grads": numel * 4,
                       "optimizer": owned * (8 + master),
                       "activations": int(stage_activation_bytes(cfg, stage, dp, target)["total"])}
        stage_bytes["total"] = sum(stage_bytes.values())
        stages.append(stage_bytes)
    return stages


def estimate_memory(cfg: Config, world_size: int) -> dict[str, int]:
    """The most loaded rank's bytes: {"memory_per_rank_bytes" (everything), "activation_bytes"}."""
    worst = max(memory_breakdown(cfg, world_size), key=lambda stage: stage["total"])
    return {"memory_per_rank_bytes": worst["total"], "activation_bytes": worst["activations"]}


def memory_warning(cfg: Config, world_size: int) -> str | None:
    """A sentence naming the keys to change when the plan exceeds train.device_memory_gb, else None."""
    need = estimate_memory(cfg, world_size)
    total, acts = need["memory_per_rank_bytes"] / 1e9, need["activation_bytes"] / 1e9
    if total <= cfg.train.device_memory_gb:
        return None
    fixes = ["lower train.micro_batch_size", "set train.recompute selective or full",
             "raise parallel.tensor or parallel.pipeline"] + ([] if cfg.parallel.zero1 else ["set parallel.zero1"])
    return (f"the plan needs {total:.1f} GB per rank ({acts:.1f} GB of activations), more than "
            f"train.device_memory_gb ({cfg.train.device_memory_gb:g}): {', '.join(fixes[:-1])} or {fixes[-1]}")
