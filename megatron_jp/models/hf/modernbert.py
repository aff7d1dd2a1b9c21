"""ModernBERT <-> transformers' ModernBertForMaskedLM.

Our fused qkv ([all q; all k; all v]) and fc1 ([activated; linear]) have exactly the layout of
ModernBERT's Wqkv and Wi, so no tensor is split. The config is written with the v4 keys
(global_rope_theta, local_rope_theta, global_attn_every_n_layers, local_attention), which
transformers 4.48+ and 5.x both read.
"""

from __future__ import annotations

from megatron_jp.models.config import ModelConfig
from megatron_jp.models.hf.keymap import Entry, unmet, linear, norm, one

ARCHITECTURE = "ModernBertForMaskedLM"
MODEL_TYPE = "modernbert"
ACTIVATIONS = {"geglu": "gelu", "geglu_tanh": "gelu_pytorch_tanh"}  # our GLU -> hidden_activation
HEAD_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}  # our head -> classifier_activation


def unsupported(cfg: ModelConfig) -> str | None:
    """Why this class cannot hold `cfg` (the conditions it fails), or None when it can."""
    return unmet({
        "norm=layernorm": cfg.norm == "layernorm",
        "norm_position=pre": cfg.norm_position == "pre",
        "activation=geglu or geglu_tanh": cfg.activation in ACTIVATIONS,
        "position_embedding=rope": cfg.position_embedding == "rope",
        "embedding_norm": cfg.embedding_norm,
        "no first-layer attention norm": not cfg.first_layer_attn_norm,
        "final_norm": cfg.final_norm,
        "no token types": cfg.type_vocab_size == 0,
        "head_type=transform": cfg.head_type == "transform",
        "multi-head attention (num_kv_heads = num_heads)": cfg.num_kv_heads == cfg.num_heads,
        "head_dim = hidden_size / num_heads": cfg.head_dim * cfg.num_heads == cfg.hidden_size,
        "qkv_bias == attn_out_bias": cfg.qkv_bias == cfg.attn_out_bias,
    }, ARCHITECTURE)


def hf_config(cfg: ModelConfig, special: dict) -> dict:
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.ffn_hidden_size,
        "hidden_activation": ACTIVATIONS[cfg.activation], "classifier_activation": HEAD_ACTIVATIONS[cfg.head_activation],
        "max_position_embeddings": cfg.max_position_embeddings, "norm_eps": cfg.norm_eps,
        "norm_bias": cfg.norm_bias, "attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias,
        "classifier_bias": cfg.head_bias, "decoder_bias": cfg.decoder_bias,
        "global_rope_theta": cfg.rope_theta, "local_rope_theta": cfg.local_rope_theta or cfg.rope_theta,
        "global_attn_every_n_layers": cfg.global_attn_every_n_layers if cfg.sliding_window else 1,
        "local_attention": cfg.sliding_window or 128,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "attention_dropout": cfg.attention_dropout, "embedding_dropout": cfg.hidden_dropout,
        "mlp_dropout": cfg.hidden_dropout,
        "pad_token_id": special.get("pad", 0), "cls_token_id": special.get("cls"),
        "sep_token_id": special.get("sep"), "bos_token_id": special.get("cls"), "eos_token_id": special.get("sep"),
    }


def _rope_theta(hf: dict, layer_type: str, v4_key: str, default: float) -> float:
    params = (hf.get("rope_parameters") or {}).get(layer_type) or {}
    return float(params.get("rope_theta", hf.get(v4_key, default)))


def _global_every(hf: dict) -> int:
    if "global_attn_every_n_layers" in hf:
        return int(hf["global_attn_every_n_layers"])
    types = hf.get("layer_types") or ["full_attention"]  # 5.x writes the pattern itself
    local = [i for i, t in enumerate(types) if t != "full_attention"]
    return local[0] + 1 if local else 1


def _ours(names: dict[str, str], hf: dict, key: str) -> str:
    ours = {v: k for k, v in names.items()}.get(hf.get(key, "gelu"))
    if ours is None:
        raise ValueError(f"ModernBERT {key} {hf.get(key)!r} is not supported; supported: {', '.join(names.values())}")
    return ours


def model_config(hf: dict) -> ModelConfig:
    every = _global_every(hf)
    activation = _ours(ACTIVATIONS, hf, "hidden_activation")
    head_activation = _ours(HEAD_ACTIVATIONS, hf, "classifier_activation")
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"], activation=activation,
        max_position_embeddings=hf.get("max_position_embeddings", 8192), norm_eps=hf.get("norm_eps", 1e-5),
        norm_bias=bool(hf.get("norm_bias", False)), qkv_bias=bool(hf.get("attention_bias", False)),
        attn_out_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
        head_bias=bool(hf.get("classifier_bias", False)), decoder_bias=bool(hf.get("decoder_bias", True)),
        rope_theta=_rope_theta(hf, "full_attention", "global_rope_theta", 160000.0),
        local_rope_theta=_rope_theta(hf, "sliding_attention", "local_rope_theta", 10000.0),
        sliding_window=int(hf.get("local_attention", 128)) if every > 1 else 0,
        global_attn_every_n_layers=every, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init_std=hf.get("initializer_range", 0.02), attention_dropout=hf.get("attention_dropout", 0.0),
        hidden_dropout=hf.get("mlp_dropout", 0.0),
        norm="layernorm", norm_position="pre", position_embedding="rope", embedding_norm=True,
        first_layer_attn_norm=False, final_norm=True, head_type="transform", head_activation=head_activation,
    )


def entries(cfg: ModelConfig) -> list[Entry]:
    out = [one("embeddings.tok.weight", "model.embeddings.tok_embeddings.weight"),
           *norm(cfg, "embeddings.norm", "model.embeddings.norm")]
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        if i > 0:
            out += norm(cfg, ours + "attn_norm", hf + "attn_norm")
        out += [*linear(ours + "attn.qkv", hf + "attn.Wqkv", cfg.qkv_bias),
                *linear(ours + "attn.out", hf + "attn.Wo", cfg.attn_out_bias),
                *norm(cfg, ours + "mlp_norm", hf + "mlp_norm"),
                *linear(ours + "mlp.fc1", hf + "mlp.Wi", cfg.mlp_bias),
                *linear(ours + "mlp.fc2", hf + "mlp.Wo", cfg.mlp_bias)]
    out += [*norm(cfg, "final_norm", "model.final_norm"),
            *linear("head.dense", "head.dense", cfg.head_bias), *norm(cfg, "head.norm", "head.norm")]
    if not cfg.tie_embeddings:
        out.append(one("head.decoder.weight", "decoder.weight"))
    if cfg.decoder_bias:
        out.append(one("head.decoder.bias", "decoder.bias"))
    return out
