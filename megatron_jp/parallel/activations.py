"""Activation memory of a training step, counted the way our layers save tensors for backward.

Per token and layer, in elements of the activation dtype (p bytes: 2 bf16 and fp8, 4 fp32; FP8 linears
keep their bf16 input for backward, Precision.activation_bytes), with a, kv the
rank's query and key/value heads, d the head size, f the rank's MLP width, h the hidden size:

  norms        2 x (input h + output h) + their statistics (fp32; 1 for RMSNorm, 2 for LayerNorm)
  q, k, v      (a + 2 kv) d, the fused op's outputs; with RoPE the reference op (no CUDA kernels)
               keeps the rotated q and k ((a + kv) d) next to the projection output, and cos/sin (2 d,
               fp32)
  attention    the output a d and the log-sum-exp a (fp32) of a flash-style kernel (varlen, flex, and
               CPU SDPA); SDPA with a boolean mask also keeps it as an additive fp32 mask (S per token)
  MLP          fc1's output (2 f gated, f plain), the activation's output f (the reference GLU also
               its gate's activation, f)
A norm keeps its input and statistics (eager RMSNorm, a composite op, also its normalised input),
and its output is kept by the matmul that reads it.
  dropout      one byte per element of each hidden-dropout site
Under sequence parallelism the norm regions hold 1/tp of the sequence, and each column-parallel
matmul keeps its all-gathered input (h). Recomputation: "selective" drops what core attention keeps
beyond its inputs (output, log-sum-exp, mask); "full" keeps only each block's input, and backward
recomputes one block at a time (that block's full activations are the transient peak).

Per micro-batch, outside the blocks: the inputs of the embedding norm (BERT, ModernBERT) and of the
final norm, the head's transform on the predicted tokens (about mask_prob x tokens; the gather keeps
only indices) and the fused loss's stored gradients (features, and the decoder's weight gradient in
fp32), plus one chunk of fp32 logits and its gradient while the loss runs. A pipeline stage holds the activations of every micro-batch in
flight: pp - stage of them under 1F1B, more under interleaving. tests/unit/test_memory_plan.py holds
the estimate to what a tiny model really keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_jp.config import Config
from megatron_jp.parallel.loss import CHUNK_ELEMENTS, chunk_tokens
from megatron_jp.parallel.step import PREDICTED_BUCKET
from megatron_jp.precision import Precision


@dataclass(frozen=True)
class Target:
    """What the saved tensors depend on besides the config."""

    fused_kernels: bool  # csrc's qkv_rope and GLU kernels (CUDA): nothing saved beyond their inputs
    masked_sdpa: bool  # attention through SDPA with a dense boolean mask (the CPU path)


CUDA = Target(fused_kernels=True, masked_sdpa=False)
CPU = Target(fused_kernels=False, masked_sdpa=True)


def _norm_stats(cfg) -> int:
    return 1 if cfg.model.norm == "rmsnorm" else 2


def layer_elements(cfg: Config, seq: int, tp: int, target: Target) -> dict[str, float]:
    """Saved elements per token of one block without recomputation, by kind: "act" in the activation
    dtype, "fp32", "bytes" (masks)."""
    m, sp = cfg.model, cfg.parallel.sequence_parallel and tp > 1
    a, kv, d = m.num_heads // tp, max(m.num_kv_heads // tp, 1), m.head_dim
    f, h, r = m.ffn_hidden_size // tp, m.hidden_size, 1 / tp if sp else 1
    act = 4 * h * r + (2 * h if sp else 0)  # norms in/out; gathered matmul inputs under SP
    act += (a + 2 * kv) * d + a * d  # q, k, v; attention output
    act += f * (2 if m.gated else 1) + f  # fc1 output, activation output
    fp32 = 2 * _norm_stats(cfg) * r + a  # norm statistics; log-sum-exp
    if not target.fused_kernels:  # the reference ops' intermediates
        if m.position_embedding == "rope":
            act += (a + kv) * d  # rotated q and k next to the projection output (which holds v)
            fp32 += 2 * d  # cos, sin
        act += f if m.gated else 0  # the gate's activation, a product's saved operand
        act += 2 * h * r if m.norm == "rmsnorm" else 0  # eager RMSNorm keeps the normalised input too
    if target.masked_sdpa:
        fp32 += seq  # the boolean mask as SDPA's additive fp32 mask, per layer
    dropout = 2 * h * r if m.hidden_dropout > 0 else 0
    return {"act": act, "fp32": fp32, "bytes": dropout}


def _bytes(elements: dict[str, float], p: int) -> float:
    return elements["act"] * p + elements["fp32"] * 4 + elements["bytes"]


def layer_bytes(cfg: Config, seq: int, tp: int, target: Target, p: int) -> tuple[float, float]:
    """(bytes per token a block keeps under cfg.train.recompute, bytes per token of one block's full
    activations: the transient of a recomputed block in backward); p bytes per activation element."""
    full = _bytes(layer_elements(cfg, seq, tp, target), p)
    m = cfg.model
    if cfg.train.recompute == "full":
        sp = cfg.parallel.sequence_parallel and tp > 1
        return m.hidden_size * p / (tp if sp else 1), full
    if cfg.train.recompute == "selective":
        a = m.num_heads // tp
        dropped = a * m.head_dim * p + a * 4 + (seq * 4 if target.masked_sdpa else 0)
        return full - dropped, a * m.head_dim * p
    return full, 0.0


def head_bytes(cfg: Config, tokens: int, tp: int, p: int) -> dict[str, float]:
    """The last stage's per-micro-batch activations outside the blocks: final norm, head transform on
    the predicted tokens, the fused loss's stored gradients; and the loss's transient chunk."""
    m = cfg.model
    h, vocab_local = m.hidden_size, m.vocab_size // tp
    predicted = -(-max(int(cfg.data.mask_prob * tokens), 1) // PREDICTED_BUCKET) * PREDICTED_BUCKET
    final_norm = (h * p + _norm_stats(cfg) * 4) * tokens if m.final_norm else 0
    transform = (3 * h * p + _norm_stats(cfg) * 4) * predicted if m.head_type == "transform" else 0
    stored = predicted * h * p + vocab_local * h * 4 + (vocab_local * 4 if m.decoder_bias else 0)
    chunk = min(chunk_tokens(vocab_local), predicted) * vocab_local
    return {"head": final_norm + transform + stored, "loss_chunk": min(chunk, CHUNK_ELEMENTS) * (4 + 4 + p)}


def embedding_bytes(cfg: Config, tokens: int, p: int) -> float:
    m = cfg.model
    return (m.hidden_size * p + _norm_stats(cfg) * 4) * tokens if m.embedding_norm else 0.0


def in_flight(cfg: Config, stage: int, micro_batches: int) -> float:
    """Micro-batches whose activations a stage holds at its peak, in units of its whole layer slice."""
    pp, vpp = cfg.parallel.pipeline, cfg.parallel.virtual_pipeline
    if vpp == 1:
        return min(pp - stage, micro_batches)
    warmup = 2 * (pp - stage - 1) + (vpp - 1) * pp + 1  # chunk forwards before the first backward
    return min(warmup, micro_batches * vpp) / vpp


def stage_activation_bytes(cfg: Config, stage: int, dp: int, target: Target = CUDA) -> dict[str, float]:
    """Activation bytes of one pipeline stage at its peak, by part, and their total."""
    t, p, act = cfg.train, cfg.parallel, Precision.of(cfg).activation_bytes
    seq = max([cfg.data.seq_length, *cfg.data.seq_length_stages.values()])
    tokens = t.micro_batch_size * seq
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    per_token, transient = layer_bytes(cfg, seq, p.tensor, target, act)
    layers = cfg.model.num_layers // p.pipeline
    out = {"layers": per_token * tokens * layers * in_flight(cfg, stage, micro_batches),
           "recompute": transient * tokens}
    if stage == 0:
        out["embedding"] = embedding_bytes(cfg, tokens, act) * in_flight(cfg, stage, micro_batches)
    if stage == p.pipeline - 1:
        out.update(head_bytes(cfg, tokens, p.tensor, act))
    out["total"] = sum(out.values())
    return out
