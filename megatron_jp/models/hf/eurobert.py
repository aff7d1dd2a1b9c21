"""Llama-style encoder <-> transformers' EuroBertForMaskedLM.

EuroBERT has one `attention_bias` flag for q, k, v and o: a model with QKV bias only is written with
zero biases where it has none. Its MLM head is one Linear whose bias follows `mlp_bias`.
"""

from __future__ import annotations

from megatron_jp.models.config import ModelConfig
from megatron_jp.models.hf.keymap import Entry, unmet, one, qkv_sizes, split

ARCHITECTURE = "EuroBertForMaskedLM"
MODEL_TYPE = "eurobert"


def unsupported(cfg: ModelConfig) -> str | None:
    """Why this class cannot hold `cfg` (the conditions it fails), or None when it can."""
    return unmet({
        "norm=rmsnorm": cfg.norm == "rmsnorm",
        "norm_position=pre": cfg.norm_position == "pre",
        "activation=swiglu": cfg.activation == "swiglu",
        "position_embedding=rope": cfg.position_embedding == "rope",
        "no embedding_norm": not cfg.embedding_norm,
        "first_layer_attn_norm": cfg.first_layer_attn_norm,
        "final_norm": cfg.final_norm,
        "no token types": cfg.type_vocab_size == 0,
        "global attention only": cfg.sliding_window == 0,
        "head_type=linear": cfg.head_type == "linear",
        "decoder_bias == mlp_bias": cfg.decoder_bias == cfg.mlp_bias,
    }, ARCHITECTURE)


def hf_config(cfg: ModelConfig, special: dict) -> dict:
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_hidden_size, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.qkv_bias or cfg.attn_out_bias, "mlp_bias": cfg.mlp_bias,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "attention_dropout": cfg.attention_dropout,
        "pad_token_id": special.get("pad", 0), "bos_token_id": special.get("cls"),
        "eos_token_id": special.get("sep"), "mask_token_id": special.get("mask"),
    }


def model_config(hf: dict) -> ModelConfig:
    rope = hf.get("rope_parameters") or {}
    bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], num_kv_heads=hf.get("num_key_value_heads") or 0,
        head_dim=hf.get("head_dim") or 0, ffn_hidden_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 8192), norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        qkv_bias=bias, attn_out_bias=bias, mlp_bias=mlp_bias, decoder_bias=mlp_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02), attention_dropout=hf.get("attention_dropout", 0.0),
        norm="rmsnorm", norm_position="pre", activation="swiglu", position_embedding="rope", head_type="linear",
    )


def _bias(cfg: ModelConfig, ours: str, hf: str, present: bool, rows: int) -> Entry:
    return one(ours, hf) if present else Entry(None, (hf,), (), (rows,))


def entries(cfg: ModelConfig) -> list[Entry]:
    hf_bias = cfg.qkv_bias or cfg.attn_out_bias
    out = [one("embeddings.tok.weight", "model.embed_tokens.weight")]
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        names = tuple(f"{hf}self_attn.{p}_proj" for p in "qkv")
        out += [
            one(ours + "attn_norm.weight", hf + "input_layernorm.weight"),
            split(ours + "attn.qkv.weight", tuple(n + ".weight" for n in names), qkv_sizes(cfg)),
            one(ours + "attn.out.weight", hf + "self_attn.o_proj.weight"),
            one(ours + "mlp_norm.weight", hf + "post_attention_layernorm.weight"),
            split(ours + "mlp.fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                  (cfg.ffn_hidden_size,) * 2),
            one(ours + "mlp.fc2.weight", hf + "mlp.down_proj.weight"),
        ]
        if hf_bias:
            if cfg.qkv_bias:
                out.append(split(ours + "attn.qkv.bias", tuple(n + ".bias" for n in names), qkv_sizes(cfg)))
            else:
                out += [Entry(None, (n + ".bias",), (), (s,)) for n, s in zip(names, qkv_sizes(cfg))]
            out.append(_bias(cfg, ours + "attn.out.bias", hf + "self_attn.o_proj.bias",
                             cfg.attn_out_bias, cfg.hidden_size))
        if cfg.mlp_bias:
            out += [split(ours + "mlp.fc1.bias", (hf + "mlp.gate_proj.bias", hf + "mlp.up_proj.bias"),
                          (cfg.ffn_hidden_size,) * 2),
                    one(ours + "mlp.fc2.bias", hf + "mlp.down_proj.bias")]
    out.append(one("final_norm.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        out.append(one("head.decoder.weight", "lm_head.weight"))
    if cfg.decoder_bias:
        out.append(one("head.decoder.bias", "lm_head.bias"))
    return out
