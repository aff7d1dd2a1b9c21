"""The checkpoint directory on disk: finding `latest`, reading and checking an iteration folder,
publishing a complete one and pruning old ones (the package's __init__.py describes the layout;
checkpointer.py holds the readers and writers of tensors)."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import uuid
from pathlib import Path

import torch
import yaml

from megatron_jp.config import Config, ConfigError, config_from_dict, to_yaml
from megatron_jp.models.config import ModelConfig
from megatron_jp.files import describe_os_error, fsync_dir, remove_quietly
from megatron_jp.parallel.model import full_shapes
from megatron_jp.training.checkpoint import dcp_pieces, manifest
from megatron_jp.training.checkpoint.manifest import CONFIG, META, ManifestError, write_durably

LATEST = "latest"
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."
RANK_STATE = "rank_state"
MOMENTS = ("exp_avg", "exp_avg_sq")
_ITERATION = re.compile(r"iter_\d{7,}")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written; the message names the file and what to do."""


def iteration_name(step: int) -> str:
    return f"iter_{step:07d}"


def new_run_id() -> str:
    return uuid.uuid4().hex


# ----------------------------------------------------------------------------- finding and checking


def iteration_folders(ckpt_dir: Path) -> list[Path]:
    """The iter_<digits> folders of a checkpoint directory, oldest step first (not iter_backup/)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _ITERATION.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def listing(folders: list[Path], limit: int = 8) -> str:
    def state(p: Path) -> str:
        return "complete" if (p / META).is_file() and (p / ".metadata").is_file() else "incomplete"

    shown = [f"{p.name} ({state(p)})" for p in folders[-limit:]]
    more = f"{len(folders) - limit} older and " if len(folders) > limit else ""
    return f"{more}{', '.join(shown)}"


def find_latest(ckpt_dir: str | os.PathLike) -> Path | None:
    """The iteration folder `latest` names, or None when the directory holds no checkpoint at all.

    iter_* folders without `latest` are refused rather than guessed at: `latest` is written last, so
    its absence means someone removed it, copied folders in, or pointed two runs here. Starting at step
    0 would mix two runs and prune the old checkpoints; resuming from the newest folder could continue
    someone else's run. The message lists the folders and the one command that resumes."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST
    if not os.path.lexists(latest):
        folders = iteration_folders(ckpt_dir)
        if folders:
            raise CheckpointError(
                f"{ckpt_dir} holds checkpoints but no `{LATEST}` file naming the one to resume from: "
                f"{listing(folders)}. To resume, name a complete one: echo {folders[-1].name} > {latest}; "
                f"to start a new run, use another checkpoint.dir (or run.dir)")
        return None
    if not latest.is_file():
        raise CheckpointError(f"{latest} is not a file: it must be a text file holding the name of an iter_* "
                              f"folder of {ckpt_dir}; remove it and write one (echo iter_0000100 > {latest})")
    with open(latest, "rb") as f:
        raw = f.read(256)
    name = raw.decode("ascii", errors="replace").strip()
    if not _ITERATION.fullmatch(name):
        raise CheckpointError(f"{latest} holds {name[:40]!r}, not the name of an iter_* folder: write the name of a "
                              f"complete folder of {ckpt_dir} into it (echo iter_0000100 > {latest})")
    target = ckpt_dir / name
    if not (target / ".metadata").is_file():
        raise CheckpointError(f"{latest} names {target.name}, which is missing or incomplete: point it at a "
                              f"complete iter_* folder of {ckpt_dir}, or remove it to start afresh")
    return target


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """An iteration folder, from itself or from a checkpoint directory holding `latest`."""
    path = Path(path)
    if (path / ".metadata").exists():
        return path
    target = find_latest(path)
    if target is None:
        raise CheckpointError(f"{path} is neither a checkpoint iteration folder (no .metadata) "
                              f"nor a checkpoint directory (no {LATEST} file)")
    return target


