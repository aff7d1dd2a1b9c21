"""Checkpoints: the layout (DESIGN.md §4), atomic publishing, the distributed Checkpointer and the
model-state readers used by the converters.

    CKPT_DIR/latest                         text: the name of the last complete iteration folder
    CKPT_DIR/iter_0000100/.metadata         torch.distributed.checkpoint (DCP) files. Tensors under
    CKPT_DIR/iter_0000100/__<rank>_0.distcp   "model.<full name>" (the single-process Encoder's names and
                                              shapes; a tied decoder once, under the embedding's name) and
                                              "optim.{exp_avg,exp_avg_sq,master}.<full name>" (master
                                              only when parameters are not fp32: otherwise the
                                              parameter is the master)
    CKPT_DIR/iter_0000100/rank_state/rank_00003.pt   each rank's own state (RNG, ...), torch.save
    CKPT_DIR/iter_0000100/config.yaml       the run configuration
    CKPT_DIR/iter_0000100/meta.json         {"meta": the caller's (step, consumed samples, ...),
                                              "world_size", "layout", "optimizer_step",
                                              "files": {relative path: bytes} of every data file}

Publishing: every rank writes into CKPT_DIR/.iter_0000100.tmp; when all have finished, rank 0 writes
config.yaml and meta.json, renames the folder to iter_0000100, replaces `latest` (temporary file +
os.replace) and prunes old iterations. A process killed at any point leaves `latest` naming the
previous complete folder; leftover .tmp folders are removed by the next save. (One exception: when
the same step is saved twice, the old folder is moved aside just before the new one takes its name.)

Reading refuses, with CheckpointError naming the file: a data file missing or of another size than
meta.json records (checked before any tensor is read), a missing or invalid config.yaml or meta.json,
a `latest` naming a missing folder, and a model whose parameter shapes differ from the current
config. config.yaml is not in the manifest: it may be edited (e.g. to point at a moved tokenizer).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
import yaml

from megatron_jp.config import Config, ConfigError, ModelConfig, config_from_dict, to_yaml
from megatron_jp.models.encoder import tie, untie
from megatron_jp.parallel.model import full_shapes
from megatron_jp.training import dcp_pieces

LATEST = "latest"
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."
CONFIG, META, RANK_STATE = "config.yaml", "meta.json", "rank_state"
MOMENTS = ("exp_avg", "exp_avg_sq")

# single-process save/load of DCP (converters, tools) is intended, not a forgotten init_process_group
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written; the message names the file and what to do."""


def iteration_name(step: int) -> str:
    return f"iter_{step:07d}"


# ----------------------------------------------------------------------------- finding and checking


def find_latest(ckpt_dir: str | os.PathLike) -> Path | None:
    """The iteration folder `latest` names, or None when the directory holds no checkpoint yet."""
    latest = Path(ckpt_dir) / LATEST
    if not latest.exists():
        return None
    target = latest.parent / latest.read_text().strip()
    if not target.name.startswith("iter_") or not (target / ".metadata").exists():
        raise CheckpointError(f"{latest} names {target.name}, which is missing or incomplete: point it at a "
                              f"complete iter_* folder of {latest.parent}, or remove it to start afresh")
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
    except (yaml.YAMLError, ConfigError) as e:
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
    if not isinstance(meta, dict) or not isinstance(meta.get("meta", {}), dict):
        raise CheckpointError(f"{path} does not hold a checkpoint record (a JSON object with 'meta'); "
                              f"load another iteration")
    return meta


def check_files(iter_dir: Path, info: dict):
    """Every data file meta.json lists exists with the recorded size (a cheap test before reading)."""
    for name, size in info.get("files", {}).items():
        path = iter_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing ({size} bytes in {META}'s manifest): restore the file "
                                  f"or load an earlier iteration")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"{path} has {actual} bytes, {META} records {size}: the file is truncated "
                                  f"or damaged; restore it or load an earlier iteration")


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
    except Exception as e:
        raise CheckpointError(f"{iter_dir / '.metadata'} cannot be read ({type(e).__name__}: {e}); "
                              f"load an earlier iteration") from None


