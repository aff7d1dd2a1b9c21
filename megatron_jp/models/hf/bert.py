"""Classic BERT (post-norm, learned positions, token types, GELU) <-> transformers' BertForMaskedLM."""

from __future__ import annotations

from megatron_jp.models.config import ModelConfig
from megatron_jp.models.hf.keymap import Entry, unmet, linear, norm, one, qkv_sizes, split

ARCHITECTURE = "BertForMaskedLM"
MODEL_TYPE = "bert"


def unsupported(cfg: ModelConfig) -> str | None:
    """Why this class cannot hold `cfg` (the conditions it fails), or None when it can."""
    return unmet({
        "norm=layernorm with bias": cfg.norm == "layernorm" and cfg.norm_bias,
        "norm_position=post": cfg.norm_position == "post",
        "activation=gelu": cfg.activation == "gelu",
        "position_embedding=learned": cfg.position_embedding == "learned",
        "token types (type_vocab_size > 0)": cfg.type_vocab_size > 0,
        "embedding_norm": cfg.embedding_norm,
        "first_layer_attn_norm": cfg.first_layer_attn_norm,
        "no final_norm": not cfg.final_norm,
        "global attention only": cfg.sliding_window == 0,
        "biases on every linear": cfg.qkv_bias and cfg.attn_out_bias and cfg.mlp_bias and cfg.head_bias,
        "head_type=transform with decoder bias": cfg.head_type == "transform" and cfg.decoder_bias,
        "head_activation=gelu": cfg.head_activation == "gelu",
        "tied embeddings": cfg.tie_embeddings,
        "multi-head attention (num_kv_heads = num_heads)": cfg.num_kv_heads == cfg.num_heads,
        "head_dim = hidden_size / num_heads": cfg.head_dim * cfg.num_heads == cfg.hidden_size,
    }, ARCHITECTURE)


def hf_config(cfg: ModelConfig, special: dict) -> dict:
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.ffn_hidden_size, "hidden_act": "gelu",
        "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std,
        "hidden_dropout_prob": cfg.hidden_dropout, "attention_probs_dropout_prob": cfg.attention_dropout,
        "tie_word_embeddings": True, "pad_token_id": special.get("pad", 0),
    }


def model_config(hf: dict) -> ModelConfig:
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"BERT hidden_act {hf.get('hidden_act')!r} is not supported (only exact gelu)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("BERT position_embedding_type must be 'absolute'")
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=hf.get("layer_norm_eps", 1e-12),
        init_std=hf.get("initializer_range", 0.02), hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        norm="layernorm", norm_bias=True, norm_position="post", activation="gelu",
        position_embedding="learned", embedding_norm=True, final_norm=False,
        qkv_bias=True, attn_out_bias=True, mlp_bias=True,
        head_type="transform", head_bias=True, decoder_bias=True, tie_embeddings=True,
    )


def entries(cfg: ModelConfig) -> list[Entry]:
    emb = "bert.embeddings."
    out = [one("embeddings.tok.weight", emb + "word_embeddings.weight"),
           one("embeddings.pos.weight", emb + "position_embeddings.weight"),
           one("embeddings.types.weight", emb + "token_type_embeddings.weight"),
           *norm(cfg, "embeddings.norm", emb + "LayerNorm")]
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}.", f"bert.encoder.layer.{i}."
        qkv = tuple(f"{hf}attention.self.{p}" for p in ("query", "key", "value"))
        out += [split(ours + "attn.qkv.weight", tuple(n + ".weight" for n in qkv), qkv_sizes(cfg)),
                split(ours + "attn.qkv.bias", tuple(n + ".bias" for n in qkv), qkv_sizes(cfg)),
                *linear(ours + "attn.out", hf + "attention.output.dense", True),
                *norm(cfg, ours + "attn_norm", hf + "attention.output.LayerNorm"),
                *linear(ours + "mlp.fc1", hf + "intermediate.dense", True),
                *linear(ours + "mlp.fc2", hf + "output.dense", True),
                *norm(cfg, ours + "mlp_norm", hf + "output.LayerNorm")]
    pred = "cls.predictions."
    return out + [*linear("head.dense", pred + "transform.dense", True),
                  *norm(cfg, "head.norm", pred + "transform.LayerNorm"),
                  one("head.decoder.bias", pred + "bias")]
