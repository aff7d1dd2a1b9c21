"""`python -m megatron_jp.train --config FILE.yaml [--section.key VALUE ...] [--dry-run]`.

Runs as a plain process, under torchrun or under srun. `--dry-run` validates the configuration,
builds the model on the meta device (no memory, no GPU) and prints, as its last line, one JSON object
with the parameter counts and the per-rank memory estimate of the configured parallel layout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_jp.config import (Config, ConfigError, check_vocab, data_parallel_size, describe, load_config,
                                padded_vocab_size, validate_layout, validate_model)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m megatron_jp.train", allow_abbrev=False,
        description="Pretrain a Japanese encoder. Any config key can be overridden: --section.key VALUE.")
    parser.add_argument("--config", help="YAML file with sections model, data, train, optim, parallel, ...")
    parser.add_argument("--dry-run", action="store_true", help="validate, count parameters, estimate memory")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its meaning")
    return parser.parse_known_args(argv)


def world_size_from_env(cfg: Config) -> int:
    """The launcher's world size; a dry run outside a launcher assumes the configured layout."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if var in os.environ:
            return int(os.environ[var])
    p = cfg.parallel
    return p.tensor * p.pipeline * max(p.data, 1)


def resolve_vocab(cfg: Config, require_tokenizer: bool = True) -> None:
    """Fill model.vocab_size from the tokenizer (padded), or check that the fixed size covers it.

    A dry run of a preset that fixes its vocabulary may name a tokenizer that is not on this machine
    yet (planning a cluster run): then the check is skipped with a note instead of failing.
    """
    m, d = cfg.model, cfg.data
    needs_file = d.tokenizer_type != "ByteTokenizer"
    if m.vocab_size == 0 and needs_file and not os.path.exists(d.tokenizer_model):
        raise ConfigError(f"model.vocab_size is 0 (take it from the tokenizer) but data.tokenizer_model "
                          f"({d.tokenizer_model or 'empty'}) does not exist: set it, or model.vocab_size")
    if m.vocab_size and not (needs_file and os.path.exists(d.tokenizer_model)):
        if require_tokenizer and needs_file:
            raise ConfigError(f"data.tokenizer_model {d.tokenizer_model or '(empty)'} does not exist")
        if not require_tokenizer:
            print(f"note: tokenizer {d.tokenizer_model or d.tokenizer_type} not loaded; vocabulary check skipped")
            return
    from megatron_jp.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model)
    source = d.tokenizer_model or d.tokenizer_type
    if m.vocab_size == 0:
        m.vocab_size = padded_vocab_size(tokenizer.vocab_size, m, cfg.parallel.tensor)
    check_vocab(m, tokenizer.vocab_size, source)
    validate_model(m, cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.virtual_pipeline)


def dry_run(cfg: Config) -> dict:
    from megatron_jp.models import count_parameters
    from megatron_jp.models.encoder import build_encoder

    world = world_size_from_env(cfg)
    validate_layout(cfg, world)
    resolve_vocab(cfg, require_tokenizer=False)
    counts = count_parameters(build_encoder(cfg.model, device="meta"))
    p = cfg.parallel
    summary = {**counts, "preset": cfg.model.preset or None, "vocab_size": cfg.model.vocab_size,
               "world_size": world, "tensor": p.tensor, "pipeline": p.pipeline,
               "data": data_parallel_size(cfg, world), "zero1": p.zero1, "precision": cfg.train.precision}
    summary.update(memory_estimate(cfg, world))
    return summary


def memory_estimate(cfg: Config, world: int) -> dict:
    try:
        from megatron_jp.parallel import estimate_memory
    except ImportError:  # the parallel package is optional for a model-only install
        return {}
    return {"memory_per_rank_bytes": estimate_memory(cfg, world)}


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        print(describe())
        return 0
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            summary = dry_run(cfg)
            print(f"model: {summary['params_total']:,} parameters "
                  f"({summary['params_non_embedding']:,} without embeddings)")
            print(json.dumps(summary))
            return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megatron_jp.training.train import run

    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
