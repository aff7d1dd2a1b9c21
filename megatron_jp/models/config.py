"""The model's configuration: `ModelConfig` and the named architectures (presets).

A preset is a plain dict of ModelConfig fields: the five seed models of shared/seeds and tiny shapes
for tests and demos; fields written next to `model.preset` in a run config override it, and
`preset(name, **overrides)` gives the ModelConfig. Where a model card leaves a field open it is
derived from the card's parameter counts, and the comment says how; tests/unit/test_presets.py holds
every preset to its card within 2%.

This module sits on the bottom floor with the field types (config_fields.py): the run configuration
(megatron_jp/config.py) and the model code import it, and the custom-code export
(models/hf/custom.py) copies it into exported folders as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# the field types: ModelConfig's annotations are resolved in this module's namespace
from megatron_jp.config_fields import (Activation, ConfigError, DropoutRate, NonNegative,  # noqa: F401
                                       NonNegativeFloat, Positive, PositiveFloat, check_fields, require)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the encoder. One set of fields covers Llama-style, ModernBERT and BERT shapes.

    Frozen, and resolved when built: `num_kv_heads` and `head_dim` given as 0 take their derived
    values, so code reads one name per concept. `vocab_size` 0 (take the tokenizer's) is resolved
    by the run (training/startup.py) into a new ModelConfig with `dataclasses.replace`; a replace
    keeps derived values as they are, so change `num_heads` or `hidden_size` through `preset()` or
    a new ModelConfig instead."""

    preset: str = ""
    """Name of a preset (PRESETS below); fields set next to it override the preset."""
    vocab_size: NonNegative = 0
    """Rows of the embedding. 0: the tokenizer's size, padded to make_vocab_size_divisible_by x tensor."""
    make_vocab_size_divisible_by: Positive = 128
    """Padding multiple for a vocabulary taken from the tokenizer (fast matmuls, even TP shards)."""
    hidden_size: Positive = 64
    """Width of the residual stream."""
    num_layers: Positive = 4
    """Number of transformer blocks."""
    num_heads: Positive = 4
    """Query heads per attention layer."""
    num_kv_heads: NonNegative = 0
    """Key/value heads (GQA). 0 when built: same as num_heads (multi-head attention)."""
    head_dim: NonNegative = 0
    """Size of each head. 0 when built: hidden_size // num_heads."""
    ffn_hidden_size: Positive = 128
    """Inner width of the MLP (of each half, for gated activations)."""
    activation: Activation = "swiglu"
    """MLP activation: gelu (exact erf, ungated), swiglu, geglu (exact erf) or geglu_tanh."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation: rmsnorm or layernorm."""
    norm_bias: bool = False
    """Whether LayerNorms have a bias (BERT: yes, ModernBERT: no). Ignored for rmsnorm."""
    norm_eps: PositiveFloat = 1e-5
    """Epsilon of every norm."""
    norm_position: Literal["pre", "post"] = "pre"
    """pre: x + f(norm(x)) (Llama, ModernBERT); post: norm(x + f(x)) (classic BERT)."""
    embedding_norm: bool = False
    """Normalise the embedding output (BERT, ModernBERT)."""
    first_layer_attn_norm: bool = True
    """False drops layer 0's attention norm (ModernBERT: the embedding norm already did it)."""
    final_norm: bool = True
    """Normalise the last block's output (pre-norm models)."""
    qkv_bias: bool = False
    """Bias on the query/key/value projections."""
    attn_out_bias: bool = False
    """Bias on the attention output projection."""
    mlp_bias: bool = False
    """Biases on the MLP projections."""
    position_embedding: Literal["rope", "learned"] = "rope"
    """rope (rotary, rotate-half) or learned (absolute position table)."""
    max_position_embeddings: Positive = 8192
    """Longest sequence; the size of the learned position table."""
    type_vocab_size: NonNegative = 0
    """Token-type (segment A/B) embeddings; 0 for none, 2 for BERT."""
    rope_theta: PositiveFloat = 10000.0
    """RoPE base of global-attention layers."""
    local_rope_theta: NonNegativeFloat = 0.0
    """RoPE base of sliding-window layers. 0: same as rope_theta."""
    sliding_window: NonNegative = 0
    """Total window of local layers (128 = +-64 tokens). 0: every layer attends globally."""
    global_attn_every_n_layers: Positive = 1
    """Layer i is global when i % n == 0, else local (ModernBERT: 3). 1: all global."""
    head_type: Literal["linear", "transform"] = "linear"
    """MLM head: linear (decoder only, EuroBERT) or transform (dense -> act -> norm -> decoder)."""
    head_activation: Literal["gelu", "gelu_tanh"] = "gelu"
    """Activation inside a transform head: gelu (exact erf) or gelu_tanh (tanh approximation)."""
    head_bias: bool = True
    """Bias on the transform head's dense layer."""
    decoder_bias: bool = True
    """Bias on the vocabulary projection."""
    tie_embeddings: bool = True
    """Share the decoder weight with the token embedding."""
    hidden_dropout: DropoutRate = 0.0
    """Dropout on embeddings and block outputs."""
    attention_dropout: DropoutRate = 0.0
    """Dropout on attention probabilities. Only SDPA has it: training with it uses SDPA, which on CUDA
    takes rows that need no mask only (one unpadded document each); the seed models use 0."""
    init_std: PositiveFloat = 0.02
    """Std of the normal initialisation; output projections use init_std / sqrt(2 * num_layers)."""
    attention_backend: Literal["auto", "varlen", "flex", "sdpa"] = "auto"
    """Kernel of packed-document and windowed attention (models/attention.py): varlen (FlashAttention
    over the concatenated documents, CUDA), flex (block-sparse masks), sdpa (dense masks: CPU only) or
    auto: sdpa on CPU; on CUDA varlen where torch has it, else flex."""

    def __post_init__(self):
        """The same checks as a config file gets: each field on its own, then the shape together."""
        check_fields(self, "model")
        require(self.head_dim > 0 or self.hidden_size % self.num_heads == 0,
               f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads}); "
               f"change one of them or set model.head_dim explicitly")
        object.__setattr__(self, "num_kv_heads", self.num_kv_heads or self.num_heads)
        object.__setattr__(self, "head_dim", self.head_dim or self.hidden_size // self.num_heads)
        require(self.num_heads % self.num_kv_heads == 0,
               f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})")
        require(self.position_embedding != "rope" or self.head_dim % 2 == 0,
               f"RoPE needs an even head size; model.head_dim is {self.head_dim}")
        require(self.sliding_window % 2 == 0,
               f"model.sliding_window ({self.sliding_window}) is a total window (e.g. 128 = +-64 tokens): "
               f"use an even number, or 0 for global attention everywhere")
        require(self.sliding_window > 0 or self.global_attn_every_n_layers == 1,
               f"model.global_attn_every_n_layers = {self.global_attn_every_n_layers} asks for local layers "
               f"but model.sliding_window is 0; set model.sliding_window (e.g. 128)")
        require(self.attention_dropout == 0 or self.attention_backend in ("sdpa", "auto"),
               f"model.attention_dropout needs model.attention_backend sdpa or auto ({self.attention_backend} "
               f"has no dropout)")

    @property
    def gated(self) -> bool:
        return self.activation != "gelu"  # every other activation is a GLU

    def is_global_layer(self, layer: int) -> bool:
        return self.sliding_window == 0 or layer % self.global_attn_every_n_layers == 0

    def layer_theta(self, layer: int) -> float:
        if self.is_global_layer(layer):
            return self.rope_theta
        return self.local_rope_theta or self.rope_theta


