"""The encoder: one readable implementation of every seed architecture.

Llama-style bidirectional encoders (RMSNorm, RoPE, SwiGLU, GQA, optional QKV bias), ModernBERT
(embedding norm, local/global attention with per-layer RoPE theta, GeGLU, dense->act->norm head) and
classic BERT (learned positions, token types, post-norm, GELU) are all this file with different
ModelConfig fields. It holds architecture only: tensor/pipeline parallelism swap or remove modules
from outside (megatron_jp.parallel), so nothing here knows about process groups.

A batch row may pack several documents: `segment_ids` numbers them (0 = padding), attention never
crosses a segment and positions restart at each document. With `labels`, only the masked positions
reach the MLM head (sparse prediction): a [batch, seq, vocab] tensor is never built.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_jp.models.attention import AttentionContext, attend, token_major
from megatron_jp.models.config import ModelConfig
from megatron_jp.models.linear import linear
from megatron_jp.ops.glu import glu
from megatron_jp.ops.qkv_rope import qkv_rope

IGNORE_INDEX = -100

# A tied decoder shares the token embedding's tensor: state dicts hold it under both names, while
# checkpoints, initialisation and shard layouts know it by the embedding's name only.
TIED_EMBEDDING = "embeddings.tok.weight"
TIED_DECODER = "head.decoder.weight"


def tie(state: dict, cfg: ModelConfig) -> dict:
    """A state dict with the tied decoder under its own name too (what Encoder.load_state_dict takes)."""
    return {**state, TIED_DECODER: state[TIED_EMBEDDING]} if cfg.tie_embeddings else state


def untie(state: dict, cfg: ModelConfig) -> dict:
    """A state dict holding a tied tensor once, under the embedding's name (checkpoints, HF files)."""
    return {k: v for k, v in state.items() if k != TIED_DECODER} if cfg.tie_embeddings else state


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) \
            if cfg.position_embedding == "learned" else None
        self.types = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.norm = make_norm(cfg) if cfg.embedding_norm else None
        self.drop = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids, positions, token_type_ids=None):
        h = self.tok(input_ids)  # (B, S, H)
        if self.pos is not None:
            h = h + self.pos(positions)
        if self.types is not None:
            # BERT adds the type-0 row when no token types are given
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            h = h + self.types(types)
        if self.norm is not None:
            h = self.norm(h)
        return self.drop(h)


class CoreAttention(nn.Module):
    """softmax(q k^T / sqrt(D) + mask) v with the kernel the mask calls for (models/attention.py). A
    module of its own (no parameters), so recomputation and tensor-parallel dropout seeds can wrap it
    from outside."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dropout = cfg.attention_dropout

    def forward(self, q, k, v, mask, token_major: bool = False):
        return attend(q, k, v, mask, self.dropout if self.training else 0.0, token_major)  # (B, S, heads, D)


class Attention(nn.Module):
    """The fused QKV projection is one linear with the [all q; all k; all v] weight; one op then splits
    the heads and rotates q and k (ops/qkv_rope.py: a CUDA kernel where built). The head counts are
    this module's, so a tensor-parallel twin holding fewer heads runs the same forward."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        rows = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = linear(cfg.hidden_size, rows, cfg.qkv_bias)
        self.core = CoreAttention(cfg)
        self.out = linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.attn_out_bias)
        self.window = 0 if cfg.is_global_layer(layer) else cfg.sliding_window
        self.rope, self.theta = cfg.position_embedding == "rope", cfg.layer_theta(layer)

    def forward(self, x, ctx: AttentionContext):
        mask = ctx.mask(self.window)
        layout = token_major(mask)  # varlen takes (B, S, heads, D), the others (B, heads, S, D)
        q, k, v = qkv_rope(self.qkv(x), None, ctx.positions if self.rope else None, self.theta,
                           self.n_heads, self.n_kv_heads, self.head_dim, layout)
        y = self.core(q, k, v, mask, layout)
        return self.out(y.flatten(2))  # (B, S, heads * D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.ffn_hidden_size * (2 if cfg.gated else 1)
        self.fc1 = linear(cfg.hidden_size, width, cfg.mlp_bias)  # gated: [activated; linear]
        self.fc2 = linear(cfg.ffn_hidden_size, cfg.hidden_size, cfg.mlp_bias)
        self.activation = cfg.activation

    def forward(self, x):
        h = self.fc1(x)
        h = F.gelu(h) if self.activation == "gelu" else glu(h, self.activation)
        return self.fc2(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        skip_attn_norm = layer == 0 and not cfg.first_layer_attn_norm
        self.attn_norm = nn.Identity() if skip_attn_norm else make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.hidden_dropout)
        self.pre_norm = cfg.norm_position == "pre"

    def forward(self, h, ctx: AttentionContext):
        if self.pre_norm:
            h = h + self.drop(self.attn(self.attn_norm(h), ctx))
            return h + self.drop(self.mlp(self.mlp_norm(h)))
        h = self.attn_norm(h + self.drop(self.attn(h, ctx)))
        return self.mlp_norm(h + self.drop(self.mlp(h)))


class MLMHead(nn.Module):
    """linear: decoder only (EuroBERT); transform: dense -> act -> norm -> decoder (BERT, ModernBERT)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transform = cfg.head_type == "transform"
        if self.transform:
            self.dense = linear(cfg.hidden_size, cfg.hidden_size, cfg.head_bias)
            self.approximate = "tanh" if cfg.head_activation == "gelu_tanh" else "none"
            self.norm = make_norm(cfg)
        self.decoder = linear(cfg.hidden_size, cfg.vocab_size, cfg.decoder_bias)

    def features(self, h):
        """What the decoder reads: the transform's output, or h itself for a linear head."""
        if self.transform:
            return self.norm(F.gelu(self.dense(h), approximate=self.approximate))
        return h

    def forward(self, h):
        return self.decoder(self.features(h))