def read_config(iter_dir: Path) -> Config:
    path = iter_dir / CONFIG
    if not path.exists():
        raise CheckpointError(f"{path} is missing: every checkpoint folder stores its run configuration; "
                              f"restore it from the run's YAML or load another iteration")
    try:
        return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))
    except (yaml.YAMLError, ConfigError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid run configuration ({e}); restore it from the run's "
                              f"YAML or load another iteration") from None


def read_meta(iter_dir: Path) -> dict:
    path = iter_dir / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the folder is not a complete checkpoint; "
                              f"load another iteration") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); load another iteration") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("meta", {}), dict) \
            or not isinstance(meta.get("files", {}), dict):
        raise CheckpointError(f"{path} does not hold a checkpoint record (a JSON object with 'meta' and "
                              f"'files'); load another iteration")
    return meta


def _meta_or_none(iter_dir: Path) -> dict | None:
    try:
        return read_meta(iter_dir)
    except (CheckpointError, OSError):
        return None


def check_files(iter_dir: Path, info: dict, rank: int = 0, world: int = 1, hashes: bool = True):
    """Sizes of every data file meta.json lists, then (hashes=True) the SHA-256 of this rank's share
    and of .metadata (every rank unpickles it); raises CheckpointError naming the file."""
    files = info.get("files", {})
    try:
        manifest.check_sizes(iter_dir, files)
        if hashes:
            manifest.check_hashes(iter_dir, files, rank, world, first=(".metadata",))
    except ManifestError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{iter_dir}: cannot read the checkpoint ({e}); load another iteration") from None


def check_same_shapes(saved: ModelConfig, current: ModelConfig, iter_dir: Path):
    """Refuse a checkpoint of another model; other settings (rope_theta, seq_length, ...) may differ."""
    before, now = full_shapes(saved), full_shapes(current)
    for name in dict.fromkeys([*before, *now]):
        if before.get(name) != now.get(name):
            raise CheckpointError(
                f"{iter_dir / CONFIG} describes another model: {name} is {_shape(before.get(name))} in the "
                f"checkpoint and {_shape(now.get(name))} in this run; use the model settings of that file")


def _shape(shape) -> str:
    return "absent" if shape is None else str(tuple(shape))


def saved_shapes(iter_dir: Path) -> dict[str, tuple[int, ...]]:
    try:
        return dcp_pieces.saved_shapes(iter_dir)
    except dcp_pieces.MetadataRefused as e:
        raise CheckpointError(f"{iter_dir / '.metadata'} refused: {e}") from None
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError) as e:
        # what unpickling a damaged or foreign file raises
        raise CheckpointError(f"{iter_dir / '.metadata'} cannot be read ({type(e).__name__}: {e}); "
                              f"load an earlier iteration") from None


def _first_line(e: BaseException) -> str:
    """DCP's CheckpointException carries every rank's traceback: name the root cause, not the wrapper."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, pair = next(iter(failures.items()))
        inner = pair[0] if isinstance(pair, tuple) else pair
        if isinstance(inner, BaseException):
            return f"rank {rank}: {_first_line(inner)}"
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def interrupted(e: BaseException) -> bool:
    """Whether `e` is, or DCP's CheckpointException wraps, a KeyboardInterrupt (a second Ctrl-C during
    a save): the run then exits at once with status 130 instead of reporting a failed write."""
    if isinstance(e, KeyboardInterrupt):
        return True
    failures = getattr(e, "failures", None)
    inner = [pair[0] if isinstance(pair, tuple) else pair for pair in (failures or {}).values()]
    return any(isinstance(x, BaseException) and interrupted(x) for x in inner)


def read_error(iter_dir: Path, e: BaseException) -> CheckpointError:
    reason = describe_os_error(e) or _first_line(e)
    return CheckpointError(f"{iter_dir}: cannot read the tensors, a shard is missing or damaged "
                           f"({reason}); load an earlier iteration")


def write_error(what, e: BaseException) -> CheckpointError:
    reason = describe_os_error(e)
    if reason is None:
        return CheckpointError(f"writing {what} failed ({_first_line(e)}); the previous checkpoint stays the latest")
    return CheckpointError(f"writing {what} failed: {reason}; the previous checkpoint stays the latest")


# ----------------------------------------------------------------------------- finite weights


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in `tensor`: one pass without a temporary (a finite sum), exact where the sum
    is not finite (NaN/inf propagate; a sum of huge finite values may overflow)."""
    if tensor.numel() == 0:
        return True
    if math.isfinite(torch.sum(tensor, dtype=torch.float32).item()):
        return True
    return bool(torch.isfinite(tensor).all())