# ----------------------------------------------------------------------------- presets

LLAMA_ENCODER = dict(
    norm="rmsnorm", norm_position="pre", activation="swiglu", position_embedding="rope",
    final_norm=True, head_type="linear", tie_embeddings=False, decoder_bias=False,
)
MODERNBERT = dict(
    norm="layernorm", norm_bias=False, norm_position="pre", activation="geglu", position_embedding="rope",
    embedding_norm=True, first_layer_attn_norm=False, final_norm=True,
    rope_theta=160_000.0, local_rope_theta=10_000.0, sliding_window=128, global_attn_every_n_layers=3,
    head_type="transform", head_bias=False, decoder_bias=True, tie_embeddings=True,
)
BERT = dict(
    norm="layernorm", norm_bias=True, norm_eps=1e-12, norm_position="post", activation="gelu",
    position_embedding="learned", max_position_embeddings=512, type_vocab_size=2, embedding_norm=True,
    final_norm=False, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
    head_type="transform", head_bias=True, decoder_bias=True, tie_embeddings=True,
)

PRESETS: dict[str, dict] = {
    # Card: vocab 102,400, hidden 512, 19 layers, seq 8,192, 52M embedding + 80M layer = 132M.
    # Derived: 8 heads of 64 and ffn 2,048 give 79.7M in the layers (19 x 4.2M), 132.5M in all.
    "modernbert-ja-130m": dict(
        MODERNBERT, vocab_size=102_400, hidden_size=512, num_layers=19, num_heads=8, ffn_hidden_size=2048,
        max_position_embeddings=8192),
    # Card: the ModernBERT-base shape (hidden 768, 22 layers, 12 heads, ffn 1,152) with the llm-jp v3
    # tokenizer (99,584 rows, as in llm-jp-3 models), seq 8,192: 187M parameters.
    "llm-jp-modernbert-base": dict(
        MODERNBERT, vocab_size=99_584, hidden_size=768, num_layers=22, num_heads=12, ffn_hidden_size=1152,
        max_position_embeddings=8192),
    # Card: Llama encoder, 24 layers, hidden 1,024, ffn 4,096, 16 heads / 8 KV heads, llm-jp v3 vocab
    # (99,584), 581M. The count matches only with an untied, bias-free output layer (581.5M).
    "tohoku-bert-500m": dict(
        LLAMA_ENCODER, vocab_size=99_584, hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=8,
        ffn_hidden_size=4096, max_position_embeddings=8192),
    # Card: Llama encoder on UTF-8 bytes with QKV bias, 114M (v2), seq 4,096. Derived: the BERT-base
    # body (hidden 768, 12 layers, 12 heads, SwiGLU ffn 3,072) is 113.3M + embeddings and head = 114.1M.
    # 384 rows = 256 bytes + special tokens, padded to a multiple of 128.
    "bybert-100m": dict(
        LLAMA_ENCODER, vocab_size=384, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
        ffn_hidden_size=3072, qkv_bias=True, max_position_embeddings=4096),
    # Card: MegatronBERT with pre-norm, SwiGLU, GQA ("multi-query"), learned positions (2,048), 48 layers,
    # hidden 1,536, ffn 4,096, 24 heads, llm-jp vocab; 1.30B total, 1.15B without embeddings.
    # Derived: one KV head (multi-query) and a tied transform head give 1.300B total, 1.144B non-embedding.
    "retrieva-bert-1.3b": dict(
        norm="layernorm", norm_bias=True, norm_position="pre", activation="swiglu",
        position_embedding="learned", max_position_embeddings=2048, final_norm=True,
        qkv_bias=True, attn_out_bias=True, mlp_bias=True,
        head_type="transform", head_bias=True, decoder_bias=True, tie_embeddings=True,
        vocab_size=99_584, hidden_size=1536, num_layers=48, num_heads=24, num_kv_heads=1,
        ffn_hidden_size=4096),
    # Tests and demos (docs/DESIGN.md §4). Vocabulary from the tokenizer.
    "tiny": dict(
        LLAMA_ENCODER, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
        max_position_embeddings=2048),
    "tiny-modernbert": dict(
        MODERNBERT, hidden_size=64, num_layers=6, num_heads=4, ffn_hidden_size=128, sliding_window=16,
        max_position_embeddings=2048),
    "tiny-bert": dict(BERT, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=128),
}

# (total, non-embedding) parameter counts reported on the model cards; None where a card gives none.
REPORTED_PARAMS = {
    "modernbert-ja-130m": (132e6, 80e6),
    "llm-jp-modernbert-base": (187e6, None),
    "tohoku-bert-500m": (581e6, None),
    "bybert-100m": (114e6, None),
    "retrieva-bert-1.3b": (1.30e9, 1.15e9),
}


def preset_fields(name: str, source: str = "config") -> dict:
    """The ModelConfig fields of a preset, as a dict (a run config lays its own keys over them)."""
    if name not in PRESETS:
        raise ConfigError(f"{source}: model.preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    return {"preset": name, **PRESETS[name]}


def preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a preset, with field overrides (checked like a config file's)."""
    return ModelConfig(**{**preset_fields(name), **overrides})
