"""What a run settles before any process group exists, after the one validation of its config
(config.validate, for the launcher's world size): where it starts from, and its vocabulary.

    validate(cfg, world)                    # once per run, at this boundary
    start = starting_checkpoint(cfg)        # CKPT_DIR/latest, else checkpoint.load, else None
    resolve_vocab(cfg, start)               # model.vocab_size from the checkpoint or the tokenizer
    check_continuation(cfg, start)          # the same model and tokenizer as the checkpoint's
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_jp.config import Config, ConfigError, check_vocab, padded_vocab_size
from megatron_jp.data import provenance
from megatron_jp.data.tokenizers import build_tokenizer
from megatron_jp.training.checkpoint import find_latest, read_config, read_meta, resolve_checkpoint

# Model keys a new phase (checkpoint.load) may change: context extension (RoPE bases, positions,
# windows) and regularisation; none changes a weight's meaning.
PHASE_KEYS = {"rope_theta", "local_rope_theta", "max_position_embeddings", "sliding_window", "hidden_dropout",
              "attention_dropout"}
# Never compared: names and choices of implementation, not the model (the vocabulary is compared as
# vocab_size; the initialisation does not matter to loaded weights).
NOT_MODEL = {"preset", "attention_backend", "init_std", "make_vocab_size_divisible_by"}


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.run.dir) / "checkpoints")


@dataclass(frozen=True)
class Start:
    """The checkpoint a run starts from."""

    path: Path  # an iteration folder
    resume: bool  # True: this run's CKPT_DIR/latest, continued; False: checkpoint.load, a new phase


def starting_checkpoint(cfg: Config) -> Start | None:
    """CKPT_DIR/latest (resume), else checkpoint.load (a new phase), else None (a fresh start)."""
    latest = find_latest(checkpoint_dir(cfg))
    if latest is not None:
        return Start(latest, resume=True)
    if cfg.checkpoint.load:
        return Start(resolve_checkpoint(cfg.checkpoint.load), resume=False)
    return None


def resolve_vocab(cfg: Config, start: Start | None = None, require_tokenizer: bool = True):
    """Fill model.vocab_size (0: take it) from the starting checkpoint or the tokenizer (padded for
    tensor parallelism), or check that a fixed size covers the tokenizer. Runs after validate(),
    which checked a fixed size against parallel.tensor. Returns the tokenizer, built here once for the
    whole run (None when a dry run skipped it).

    A checkpoint's padded size is kept: it depends on the tensor-parallel size that wrote it. A dry
    run of a preset that fixes its vocabulary may name a tokenizer that is not on this machine yet
    (planning a cluster run): then the check is skipped with a note instead of failing.
    """
    d = cfg.data
    if start is not None and cfg.model.vocab_size == 0:
        rows = read_config(start.path).model.vocab_size
        if rows % cfg.parallel.tensor:
            raise ConfigError(f"{start.path} has {rows} vocabulary rows, not divisible by parallel.tensor "
                              f"({cfg.parallel.tensor}): resume with a tensor-parallel size that divides it")
        cfg.model = dataclasses.replace(cfg.model, vocab_size=rows)
    m = cfg.model
    needs_file = d.tokenizer_type != "ByteTokenizer"
    if m.vocab_size == 0 and needs_file and not os.path.exists(d.tokenizer_model):
        raise ConfigError(f"model.vocab_size is 0 (take it from the tokenizer) but data.tokenizer_model "
                          f"({d.tokenizer_model or 'empty'}) does not exist: set it, or model.vocab_size")
    if m.vocab_size and not (needs_file and os.path.exists(d.tokenizer_model)):
        if require_tokenizer and needs_file:
            raise ConfigError(f"data.tokenizer_model {d.tokenizer_model or '(empty)'} does not exist")
        if not require_tokenizer:
            print(f"note: tokenizer {d.tokenizer_model or d.tokenizer_type} not loaded; vocabulary check skipped")
            return None
    tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model)
    if m.vocab_size == 0:
        rows = padded_vocab_size(tokenizer.vocab_size, m, cfg.parallel.tensor)
        cfg.model = m = dataclasses.replace(m, vocab_size=rows)
    check_vocab(m, tokenizer.vocab_size, d.tokenizer_model or d.tokenizer_type)
    return tokenizer


def check_continuation(cfg: Config, start: Start | None, tokenizer) -> None:
    """Refuse to continue a checkpoint with another model or tokenizer than the one it was trained
    with, naming each key and both values, unless checkpoint.allow_changes names it (a new phase
    may change PHASE_KEYS): only tensor shapes would be compared otherwise, and a changed activation,
    norm or tokenizer of the same vocabulary size trains on silently."""
    if start is None:
        return
    allowed = {k.strip() for k in cfg.checkpoint.allow_changes.split(",") if k.strip()}
    allowed |= set() if start.resume else PHASE_KEYS
    saved, mine = read_config(start.path).model, cfg.model
    changed = [f"model.{f.name}: {getattr(saved, f.name)!r} in the checkpoint, {getattr(mine, f.name)!r} now"
               for f in dataclasses.fields(mine)
               if f.name not in NOT_MODEL | allowed and getattr(saved, f.name) != getattr(mine, f.name)]
    theirs = read_meta(start.path).get("meta", {}).get("tokenizer")
    ours = provenance.tokenizer_info(tokenizer) if theirs and "tokenizer" not in allowed else None
    if ours is not None and provenance.tokenizer_differences(theirs, ours):
        changed.append(f"tokenizer: {provenance.describe_tokenizer(theirs)} in the checkpoint, "
                       f"{provenance.describe_tokenizer(ours)} now")
    if changed:
        how = "resume" if start.resume else "new phase"
        raise ConfigError(f"{start.path} was trained with another model than this {how} configures: "
                          f"{'; '.join(changed)}. Use the checkpoint's values, or name the keys in "
                          f"checkpoint.allow_changes if the change is meant (e.g. \"{_names(changed)}\")")


def _names(changed: list[str]) -> str:
    return ",".join(c.split(":")[0].removeprefix("model.") for c in changed)