def non_finite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in tensors.items() if t.is_floating_point() and not is_finite(t)]


# ----------------------------------------------------------------------------- writing and publishing


def _write_durably(path: Path, text: str):
    write_durably(path, text.encode("utf-8"))


def write_metadata(folder: Path, cfg: Config, info: dict, hashed: dict[str, tuple[int, str]] | None = None):
    """config.yaml, then meta.json with the manifest of the data files already in `folder`."""
    _write_durably(folder / CONFIG, to_yaml(cfg))
    files = manifest.build(folder, hashed)
    _write_durably(folder / META, json.dumps({**info, "files": files}, indent=2) + "\n")


def start_folder(ckpt_dir: Path, step: int) -> Path:
    """A fresh CKPT_DIR/.iter_XXXXXXX.tmp; removes what killed saves left behind (the caller holds the
    directory's lock: no other live process writes here). Rank 0 only."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".iter_*.tmp"):
        remove_quietly(stale)
    remove_quietly(ckpt_dir / f".{LATEST}.tmp")
    tmp = ckpt_dir / f".{iteration_name(step)}.tmp"
    (tmp / RANK_STATE).mkdir(parents=True)
    return tmp


def refuse_foreign(ckpt_dir: Path, step: int, run_id: str):
    """Saving `step` may replace its folder only if this run wrote it."""
    final = ckpt_dir / iteration_name(step)
    if final.exists():
        meta = _meta_or_none(final) or {}
        if meta.get("run_id") != run_id:
            raise CheckpointError(f"{final} exists and was not written by this run (another run, a tool, or a "
                                  f"copy): it is not replaced. Move it away or use another checkpoint.dir")


def publish(ckpt_dir: Path, tmp: Path, step: int, keep: int, run_id: str | None = None,
            point_latest: bool = True) -> Path:
    """Rename the complete `tmp` to iter_<step>, point `latest` at it, prune this run's folders beyond
    `keep` (0: keep all)."""
    final = ckpt_dir / iteration_name(step)
    replaced = None
    if final.exists():  # the same step saved again by this run, e.g. resumed from it (refuse_foreign checked)
        replaced = ckpt_dir / f".{final.name}.replaced.tmp"
        os.replace(final, replaced)
    os.replace(tmp, final)
    if point_latest:
        pointer = ckpt_dir / f".{LATEST}.tmp"
        _write_durably(pointer, final.name + "\n")
        os.replace(pointer, ckpt_dir / LATEST)
    fsync_dir(ckpt_dir)
    if replaced is not None:
        remove_quietly(replaced)
    if run_id is not None:
        prune(ckpt_dir, keep, final, run_id)
    return final


def prune(ckpt_dir: Path, keep: int, newest: Path, run_id: str):
    """Delete all but the `keep` most recent iteration folders that this run wrote; `newest` (just
    published) always stays, and so does the newest folder with finite weights. Folders of other runs,
    of tools, or of unknown origin are never deleted."""
    if keep <= 0:
        return
    own = [(p, meta) for p in iteration_folders(ckpt_dir) if p.name != newest.name
           and (meta := _meta_or_none(p)) is not None and meta.get("run_id") == run_id]
    protected = set()
    if not (_meta_or_none(newest) or {}).get("weights_finite", False):
        finite = [p.name for p, meta in own if meta.get("weights_finite")]
        protected = set(finite[-1:])
    doomed = [p for p, _ in own[:max(len(own) - (keep - 1), 0)] if p.name not in protected]
    for old in doomed:
        doomed_tmp = ckpt_dir / f".{old.name}.deleting.tmp"  # a killed deletion leaves only a stale .tmp
        os.replace(old, doomed_tmp)
        remove_quietly(doomed_tmp)
