"""Data pipeline: tokenizers, word boundaries, Megatron indexed shards, packing, masking, loaders.

Modules: `tokenizers` (SentencePiece / Hugging Face / byte tokenizers, HF export), `segment` (word
spans and per-token word-start flags), `indexed` (Megatron .bin/.idx reader and writer), `preprocess`
(JSONL -> shards, behind tools/preprocess_data.py), `packing` (rows from documents), `masking` (MLM
masks), `datasets` (blends, splits, packed sources, MLM batches), `loader` (per-rank resumable loaders:
`build_data_loaders`).
"""
