"""Named architectures: the five seed models of shared/seeds and tiny shapes for tests and demos.

A preset is a plain dict of ModelConfig fields (this module imports nothing: megatron_jp.config,
the bottom layer, reads it); fields written next to `model.preset` in a config override it.
`megatron_jp.config.preset(name, **overrides)` gives the ModelConfig. Where a model card leaves a field open it is derived from the card's parameter counts, and the
comment says how; tests/unit/test_presets.py holds every preset to its card within 2%.
"""

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
    # Tests and demos (DESIGN.md §4). Vocabulary from the tokenizer.
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

