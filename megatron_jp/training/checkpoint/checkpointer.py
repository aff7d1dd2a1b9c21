"""The distributed Checkpointer and the single-process model-state writer and reader used by the tools.
The layout and the guarantees are described in megatron_jp/training/checkpoint/__init__.py.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import threading
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_jp.config import Config
from megatron_jp.files import remove_quietly
from megatron_jp.models.encoder import tie, untie
from megatron_jp.parallel.model import full_shapes
from megatron_jp.precision import Precision
from megatron_jp.training.checkpoint import dcp_pieces
from megatron_jp.training.checkpoint.store import (LATEST, MODEL_PREFIX, MOMENTS, OPTIM_PREFIX, RANK_STATE,
                                                   CheckpointError, check_files, check_same_shapes, interrupted,
                                                   iteration_folders, iteration_name, listing, new_run_id,
                                                   non_finite_names, publish, read_config, read_error, read_meta,
                                                   refuse_foreign, resolve_checkpoint, saved_shapes, start_folder,
                                                   write_error, write_metadata)
from megatron_jp.training.checkpoint.manifest import write_durably
from megatron_jp.training.runtime.run_lock import DirLock, LockedError

# single-process save/load of DCP (converters, tools) is intended, not a forgotten init_process_group
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


@dataclass
class _Whole:
    """A whole tensor as the one piece of its key (dcp_pieces takes pieces)."""

    tensor: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    primary: bool = True


def save_model_checkpoint(ckpt_dir: str | os.PathLike, step: int, cfg: Config, state: dict[str, torch.Tensor],
                          meta: dict | None = None, into_existing: bool = False) -> Path:
    """A checkpoint holding only model weights (imported from Hugging Face, averaged), single process.

    Refuses a directory that already holds checkpoints (a run's: its `latest` would be repointed and an
    iteration of the same name replaced) unless `into_existing`, which adds iter_<step> beside them,
    only if no such folder exists, and leaves an existing `latest` alone. Refuses non-finite weights."""
    ckpt_dir = Path(ckpt_dir)
    bad = non_finite_names(state)
    if bad:
        raise CheckpointError(f"not writing {ckpt_dir}: the weights are not finite ({', '.join(bad[:5])}); "
                              f"check the inputs")
    try:
        with DirLock(ckpt_dir, "a tool writing a checkpoint"):
            return _save_model_checkpoint(ckpt_dir, step, cfg, untie(state, cfg.model), meta, into_existing)
    except LockedError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise write_error(ckpt_dir, e) from None


def _save_model_checkpoint(ckpt_dir: Path, step: int, cfg: Config, state: dict, meta, into_existing: bool) -> Path:
    existing = iteration_folders(ckpt_dir)
    has_latest = os.path.lexists(ckpt_dir / LATEST)
    if (existing or has_latest) and not into_existing:
        raise CheckpointError(
            f"{ckpt_dir} already holds checkpoints ({listing(existing) or LATEST}): a tool does not write into a "
            f"run's checkpoint directory. Choose a new --output, or pass --iteration N to add iter_N beside them "
            f"(`latest` stays as it is)")
    final = ckpt_dir / iteration_name(step)
    if final.exists():
        raise CheckpointError(f"{final} exists: choose another --iteration (a folder is never replaced by a tool)")
    tmp = start_folder(ckpt_dir, step)
    pieces = {MODEL_PREFIX + k: [_Whole(v.detach().contiguous(), tuple(v.shape), (0,) * v.dim())]
              for k, v in state.items()}
    try:
        report = dcp_pieces.save(pieces, tmp, no_dist=True)
        info = {"meta": {"step": step, **(meta or {})}, "run_id": new_run_id(), "weights_finite": True}
        write_metadata(tmp, cfg, info, report.files)
    except (Exception, CheckpointException) as e:
        remove_quietly(tmp)
        raise write_error(tmp, e) from None
    return publish(ckpt_dir, tmp, step, keep=0, point_latest=not has_latest)


def load_model_state(path: str | os.PathLike) -> tuple[Config, dict[str, torch.Tensor]]:
    """The full (unsharded) fp32 model state of a checkpoint, whatever layout wrote it; single process."""
    iter_dir = resolve_checkpoint(path)
    check_files(iter_dir, read_meta(iter_dir))
    cfg = read_config(iter_dir)
    saved_shapes(iter_dir)  # refuses a crafted .metadata before DCP unpickles it
    shapes = full_shapes(cfg.model)  # tied: the decoder is absent, as in the checkpoint
    state = {MODEL_PREFIX + k: torch.empty(v, dtype=torch.float32) for k, v in shapes.items()}
    try:
        dcp_pieces.load({k: [_Whole(v, tuple(v.shape), (0,) * v.dim())] for k, v in state.items()},
                        iter_dir, no_dist=True)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise read_error(iter_dir, e) from None
    bad = non_finite_names(state)
    if bad:
        raise CheckpointError(f"{iter_dir} holds non-finite weights ({', '.join(n[len(MODEL_PREFIX):] for n in bad[:5])}); "
                              f"load an earlier iteration")
    return cfg, tie({k[len(MODEL_PREFIX):]: v for k, v in state.items()}, cfg.model)


def checkpoint_bytes(cfg: Config) -> int:
    """About how many bytes one checkpoint of this run takes: weights at their precision, two fp32
    Adam moments, fp32 master weights when the parameters are not fp32 (rank states are small)."""
    params = sum(math.prod(shape) for shape in full_shapes(cfg.model).values())
    precision = Precision.of(cfg)
    per_param = precision.params.itemsize + 8 + (precision.master.itemsize if precision.separate_master else 0)
    return params * per_param + (1 << 20)


# ----------------------------------------------------------------------------- the distributed checkpointer


@dataclass
class Loaded:
    """What Checkpointer.load() read besides the tensors it put in place."""

    path: Path
    config: Config  # the configuration stored in the checkpoint
    meta: dict  # the `meta` given to Checkpointer.save
    rank_state: dict | None  # this rank's, if the checkpoint's world size and layout are this run's
    optimizer_step: int | None  # None for model-only checkpoints
    run_id: str | None = None  # the run that wrote it (None: a tool, or written before run ids)


@dataclass
class _PendingSave:
    step: int
    tmp: Path
    info: dict
    future: Future
    rank_files: dict


def _in_background(work) -> Future:
    """Run `work` on a daemon thread (a second Ctrl-C must not wait for a write at exit)."""
    future: Future = Future()

    def run():
        try:
            future.set_result(work())
        except BaseException as e:  # noqa: B036  (CheckpointException is a BaseException)
            future.set_exception(e)

    threading.Thread(target=run, name="checkpoint-writer", daemon=True).start()
    return future


class Checkpointer:
    """Saves and loads a ParallelModel (and its optimizer) in any tensor/pipeline/data layout.

    Every method is collective: all ranks call it at the same point. Each rank writes only the blocks
    it is primary for, one piece at a time (dcp_pieces.StreamingWriter: no copy of the state);
    loading fills every local block, primary or replica, from whatever layout wrote the checkpoint.
    With async_save, save() returns once the pieces are copied into host buffers allocated at the
    first save and reused (pinned on GPUs); the write continues on a background thread and is
    published by wait() or by the next save().
    """

    def __init__(self, ckpt_dir: str | os.PathLike, cfg: Config, dims, keep: int = 2, async_save: bool = False):
        self.dir, self.cfg, self.dims = Path(ckpt_dir), cfg, dims
        self.keep, self.async_save = keep, async_save
        # DCP coordinates with object collectives, and from a background thread when async: a gloo
        # group of its own keeps them apart from training collectives (and works under NCCL runs)
        self.group = dist.new_group(backend="gloo") if dims.distributed else None
        self._pending: _PendingSave | None = None
        self._staging = dcp_pieces.StagingBuffers()
        self.run_id = self._broadcast(new_run_id())  # adopted from the checkpoint on resume (adopt())
        self.hash_seconds = 0.0  # spent hashing on the write path by this rank (a figure for bench/)

    @property
    def _no_dist(self) -> bool:
        return self.group is None

    def _barrier(self):
        if self.group is not None:
            dist.barrier(group=self.group)

    def _broadcast(self, value):
        if self.group is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def _agree(self, work) -> None:
        """Run `work` on every rank; if it raised CheckpointError anywhere, raise it everywhere (no rank
        is left waiting in a collective the others skipped)."""
        message = None
        try:
            work()
        except CheckpointError as e:
            message = str(e)
        if self.group is not None:
            messages = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(messages, message, group=self.group)
            message = next((m for m in messages if m), None)
        if message:
            raise CheckpointError(message)

    def _on_rank0(self, work) -> None:
        """Run `work` on rank 0 only; a CheckpointError or OSError there is raised on every rank."""
        def guarded():
            if self.dims.rank == 0:
                try:
                    work()
                except OSError as e:
                    raise write_error(self.dir, e) from None

        self._agree(guarded)

    def _layout(self) -> dict:
        d = self.dims
        return {"tensor": d.tp, "pipeline": d.pp, "data": d.dp, "virtual_pipeline": d.vpp}

    def adopt(self, loaded: Loaded):
        """Continue the run that wrote `loaded` (a resume): its folders become this run's to prune."""
        if loaded.run_id:
            self.run_id = loaded.run_id

    # ------------------------------------------------------------------------- checks

    def preflight(self, needed_bytes: int):
        """Before the first step: the directory can be created and written, and has room for one
        checkpoint (`needed_bytes`, e.g. checkpoint_bytes(cfg)); refused with the reason otherwise."""
        def check():
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-test.{os.getpid()}.tmp"
            try:
                write_durably(probe, b"x")
            finally:
                remove_quietly(probe)
            free = shutil.disk_usage(self.dir).free
            if free < needed_bytes:
                raise CheckpointError(f"{self.dir} has {free / 1e9:.2f} GB free, one checkpoint of this run takes "
                                      f"about {needed_bytes / 1e9:.2f} GB: free space or set checkpoint.dir elsewhere")

        self._on_rank0(check)

    def check_finite(self, model, optimizer, where: str):
        """Refuse (CheckpointError on every rank) weights or optimizer moments holding NaN or inf."""
        tensors = {**model.local_tensors(), **(optimizer.local_tensors() if optimizer is not None else {})}
        bad = non_finite_names(tensors)
        self._agree(lambda: _raise_if(bad, f"{where}: non-finite values (NaN or inf) in {', '.join(bad[:4])}"
                                           f"{' ...' if len(bad) > 4 else ''}"))

    # ------------------------------------------------------------------------- saving

    def save(self, step: int, model, optimizer=None, meta: dict | None = None, rank_state: dict | None = None):
        """Write iteration `step`: model, optimizer state, meta (JSON) and this rank's rank_state
        (tensors, numbers, strings and containers: it is read back with weights_only=True)."""
        self.wait()  # one save in flight at a time
        info = {"meta": dict(meta or {}), "world_size": self.dims.world_size, "layout": self._layout(),
                "optimizer_step": None, "run_id": self.run_id, "weights_finite": True}
        json.dumps(info)  # refuse what meta.json cannot hold before writing anything
        if rank_state is not None:
            _check_weights_only(rank_state, "rank_state")
        latest = _latest_name(self.dir)
        try:
            self.check_finite(model, optimizer, f"step {step}")
        except CheckpointError as e:
            raise CheckpointError(f"{e}: not saved, {latest or 'no checkpoint'} stays the latest. The run "
                                  f"diverged: resume from the last checkpoint with a lower optim.lr or more "
                                  f"optim.warmup_steps") from None
        tmp = self.dir / f".{iteration_name(step)}.tmp"
        self._on_rank0(lambda: (refuse_foreign(self.dir, step, self.run_id), start_folder(self.dir, step)))
        rank_files = {}
        try:
            if rank_state is not None:
                name = f"{RANK_STATE}/rank_{self.dims.rank:05d}.pt"
                rank_files[name] = _save_rank_state(tmp / name, rank_state)
            state, info["optimizer_step"] = self._pieces_to_save(model, optimizer)
            if self.async_save:
                staged = self._staging.stage(state)
                del state
                future = _in_background(lambda: dcp_pieces.save(staged, tmp, self.group, self._no_dist))
                self._pending = _PendingSave(step, tmp, info, future, rank_files)
                return
            report = dcp_pieces.save(state, tmp, self.group, self._no_dist)
        except (Exception, CheckpointException, KeyboardInterrupt) as e:
            self._abandon(tmp)
            if interrupted(e):
                raise KeyboardInterrupt from None
            raise write_error(tmp, e) from None
        self._publish(step, tmp, info, {**report.files, **rank_files}, report.hash_seconds)

    def wait(self):
        """Finish and publish a pending asynchronous save (nothing otherwise). Call before exiting."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                report = pending.future.result()
            except (Exception, CheckpointException, KeyboardInterrupt) as e:
                self._abandon(pending.tmp)
                if interrupted(e):
                    raise KeyboardInterrupt from None
                raise write_error(pending.tmp, e) from None
            self._publish(pending.step, pending.tmp, pending.info, {**report.files, **pending.rank_files},
                          report.hash_seconds)

    def _abandon(self, tmp: Path):
        """A failed write: free the disk now (a full disk stays full otherwise); removal needs no space."""
        if self.dims.rank == 0:
            remove_quietly(tmp)

    def _publish(self, step: int, tmp: Path, info: dict, files: dict, hash_seconds: float):
        self.hash_seconds += hash_seconds
        if self.group is not None:  # every rank's files are complete; rank 0 records all their hashes
            gathered = [None] * dist.get_world_size(self.group) if self.dims.rank == 0 else None
            dist.gather_object(files, gathered, dst=dist.get_global_rank(self.group, 0), group=self.group)
            if gathered is not None:
                files = {k: v for part in gathered for k, v in part.items()}

        def finish():
            try:
                write_metadata(tmp, self.cfg, info, files)
                publish(self.dir, tmp, step, self.keep, self.run_id)
            except OSError:
                remove_quietly(tmp)
                raise

        self._on_rank0(finish)  # nobody goes on before `latest` names the new folder

    def _pieces_to_save(self, model, optimizer) -> tuple[dict[str, list], int | None]:
        """The pieces this rank writes, and the optimizer's step (None without one)."""
        state = _keyed(MODEL_PREFIX, model.sharded_state_dict(), primary_only=True)
        if optimizer is None:
            return state, None
        sharded = optimizer.sharded_state_dict(for_saving=True)  # collective: ZeRO-1 gathers over dp
        kinds = (*MOMENTS, "master") if optimizer.separate_master else MOMENTS
        for kind in kinds:
            state.update(_keyed(f"{OPTIM_PREFIX}{kind}.", sharded[kind], primary_only=True))
        return state, sharded["step"]

    # ------------------------------------------------------------------------- loading

    def load(self, iter_dir: str | os.PathLike, model, optimizer=None) -> Loaded:
        """Fill the model's parameters (and the optimizer's state) from an iteration folder.

        Without an optimizer only the weights are read; call optimizer.sync_master_from_params()
        afterwards if one exists (bf16 master weights). The checkpoint's model may differ from
        model.cfg in anything but the parameter shapes. The files are checked against the manifest
        (sizes, then SHA-256, the files split over the ranks) before anything is unpickled or read,
        and the loaded values must be finite.
        """
        self.wait()
        iter_dir = Path(iter_dir)
        world = dist.get_world_size(self.group) if self.group is not None else 1
        rank = dist.get_rank(self.group) if self.group is not None else 0
        info: dict = {}

        def check():
            info.update(read_meta(iter_dir))
            check_files(iter_dir, info, rank, world)

        self._agree(check)
        config = read_config(iter_dir)
        check_same_shapes(config.model, self.cfg.model, iter_dir)
        saved = saved_shapes(iter_dir)
        state = _keyed(MODEL_PREFIX, model.sharded_state_dict())
        sharded = optimizer.sharded_state_dict() if optimizer is not None else None
        if sharded is not None:
            _merge(state, self._optimizer_targets(sharded, saved, iter_dir))
        _check_keys(state, saved, iter_dir)
        try:
            dcp_pieces.load(state, iter_dir, self.group, self._no_dist)
        except (Exception, CheckpointException) as e:
            raise read_error(iter_dir, e) from None
        if sharded is not None:
            sharded["step"] = int(info.get("optimizer_step") or 0)
            optimizer.load_sharded_state_dict(sharded)
        self.check_finite(model, optimizer if sharded is not None else None, f"{iter_dir} holds")
        return Loaded(iter_dir, config, info.get("meta", {}), self._rank_state(iter_dir, info),
                      info.get("optimizer_step"), info.get("run_id"))

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
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e}); "
                                  f"load an earlier iteration") from None


def _raise_if(bad: list, message: str):
    if bad:
        raise CheckpointError(message)


def _latest_name(ckpt_dir: Path) -> str | None:
    try:
        return (ckpt_dir / LATEST).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


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


def _save_rank_state(path: Path, state: dict) -> tuple[int, str]:
    """torch.save, fsynced; returns (bytes, sha256) for the manifest."""
    with open(path, "wb") as f:
        stream = dcp_pieces.HashingStream(f)
        torch.save(state, stream)
        f.flush()
        os.fsync(f.fileno())
    return stream.length, stream.sha.hexdigest()