@dataclass
class MLMOutput:
    logits: torch.Tensor | None  # (N, V) at the N predicted positions, or (B, S, V) without labels
    targets: torch.Tensor | None  # (N,) original ids at those positions (IGNORE_INDEX: padding entries)
    hidden: torch.Tensor | None = None  # (B, S, H) when the head is absent (inner pipeline stages)
    features: torch.Tensor | None = None  # (N, H) the decoder's input, when asked for instead of logits


class Encoder(nn.Module):
    """Embeddings -> blocks -> final norm -> MLM head. Pipeline stages keep a slice: `embeddings`,
    `final_norm` or `head` may be None, and `layers` a subset (keys are global layer numbers)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (resolve it from the tokenizer first)")
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_layers)})
        self.final_norm = make_norm(cfg) if cfg.final_norm else None
        self.head = MLMHead(cfg)
        self.tie_weights()

    def tie_weights(self):
        """The decoder's weight is the token embedding's tensor (when tied and both are present)."""
        if self.cfg.tie_embeddings and self.embeddings is not None and self.head is not None:
            self.head.decoder.weight = self.embeddings.tok.weight

    def attention_context(self, input_ids, segment_ids=None, position_ids=None,
                          cu_seqlens=None) -> AttentionContext:
        """The batch layout for every layer of the model (all pipeline chunks share it)."""
        # attention dropout exists only in SDPA: "auto" keeps training runs with it there
        backend = "sdpa" if self.training and self.cfg.attention_dropout else self.cfg.attention_backend
        return AttentionContext.build(input_ids.shape, input_ids.device, segment_ids, position_ids, backend,
                                      layer_windows(self.cfg), cu_seqlens)

    def forward(self, input_ids, labels=None, segment_ids=None, position_ids=None, token_type_ids=None,
                hidden_states=None, ctx: AttentionContext | None = None, predicted=None,
                logits: bool = True) -> MLMOutput:
        """input_ids (B, S); labels (B, S) with IGNORE_INDEX where nothing is predicted.

        Stages without embeddings take `hidden_states` (B, S, H) from the previous stage instead. `ctx`
        is the batch layout (built here when absent). `predicted` (N,) lists the flat positions in
        B * S to predict, made on the host with a size fixed per micro-batch (extra entries carry
        IGNORE_INDEX labels): shapes then never depend on the data and nothing waits for the device;
        without it, the positions come from the labels (one synchronisation). logits=False stops
        before the decoder: the caller's loss fuses it (parallel/loss.py).
        """
        ctx = ctx if ctx is not None else self.attention_context(input_ids, segment_ids, position_ids)
        h = self.embeddings(input_ids, ctx.positions, token_type_ids) if self.embeddings else hidden_states
        for layer in self.layers.values():
            h = layer(h, ctx)  # (B, S, H)
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.head is None:
            return MLMOutput(logits=None, targets=None, hidden=h)
        if labels is None:
            return MLMOutput(logits=self.head(h), targets=None)
        if predicted is None:
            predicted = (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
        features = self.head.features(h.flatten(0, 1)[predicted])  # (N, H)
        targets = labels.flatten()[predicted]  # (N,)
        if not logits:
            return MLMOutput(logits=None, targets=targets, features=features)
        return MLMOutput(logits=self.head.decoder(features), targets=targets)  # (N, V)


def layer_windows(cfg: ModelConfig) -> set[int]:
    """The attention windows the model's layers use (0: global)."""
    return {0 if cfg.is_global_layer(i) else cfg.sliding_window for i in range(cfg.num_layers)}


EMBEDDING_PARAMS = (TIED_EMBEDDING, "embeddings.pos.weight", "embeddings.types.weight")


def count_parameters(model: nn.Module) -> dict:
    """Total parameters (a tied decoder counted once) and those outside the embedding tables."""
    total = embedding = 0
    for name, param in model.named_parameters():  # named_parameters yields a shared tensor once
        total += param.numel()
        if name in EMBEDDING_PARAMS:
            embedding += param.numel()
    return {"params_total": total, "params_non_embedding": total - embedding}


def masked_lm_loss(output: MLMOutput, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the predicted positions, in fp32 whatever the logits' dtype (IGNORE_INDEX
    targets, the padding of a fixed-size prediction index, count for nothing)."""
    return F.cross_entropy(output.logits.float(), output.targets, reduction=reduction)


# ----------------------------------------------------------------------------- initialisation


def _is_output_projection(name: str) -> bool:
    return name.endswith("attn.out.weight") or name.endswith("mlp.fc2.weight")


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int):
    """Initialise every parameter from its own generator seeded by (seed, name).

    The value of a parameter then depends on nothing but its name, so a model split across pipeline
    stages, or built whole and sharded afterwards, starts bit-identical to the single-process one.
    """
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1:  # norm scales
            param.fill_(1.0)
        else:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            std = out_std if _is_output_projection(name) else cfg.init_std
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


def build_encoder(cfg: ModelConfig, seed: int = 0, device="cpu", dtype=torch.float32) -> Encoder:
    """A full model, initialised on `device` (on "meta" it only has shapes, for counting)."""
    with torch.device("meta"):
        model = Encoder(cfg)
    if str(device) == "meta":
        return model
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty breaks the sharing: restore it
    init_weights(model, cfg, seed)
    return model.to(device=device, dtype=dtype)