def _first_line(e: BaseException) -> str:
    """DCP's CheckpointException carries every rank's traceback: its first line is the news."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _read_error(iter_dir: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{iter_dir}: cannot read the tensors, a shard is missing or damaged "
                           f"({_first_line(e)}); load an earlier iteration")


# ----------------------------------------------------------------------------- writing and publishing


def _write_durably(path: Path, text: str):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _data_files(folder: Path) -> dict[str, int]:
    """{relative path: bytes} of every file but config.yaml (editable) and meta.json (the record)."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (CONFIG, META))
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in files}


def write_metadata(folder: Path, cfg: Config, info: dict):
    """config.yaml, then meta.json with the manifest of the data files already in `folder`."""
    _write_durably(folder / CONFIG, to_yaml(cfg))
    _write_durably(folder / META, json.dumps({**info, "files": _data_files(folder)}, indent=2) + "\n")


def start_folder(ckpt_dir: Path, step: int) -> Path:
    """A fresh CKPT_DIR/.iter_XXXXXXX.tmp; removes what killed saves left behind. Rank 0 only."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".iter_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    (ckpt_dir / f".{LATEST}.tmp").unlink(missing_ok=True)
    tmp = ckpt_dir / f".{iteration_name(step)}.tmp"
    (tmp / RANK_STATE).mkdir(parents=True)
    return tmp


def publish(ckpt_dir: Path, tmp: Path, step: int, keep: int) -> Path:
    """Rename the complete `tmp` to iter_<step>, point `latest` at it, prune beyond `keep` (0: keep all)."""
    final = ckpt_dir / iteration_name(step)
    replaced = None
    if final.exists():  # the same step saved again, e.g. by a run resumed from it
        replaced = ckpt_dir / f".{final.name}.replaced.tmp"
        os.replace(final, replaced)
    os.replace(tmp, final)
    pointer = ckpt_dir / f".{LATEST}.tmp"
    _write_durably(pointer, final.name + "\n")
    os.replace(pointer, ckpt_dir / LATEST)
    _fsync_dir(ckpt_dir)
    if replaced is not None:
        shutil.rmtree(replaced)
    prune(ckpt_dir, keep, final)
    return final


def prune(ckpt_dir: Path, keep: int, newest: Path):
    """Delete all but the `keep` most recent iteration folders; `newest` (just published) always stays."""
    if keep <= 0:
        return
    others = sorted((p for p in ckpt_dir.glob("iter_*") if p.is_dir() and p.name != newest.name
                     and p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))  # not iter_backup/
    for old in others[:max(len(others) - (keep - 1), 0)]:
        doomed = ckpt_dir / f".{old.name}.deleting.tmp"  # a killed deletion leaves only a stale .tmp
        os.replace(old, doomed)
        shutil.rmtree(doomed)


def save_model_checkpoint(ckpt_dir: str | os.PathLike, step: int, cfg: Config,
                          state: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
    """A checkpoint holding only model weights (e.g. imported from Hugging Face), single process."""
    state = untie(state, cfg.model)  # one tensor under two names: store it once
    ckpt_dir = Path(ckpt_dir)
    tmp = start_folder(ckpt_dir, step)
    dcp.save({MODEL_PREFIX + k: v.detach().contiguous() for k, v in state.items()},
             checkpoint_id=str(tmp), no_dist=True)
    write_metadata(tmp, cfg, {"meta": {"step": step, **(meta or {})}})
    return publish(ckpt_dir, tmp, step, keep=0)


def load_model_state(path: str | os.PathLike) -> tuple[Config, dict[str, torch.Tensor]]:
    """The full (unsharded) fp32 model state of a checkpoint, whatever layout wrote it; single process."""
    iter_dir = resolve_checkpoint(path)
    check_files(iter_dir, read_meta(iter_dir))
    cfg = read_config(iter_dir)
    shapes = full_shapes(cfg.model)  # tied: the decoder is absent, as in the checkpoint
    state = {MODEL_PREFIX + k: torch.empty(v, dtype=torch.float32) for k, v in shapes.items()}
    try:
        dcp.load(state, checkpoint_id=str(iter_dir), no_dist=True)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise _read_error(iter_dir, e) from None
    return cfg, tie({k[len(MODEL_PREFIX):]: v for k, v in state.items()}, cfg.model)


# ----------------------------------------------------------------------------- the distributed checkpointer


@dataclass
class Loaded:
    """What Checkpointer.load() read besides the tensors it put in place."""

    path: Path
    config: Config  # the configuration stored in the checkpoint
    meta: dict  # the `meta` given to Checkpointer.save
    rank_state: dict | None  # this rank's, if the checkpoint's world size and layout are this run's
    optimizer_step: int | None  # None for model-only checkpoints


@dataclass
class _PendingSave:
    step: int
    tmp: Path
    info: dict
    future: Future


class Checkpointer:
    """Saves and loads a ParallelModel (and its optimizer) in any tensor/pipeline/data layout.

    Every method is collective: all ranks call it at the same point. Each rank writes only the blocks
    it is primary for; loading fills every local block, primary or replica, from whatever layout
    wrote the checkpoint. With async_save, save() returns once the tensors are copied to CPU memory;
    the write continues in a background thread and is published by wait() or by the next save().
    """

    def __init__(self, ckpt_dir: str | os.PathLike, cfg: Config, dims, keep: int = 2, async_save: bool = False):
        self.dir, self.cfg, self.dims = Path(ckpt_dir), cfg, dims
        self.keep, self.async_save = keep, async_save
        # DCP coordinates with object collectives, and from a background thread when async: a gloo
        # group of its own keeps them apart from training collectives (and works under NCCL runs)
        self.group = dist.new_group(backend="gloo") if dims.distributed else None
        self._pending: _PendingSave | None = None

    @property
    def _no_dist(self) -> bool:
        return self.group is None

    def _barrier(self):
        if self.group is not None:
            dist.barrier(group=self.group)

    def _layout(self) -> dict:
        d = self.dims
        return {"tensor": d.tp, "pipeline": d.pp, "data": d.dp, "virtual_pipeline": d.vpp}

    # ------------------------------------------------------------------------- saving

    def save(self, step: int, model, optimizer=None, meta: dict | None = None, rank_state: dict | None = None):
        """Write iteration `step`: model, optimizer state, meta (JSON) and this rank's rank_state
        (tensors, numbers, strings and containers: it is read back with weights_only=True)."""
        self.wait()  # one save in flight at a time
        info = {"meta": dict(meta or {}), "world_size": self.dims.world_size, "layout": self._layout(),
                "optimizer_step": optimizer.step_count if optimizer is not None else None}
        json.dumps(info)  # refuse what meta.json cannot hold before writing anything
        if rank_state is not None:
            _check_weights_only(rank_state, "rank_state")
        tmp = self.dir / f".{iteration_name(step)}.tmp"
        if self.dims.rank == 0:
            start_folder(self.dir, step)
        self._barrier()  # the folder exists (and stale ones are gone) before anyone writes
        if rank_state is not None:
            _save_rank_state(tmp / RANK_STATE / f"rank_{self.dims.rank:05d}.pt", rank_state)
        state = self._pieces_to_save(model, optimizer)
        if self.async_save:
            future = dcp_pieces.async_save(dcp_pieces.stage_to_cpu(state), tmp, self.group, self._no_dist)
            self._pending = _PendingSave(step, tmp, info, future)
        else:
            self._written(lambda: dcp_pieces.save(state, tmp, self.group, self._no_dist), tmp)
            self._publish(step, tmp, info)

    def wait(self):
        """Finish and publish a pending asynchronous save (nothing otherwise). Call before exiting."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._written(pending.future.result, pending.tmp)
            self._publish(pending.step, pending.tmp, pending.info)

    def _written(self, write, tmp: Path):
        try:
            write()
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"writing {tmp} failed ({_first_line(e)}); the previous checkpoint "
                                  f"stays the latest") from e

    def _publish(self, step: int, tmp: Path, info: dict):
        self._barrier()  # every rank's files are complete
        if self.dims.rank == 0:
            write_metadata(tmp, self.cfg, info)
            publish(self.dir, tmp, step, self.keep)
        self._barrier()  # nobody goes on before `latest` names the new folder

    def _pieces_to_save(self, model, optimizer) -> dict[str, list]:
        state = _keyed(MODEL_PREFIX, model.sharded_state_dict(), primary_only=True)
        if optimizer is not None:
            sharded = optimizer.sharded_state_dict()  # collective: ZeRO-1 slices gathered over dp
            kinds = MOMENTS if model.dtype == torch.float32 else (*MOMENTS, "master")
            for kind in kinds:
                state.update(_keyed(f"{OPTIM_PREFIX}{kind}.", sharded[kind], primary_only=True))
        return state

    # ------------------------------------------------------------------------- loading

    def load(self, iter_dir: str | os.PathLike, model, optimizer=None) -> Loaded:
        """Fill the model's parameters (and the optimizer's state) from an iteration folder.

        Without an optimizer only the weights are read; call optimizer.sync_master_from_params()
        afterwards if one exists (bf16 master weights). The checkpoint's model may differ from
        model.cfg in anything but the parameter shapes.
        """
        self.wait()
        iter_dir = Path(iter_dir)
        info = read_meta(iter_dir)
        check_files(iter_dir, info)
        config = read_config(iter_dir)
        check_same_shapes(config.model, model.cfg, iter_dir)
        saved = saved_shapes(iter_dir)
        state = _keyed(MODEL_PREFIX, model.sharded_state_dict())
        sharded = optimizer.sharded_state_dict() if optimizer is not None else None
        if sharded is not None:
            _merge(state, self._optimizer_targets(sharded, saved, iter_dir))
        _check_keys(state, saved, iter_dir)
        try:
            dcp_pieces.load(state, iter_dir, self.group, self._no_dist)
        except (Exception, CheckpointException) as e:
            raise _read_error(iter_dir, e) from None
        if sharded is not None:
            sharded["step"] = int(info.get("optimizer_step") or 0)
            optimizer.load_sharded_state_dict(sharded)
        return Loaded(iter_dir, config, info.get("meta", {}), self._rank_state(iter_dir, info),
                      info.get("optimizer_step"))

    @staticmethod
    def _optimizer_targets(sharded: dict, saved: dict, iter_dir: Path) -> dict[str, list]:
        """The optimizer's pieces by checkpoint key. Master weights come from optim.master when the
        checkpoint has them (parameters not fp32), else from the fp32 parameters themselves."""
        if not any(k.startswith(OPTIM_PREFIX) for k in saved):
            raise CheckpointError(f"{iter_dir} holds model weights only, no optimizer state: set "
                                  f"checkpoint.reset_optimizer: true to start from fresh AdamW moments")
        targets = {}
        for kind in MOMENTS:
            targets.update(_keyed(f"{OPTIM_PREFIX}{kind}.", sharded[kind]))
        masters = f"{OPTIM_PREFIX}master."
        has_master = any(k.startswith(masters) for k in saved)
        _merge(targets, _keyed(masters if has_master else MODEL_PREFIX, sharded["master"]))
        return targets

    def _rank_state(self, iter_dir: Path, info: dict) -> dict | None:
        if info.get("world_size") != self.dims.world_size or info.get("layout") != self._layout():
            return None  # another layout: rank r there is not rank r here
        path = iter_dir / RANK_STATE / f"rank_{self.dims.rank:05d}.pt"
        if not path.exists():
            return None  # saved without rank_state
        try:
            return torch.load(path, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e}); "
                                  f"load an earlier iteration") from None


