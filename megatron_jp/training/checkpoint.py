"""Checkpoint layout (DESIGN.md §4) and the model-state readers used by the converters.

    CKPT_DIR/latest                  text: the name of the last complete iteration folder
    CKPT_DIR/iter_0000100/.metadata  torch.distributed.checkpoint (DCP) files; tensors under
    CKPT_DIR/iter_0000100/*.distcp     "model.<full parameter name>", unsharded names and shapes
    CKPT_DIR/iter_0000100/config.yaml  the resolved run configuration
    CKPT_DIR/iter_0000100/meta.json    step and bookkeeping

A folder is written under a temporary name and renamed when complete; `latest` is replaced last, so
a reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
import yaml

from megatron_jp.config import Config, ConfigError, config_from_dict

LATEST = "latest"
MODEL_PREFIX = "model."

# single-process save/load of DCP (converters, tools) is intended, not a forgotten init_process_group
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file."""


def iteration_name(step: int) -> str:
    return f"iter_{step:07d}"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """An iteration folder, from itself or from a checkpoint directory holding `latest`."""
    path = Path(path)
    if (path / ".metadata").exists():
        return path
    latest = path / LATEST
    if latest.exists():
        target = path / latest.read_text().strip()
        if not (target / ".metadata").exists():
            raise CheckpointError(f"{latest} names {target.name}, which is missing or incomplete")
        return target
    raise CheckpointError(f"{path} is neither a checkpoint iteration folder (no .metadata) "
                          f"nor a checkpoint directory (no {LATEST} file)")


def read_config(iter_dir: Path) -> Config:
    path = iter_dir / "config.yaml"
    if not path.exists():
        raise CheckpointError(f"{path} is missing: every checkpoint folder stores its run configuration")
    try:
        return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def write_atomically(ckpt_dir: Path, step: int, write_into) -> Path:
    """Call write_into(tmp_folder), then publish the folder as iter_<step> and point `latest` at it."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / iteration_name(step)
    tmp = ckpt_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_into(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = ckpt_dir / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, ckpt_dir / LATEST)
    return final


def save_model_checkpoint(ckpt_dir: str | os.PathLike, step: int, cfg: Config,
                          state: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
    """A checkpoint holding only model weights (e.g. imported from Hugging Face), single process."""

    if cfg.model.tie_embeddings:  # one tensor under two names: store it once
        state = {k: v for k, v in state.items() if k != "head.decoder.weight"}

    def write(folder: Path):
        dcp.save({MODEL_PREFIX + k: v.detach().contiguous() for k, v in state.items()},
                 checkpoint_id=str(folder), no_dist=True)
        write_metadata(folder, cfg, {"step": step, **(meta or {})})

    return write_atomically(Path(ckpt_dir), step, write)


def write_metadata(folder: Path, cfg: Config, meta: dict):
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_model_state(path: str | os.PathLike) -> tuple[Config, dict[str, torch.Tensor]]:
    """The full (unsharded) model state of a checkpoint, whatever layout wrote it; single process."""
    from megatron_jp.models.encoder import build_encoder

    iter_dir = resolve_checkpoint(path)
    cfg = read_config(iter_dir)
    shapes = build_encoder(cfg.model, device="meta").state_dict()
    state = {MODEL_PREFIX + k: torch.empty(v.shape, dtype=torch.float32) for k, v in shapes.items()}
    if cfg.model.tie_embeddings:  # stored once, under the embedding's name
        state.pop(MODEL_PREFIX + "head.decoder.weight")
    try:
        dcp.load(state, checkpoint_id=str(iter_dir), no_dist=True)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise CheckpointError(f"{iter_dir}: cannot read the model weights, a shard is missing or truncated "
                              f"({type(e).__name__}); use an earlier iteration folder") from None
    model = {k[len(MODEL_PREFIX):]: v for k, v in state.items()}
    if cfg.model.tie_embeddings:
        model["head.decoder.weight"] = model["embeddings.tok.weight"]
    return cfg, model
