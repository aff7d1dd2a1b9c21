"""Every rank trains the same run: before step 1 (before the model is even built) each rank compares
what it was started with against rank 0, and all refuse together when any differs.

What is compared is one flat mapping per rank: every key of the resolved configuration
(`optim.lr`, `model.vocab_size` after it was taken from the tokenizer, ...), the tokenizer's file
hash and, per data shard, its provenance (the sidecar's content and the files' sizes). Ranks first
exchange a SHA-256 of it (a few bytes each); only when those differ do they exchange the mappings,
so the message can name the first keys that differ with both values. Without this check, replicas
with another learning rate or seed diverge silently, and a shape difference surfaces later as a
peer that "stopped responding".
"""

from __future__ import annotations

import hashlib
import json
import os

import torch.distributed as dist

from megatron_jp.config import Config, ConfigError
from megatron_jp.data import indexed, provenance
from megatron_jp.data.datasets import parse_blend

SHOWN = 5  # differing keys named in the message; the rest are counted
# folders that may be node-local by design (TSUBAME's per-node $TMPDIR holds each node's index cache):
# they may differ between ranks, and what they hold is derived from the compared keys
NODE_LOCAL = {"data.cache_dir", "train.compile_cache_dir"}


class RanksDisagree(ConfigError):
    """The ranks were started with different configurations, tokenizers or data."""


def fingerprint(cfg: Config, tokenizer=None) -> dict[str, str]:
    """{key: value as text} for everything a rank must share with rank 0."""
    flat = {f"{section}.{key}": json.dumps(value, sort_keys=True, default=str)
            for section, values in cfg.to_dict().items() for key, value in values.items()
            if f"{section}.{key}" not in NODE_LOCAL}
    info = provenance.tokenizer_info(tokenizer) if tokenizer is not None else None
    if info is not None:
        flat["tokenizer.sha256"] = str(info["sha256"])
        flat["tokenizer.vocab_size"] = str(info["vocab_size"])
    for paths in (cfg.data.paths, cfg.data.valid_paths):
        for _, prefix in parse_blend(paths) if str(paths).strip() else []:
            flat[f"shard {prefix}"] = shard_provenance(prefix)
    return flat


def shard_provenance(prefix: str) -> str:
    """The sidecar's SHA-256 and the shard's file sizes: equal for copies of one shard on several nodes
    (no paths, inodes or times), different for another tokenization or another corpus."""
    parts = []
    for path in (provenance.sidecar_path(prefix), indexed.idx_path(prefix), indexed.bin_path(prefix)):
        try:
            size = os.path.getsize(path)
        except OSError:
            parts.append(f"{os.path.basename(path)} missing")
            continue
        if path.endswith(".json"):
            with open(path, "rb") as f:
                parts.append(f"sidecar sha256 {hashlib.sha256(f.read()).hexdigest()[:16]}")
        else:
            parts.append(f"{os.path.basename(path)} {size:,} bytes")
    return ", ".join(parts)


def digest(flat: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


def differences(mine: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """Keys whose values differ (or that one side lacks), in the configuration's order."""
    keys = list(mine) + [k for k in theirs if k not in mine]
    return [k for k in keys if mine.get(k) != theirs.get(k)]


def describe(rank: int, reference: dict[str, str], other: dict[str, str]) -> str:
    keys = differences(reference, other)
    shown = "; ".join(f"{k}: {reference.get(k, '(absent)')} on rank 0, {other.get(k, '(absent)')} on rank {rank}"
                      for k in keys[:SHOWN])
    more = f" (and {len(keys) - SHOWN} more keys)" if len(keys) > SHOWN else ""
    return (f"rank {rank} was started with another configuration than rank 0: {shown}{more}. Every rank must get "
            f"the same --config, overrides, tokenizer and data; check the launch script")


def agree(cfg: Config, tokenizer=None) -> None:
    """Raise the same RanksDisagree on every rank when any rank's fingerprint differs from rank 0's.
    A collective over the default group: call it on every rank, after init_process_group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = fingerprint(cfg, tokenizer)
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest(flat))
    if len(set(digests)) == 1:
        return
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, flat)  # only on a mismatch: the messages need the values
    first = next(r for r, d in enumerate(digests) if d != digests[0])
    raise RanksDisagree(describe(first, everyone[0], everyone[first]))