def _keyed(prefix: str, by_name: dict[str, list], primary_only: bool = False) -> dict[str, list]:
    """{prefix + full name: pieces}, optionally only those this rank writes."""
    return {prefix + name: [p for p in pieces if p.primary or not primary_only] for name, pieces in by_name.items()}


def _merge(state: dict[str, list], more: dict[str, list]):
    for key, pieces in more.items():
        state.setdefault(key, []).extend(pieces)


def _check_keys(state: dict[str, list], saved: dict, iter_dir: Path):
    for key, pieces in state.items():
        if key not in saved:
            raise CheckpointError(f"{iter_dir / '.metadata'} has no tensor {key}; load a checkpoint of this "
                                  f"model (or another iteration)")
        if pieces and saved[key] != tuple(pieces[0].global_shape):
            raise CheckpointError(f"{iter_dir / '.metadata'}: {key} has shape {saved[key]}, this run expects "
                                  f"{tuple(pieces[0].global_shape)}")


_PLAIN = (torch.Tensor, int, float, bool, str, bytes, type(None))


def _check_weights_only(value, where: str):
    """Refuse at save time what torch.load(weights_only=True) would refuse at resume time."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_weights_only(k, f"{where} key")
            _check_weights_only(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_weights_only(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{where} is a {type(value).__name__}; rank_state holds tensors, numbers, strings "
                        f"and lists/tuples/dicts of them (convert e.g. numpy arrays with torch.from_numpy)")


def _save_rank_state(path: Path, state: dict):
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
