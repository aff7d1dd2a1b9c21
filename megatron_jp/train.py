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

from megatron_jp.config import Config, ConfigError, data_parallel_size, describe, load_config, validate


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


def dry_run(cfg: Config) -> dict:
    from megatron_jp.models.encoder import build_encoder, count_parameters
    from megatron_jp.parallel.memory import estimate_memory, memory_warning
    from megatron_jp.precision import Precision
    from megatron_jp.training.startup import resolve_vocab

    world = world_size_from_env(cfg)
    validate(cfg, world)
    resolve_vocab(cfg, require_tokenizer=False)
    counts = count_parameters(build_encoder(cfg.model, device="meta"))
    p = cfg.parallel
    warning = memory_warning(cfg, world)
    if warning:
        print(f"warning: {warning}")
    return {**counts, "preset": cfg.model.preset or None, "vocab_size": cfg.model.vocab_size,
            "world_size": world, "tensor": p.tensor, "pipeline": p.pipeline,
            "data": data_parallel_size(cfg, world), "zero1": p.zero1, "precision": cfg.train.precision,
            "mfu_peak_tflops": Precision.of(cfg).peak_flops / 1e12,
            **estimate_memory(cfg, world)}


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
    from megatron_jp.training.runtime.stop import StopRequest

    stop = StopRequest()  # before torch is imported: a scheduler's warning during start-up is kept
    from megatron_jp.training.train import run

    return run(cfg, stop)


if __name__ == "__main__":
    sys.exit(main())
