"""Build the sample indices of a training config ahead of the job (e.g. in a CPU job before the GPU job).

    python tools/build_index.py --config examples/tohoku-bert-500m.yaml [--section.key VALUE ...] [--verify]

Builds (or finds ready) in data.cache_dir the packed rows of every source of data.paths, train and
validation parts, for data.seq_length and every data.seq_length_stages length, and the blend table;
checks every shard's provenance sidecar against the tokenizer; prints the per-source table the
training prints at start. The keys are those training computes from the same config, so the job
maps them without building. --verify also checks the full checksum of every entry (reads all of it).
Exit status 2 with one `error:` line on bad input; 1 when --verify finds a damaged entry.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jp.config import ConfigError, load_config, validate  # noqa: E402
from megatron_jp.train import world_size_from_env  # noqa: E402


def build(cfg):
    """(train loader, valid loader or None, batch-size schedule) with every stage's index built."""
    from megatron_jp.data.loader import build_data_loaders
    from megatron_jp.data.tokenizers import build_tokenizer
    from megatron_jp.training.schedules import Curricula

    d, t = cfg.data, cfg.train
    curricula = Curricula.from_config(cfg)
    tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model)
    train, valid = build_data_loaders(d, tokenizer, micro_batch_size=t.micro_batch_size, dp_rank=0, dp_size=1,
                                      seed=t.seed, global_batch_size=t.global_batch_size,
                                      mask_prob_at=curricula.mask_prob, seq_length_at=curricula.seq_length,
                                      step_of=curricula.batch.step_of)
    return train, valid, curricula.batch


def entries(*loaders) -> list[str]:
    """Folders of every rows entry the loaders mapped."""
    paths = []
    for loader in filter(None, loaders):
        for src in loader.mlm.sources:
            paths += [rows.path for rows in src._rows.values()]
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="training YAML (the same as for megatron_jp.train)")
    p.add_argument("--verify", action="store_true", help="also check the full checksum of every entry")
    args, overrides = p.parse_known_args(argv)
    t0 = time.perf_counter()
    try:
        cfg = load_config(args.config, overrides)
        validate(cfg, world_size_from_env(cfg))
        train, valid, batch = build(cfg)
    except (ConfigError, ValueError, OSError) as err:  # bad input (a CacheError names data.cache_dir)
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(train.summary(cfg.train.steps, batch.consumed_at))
    if args.verify:
        from megatron_jp.data.index_cache import verify

        bad = {path: verify(path) for path in entries(train, valid)}
        bad = {path: names for path, names in bad.items() if names}
        for path, names in bad.items():
            print(f"error: {path}: {', '.join(names)} differ from the manifest's checksum; delete the folder "
                  "and rerun to rebuild it", file=sys.stderr)
        if bad:
            return 1
        print(f"verified {len(entries(train, valid))} entries")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
