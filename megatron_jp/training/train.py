"""The training loop behind `python -m megatron_jp.train` (plain process, torchrun or srun).

    run(cfg)
      1. checks, before any process group or allocation: one validation of the config for the
         launcher's world size, the starting checkpoint and the vocabulary (training/startup.py),
         the data shards (building this rank's loaders);
      2. process group, ParallelDims, model (initialised identically in every layout), optimizer;
      3. resume from CKPT_DIR/latest, or begin a phase from checkpoint.load, or start fresh;
      4. steps: batch-size ramp-up, seq-length and mask-rate curricula, learning-rate schedule,
         skipped steps on NaN/inf, metrics with MFU, periodic validation and checkpoints.

A step is a pure function of (weights, optimizer state, step, consumed samples, RNG states): all of
them are in the checkpoint, so a resumed run repeats the losses of an uninterrupted one bit for bit.
"""

from __future__ import annotations

import itertools
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_jp.config import Config, ConfigError, to_yaml, validate
from megatron_jp.data.loader import build_data_loaders
from megatron_jp.data.sources import DataError
from megatron_jp.files import describe_os_error, write_text
from megatron_jp.data.provenance import tokenizer_info
from megatron_jp.parallel import (ParallelDims, StepResult, build_optimizer, build_parallel_model, eval_step,
                                  init_process_group, launch_env, train_step)
from megatron_jp.parallel.compile import compile_enabled, use_compile_cache
from megatron_jp.parallel.memory import memory_warning
from megatron_jp.training import schedules
from megatron_jp.training.runtime import consensus, environment
from megatron_jp.training.checkpoint import Checkpointer, CheckpointError, checkpoint_bytes
from megatron_jp.training.flops import effective_seq_length, flops_per_token, mfu
from megatron_jp.training.metrics import MetricsWriter, console_line
from megatron_jp.training.probe import MaskedWordProbe, build_dataset
from megatron_jp.training.runtime.run_lock import LockedError, hold_run_dirs
from megatron_jp.training.schedules import Curricula
from megatron_jp.training.startup import Start, check_continuation, checkpoint_dir, resolve_vocab, starting_checkpoint
from megatron_jp.training.runtime.stop import StopRequest
from megatron_jp.training.runtime.watchdog import NullWatchdog, Watchdog
from megatron_jp.precision import Precision


class TrainingAborted(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why."""


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint's meta.json."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


# ------------------------------------------------------------------------------------------ entry


def run(cfg: Config, stop: StopRequest | None = None) -> int:
    """Train as configured; returns the process exit status. `stop`: signal handlers installed early
    (megatron_jp.train does so before importing torch), else now."""
    stop = stop or StopRequest()
    rank, world, _ = launch_env()
    try:
        validate(cfg, world)
        start = starting_checkpoint(cfg)
        tokenizer = resolve_vocab(cfg, start)  # the run's one tokenizer
        check_continuation(cfg, start, tokenizer)
        loaders, curricula = prepare_data(cfg, tokenizer, rank, world)
    except (ConfigError, CheckpointError, ValueError, OSError) as e:  # before any process group exists
        return fail(e, rank, status=2)
    watchdog = Watchdog.from_config(cfg.parallel, rank, world).start()  # no rank waits forever
    trainer, locks = None, []
    try:
        rank, world, device = init_process_group(timeout_s=watchdog.backstop_s)
        consensus.agree(cfg, tokenizer)  # all ranks go on, or none
        dims = ParallelDims.from_config(cfg, world, rank, device)
        environment.report(world, rank, cfg.run.dir)
        watchdog.started()
        locks = hold_run_dirs(cfg.run.dir, checkpoint_dir(cfg), dims)  # this run owns them until it ends
        for lock in locks:
            if lock.note:
                print(lock.note, flush=True)
        start = starting_checkpoint(cfg)  # again, under the lock: the newest `latest`
        trainer = Trainer(cfg, dims, loaders, curricula, tokenizer, watchdog)
        trainer.fit(start, stop)
        return 0
    except (LockedError, consensus.RanksDisagree) as e:
        return fail(e, rank, status=2)
    except (TrainingAborted, CheckpointError, ConfigError, DataError) as e:
        return fail(e, rank, status=1)
    except OSError as e:  # e.g. metrics.jsonl on a full disk: say which and what it means
        reason = describe_os_error(e)
        if reason is None:
            raise
        return fail(RuntimeError(f"{reason}; the last published checkpoint stays `latest`"), rank, status=1)
    except KeyboardInterrupt:  # a second Ctrl-C: out at once, the last published checkpoint stays
        return fail(RuntimeError("interrupted: exiting without saving; `latest` names the last complete "
                                 "checkpoint"), rank, status=130)
    except RuntimeError as e:  # gloo raises this when a peer's connection closes
        if str(e).startswith("DataLoader worker"):  # torch's words for a worker killed (OOM) or crashed
            return fail(RuntimeError(f"a data loader worker of rank {rank} died ({str(e).strip()}); the last "
                                     "published checkpoint stays `latest`. If the OOM killer ended it, lower "
                                     "data.num_workers or give the job more memory"), 0, status=1)
        watchdog.collective_failed(e)  # names the rank that vanished and exits, if one did
        raise
    finally:
        watchdog.stop()
        if trainer is not None:
            trainer.close()
        for lock in reversed(locks):
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def fail(error: Exception, rank: int, status: int) -> int:
    """Status 2: the input was refused before training; 1: training stopped."""
    if rank == 0:
        print(f"error: {error}", file=sys.stderr)
    return status


def prepare_data(cfg: Config, tokenizer, rank: int, world: int):
    """This rank's loaders (its data-parallel coordinate comes from the rank grid) and the curricula,
    so a missing or malformed shard is reported before any rank waits for another."""
    curricula = Curricula.from_config(cfg)
    p = cfg.parallel
    layout = ParallelDims.layout(p.tensor, p.pipeline, world // (p.tensor * p.pipeline), p.virtual_pipeline, rank)
    loaders = build_data_loaders(cfg.data, tokenizer, micro_batch_size=cfg.train.micro_batch_size,
                                 dp_rank=layout.dp_rank, dp_size=layout.dp, seed=cfg.train.seed,
                                 global_batch_size=cfg.train.global_batch_size,
                                 mask_prob_at=curricula.mask_prob, seq_length_at=curricula.seq_length,
                                 valid_max_batches=cfg.eval.steps, step_of=curricula.batch.step_of)
    if rank == 0:  # per source: documents, tokens, rows, epochs of this run
        print(loaders[0].summary(cfg.train.steps, curricula.batch.consumed_at), flush=True)
    if cfg.eval.intrinsic:  # refuse missing word flags now, not at the first validation
        build_dataset(cfg, tokenizer)
    return loaders, curricula


# ------------------------------------------------------------------------------------------ trainer


class Trainer:
    def __init__(self, cfg: Config, dims: ParallelDims, loaders, curricula: Curricula, tokenizer, watchdog=None):
        self.cfg, self.dims, self.curricula = cfg, dims, curricula
        self.watchdog = watchdog or NullWatchdog()  # told of every step, save and validation
        self.watchdog.mark(0, "building the model")
        self.train_loader, self.valid_loader = loaders
        t = cfg.train
        torch.manual_seed(dims.dropout_seed(t.seed))
        compiled = compile_enabled(t.compile, dims.device.type)
        if compiled:
            use_compile_cache(t.compile_cache_dir or Path(cfg.run.dir) / "compile_cache")
        self.precision = Precision.of(cfg)  # decoded once: the model, the checkpointer and MFU read it
        self.model = build_parallel_model(cfg.model, dims, seed=t.seed, precision=self.precision,
                                          recompute=t.recompute, sequence_parallel=cfg.parallel.sequence_parallel,
                                          zero1=cfg.parallel.zero1, compile=compiled)
        self.optimizer = build_optimizer(self.model, cfg.optim, dims)
        self.checkpointer = Checkpointer(checkpoint_dir(cfg), cfg, dims, keep=cfg.checkpoint.keep,
                                         async_save=cfg.checkpoint.async_save)
        self.progress = Progress()
        self.tokenizer = tokenizer_info(tokenizer)  # recorded in every checkpoint: a resume compares it
        self.is_logger = dims.rank == 0  # every rank holds the same reduced loss; one writes it
        self.metrics = MetricsWriter(cfg.run.dir, enabled=self.is_logger)
        self.log = LogWindow()
        self.bar = progress_bar(0, 0, enabled=False)
        self.stop: StopRequest | None = None  # installed by fit(), restored by close()
        if self.is_logger:
            write_run_config(cfg)
        warning = memory_warning(cfg, dims.world_size) if dims.device.type == "cuda" else None
        if warning:
            self.say(f"warning: {warning}")
        self.probe = None
        if cfg.eval.intrinsic and self.valid_loader is not None:
            self.probe = MaskedWordProbe(cfg, tokenizer, dims.dp_rank, dims.dp)
        if cfg.eval.interval and self.valid_loader is None:
            self.say("note: eval.interval is set, but data.split and data.valid_paths leave no validation "
                     "documents: validation is skipped")

    # ---------------------------------------------------------------------------- resume

    def restore(self, start: Start | None):
        """Resume this run, or begin a phase from checkpoint.load, or start fresh (training/startup.py
        chose which)."""
        c = self.cfg.checkpoint
        if start is not None and start.resume:
            loaded = self.checkpointer.load(start.path, self.model, self.optimizer)
            self.checkpointer.adopt(loaded)  # the same run goes on: its folders are its own to prune
            self._continue_from(loaded.meta)
            if loaded.rank_state is not None:
                set_rng_state(loaded.rank_state)
            self.say(f"resumed from {start.path} at step {self.progress.step}")
        elif start is not None:
            loaded = self.checkpointer.load(start.path, self.model, None if c.reset_optimizer else self.optimizer)
            if c.reset_optimizer:
                self.optimizer.sync_master_from_params()
            if not c.reset_schedule:
                self._continue_from(loaded.meta)
            self.say(f"new phase from {start.path} at step {self.progress.step}"
                     f"{' (fresh optimizer)' if c.reset_optimizer else ''}")
        self.train_loader.load_state_dict({"consumed_samples": self.progress.consumed_samples,
                                           "seed": self.cfg.train.seed})

    def _continue_from(self, meta: dict):
        step = int(meta.get("step", 0))
        # a model-only checkpoint (imported from HF, averaged) records no data position: assume this run's batches
        consumed = int(meta.get("consumed_samples", self.curricula.batch.consumed_at(step)))
        self.progress = Progress(step, consumed, int(meta.get("skipped_steps", 0)))

    # ---------------------------------------------------------------------------- loop

    def fit(self, start: Start | None = None, stop: "StopRequest | None" = None):
        self.watchdog.mark(0, "loading the checkpoint")
        self.restore(start)
        cfg, total = self.cfg, self.cfg.train.steps
        if self.progress.step >= total:
            self.say(f"nothing to do: the checkpoint is at step {self.progress.step} >= train.steps ({total})")
            return
        self.checkpointer.preflight(checkpoint_bytes(cfg))  # a full or read-only disk: now, not after the steps
        saved_at = self.progress.step
        in_a_row = 0
        self.bar = progress_bar(total, self.progress.step, enabled=self.is_logger)
        stop = self.stop = (stop or StopRequest()).attach(self.dims)
        while self.progress.step < total:
            self.watchdog.mark(self.progress.step + 1, "training")
            if stop.requested():
                self.say(f"stop requested by {stop.name}: saving step {self.progress.step} and exiting")
                break
            out = self.train_one_step()
            step = self.progress.step
            self.bar.update(1)
            in_a_row = in_a_row + 1 if out.skipped else 0
            aborting = in_a_row >= cfg.train.max_skipped_steps
            if aborting or step % cfg.log.interval == 0 or step == total:
                self.log_metrics(step)
            if aborting:
                raise TrainingAborted(
                    f"step {step}: {in_a_row} steps in a row had a non-finite loss or gradient norm (loss "
                    f"{out.loss}, grad norm {out.grad_norm}); nothing was updated by them. Lower optim.lr "
                    f"or raise optim.warmup_steps, check the data, or resume from an earlier checkpoint")
            if cfg.eval.interval and (step % cfg.eval.interval == 0 or step == total):
                self.watchdog.mark(step, "validation")
                self.evaluate(step)
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                self.save()
                saved_at = step
        if saved_at != self.progress.step:
            self.save()
        self.watchdog.mark(self.progress.step, "finishing the last checkpoint")
        self.checkpointer.wait()

    def train_one_step(self) -> StepResult:
        cfg, step = self.cfg, self.progress.step
        begin = time.perf_counter()
        batch_size = self.curricula.batch(step)
        per_rank = batch_size // (cfg.train.micro_batch_size * self.dims.dp)
        micro_batches = [next(self.train_loader) for _ in range(per_rank)]
        lr = schedules.learning_rate(step, cfg.optim, cfg.train.steps)
        out = train_step(self.model, self.optimizer, micro_batches, self.dims, lr)
        self.progress.step += 1
        self.progress.consumed_samples = self.train_loader.consumed_samples
        self.progress.skipped_steps += int(out.skipped)
        spec = self.train_loader.last_spec
        self.log.add(out, micro_batches, lr, batch_size, spec.seq_length, spec.mask_prob, time.perf_counter() - begin)
        return out

    def log_metrics(self, step: int):
        tokens = self.log.tokens
        if self.dims.dp_group is not None:  # every data-parallel rank saw different rows
            count = torch.tensor(tokens, dtype=torch.float64, device=self.dims.device)
            dist.all_reduce(count, group=self.dims.dp_group)
            tokens = count.item()
        record = {"step": step, **self.log.summary(tokens, self.cfg, self.dims.world_size, self.precision),
                  "consumed_samples": self.progress.consumed_samples, "skipped_steps": self.progress.skipped_steps,
                  "memory_gb": peak_memory_gb(self.dims.device)}
        self.log = LogWindow()
        self.metrics.log(record)
        # MFU is measured against the H100's peak: the console shows it only on a GPU
        line = console_line(record if self.dims.device.type == "cuda" else {**record, "mfu": None},
                            self.cfg.train.steps)
        self.say(line)
        self.bar.set_postfix_str(line.split(" | ", 1)[-1], refresh=False)

    def evaluate(self, step: int):
        if self.valid_loader is None:
            return
        batches = list(self.valid_loader)
        if not batches:
            self.say(f"step {step}: the validation set yields no batch of train.micro_batch_size rows: not validated")
            return
        if self.dims.vpp > 1:  # interleaved pipelining runs micro-batches in groups of pp
            n = -(-len(batches) // self.dims.pp) * self.dims.pp
            batches = list(itertools.islice(itertools.cycle(batches), n))
        out = eval_step(self.model, batches, self.dims)
        if out.num_tokens == 0:  # a loss of 0/0 is no measurement: log nothing rather than 0.0
            self.say(f"step {step}: validation found no masked token in {len(batches)} micro-batches: not logged")
            return
        record = {"step": step, "valid_loss": out.loss, "valid_accuracy": out.accuracy,
                  "valid_tokens": out.num_tokens}
        if self.probe is not None:
            record.update(self.probe(self.model, self.dims))
        self.metrics.log(record)
        words = f" | masked words {record['masked_word_accuracy']:.3f}" if "masked_word_accuracy" in record else ""
        self.say(f"step {step}/{self.cfg.train.steps} | valid loss {out.loss:.4f} | "
                 f"accuracy {out.accuracy:.3f}{words}")

    def save(self):
        self.watchdog.mark(self.progress.step, "checkpoint save")
        meta = {"step": self.progress.step, "consumed_samples": self.progress.consumed_samples,
                "skipped_steps": self.progress.skipped_steps, "tokenizer": self.tokenizer}
        self.checkpointer.save(self.progress.step, self.model, self.optimizer, meta=meta, rank_state=get_rng_state())

    def say(self, message: str):
        if self.is_logger:
            if self.bar.disable:
                print(message, flush=True)
            else:
                tqdm.write(message)

    def close(self):
        if self.stop is not None:
            self.stop.restore()
        self.bar.close()
        self.train_loader.close()
        self.metrics.close()


class LogWindow:
    """Sums over the steps between two log lines."""

    def __init__(self):
        self.losses, self.norms, self.seconds = [], [], 0.0
        self.tokens, self.predicted, self.flop_tokens, self.steps = 0, 0, 0.0, 0
        self.last: dict = {}

    def add(self, out: StepResult, micro_batches: list[dict], lr: float, batch_size: int, seq_length: int,
            mask_prob: float, seconds: float):
        if not out.skipped:
            self.losses.append(out.loss)
            self.norms.append(out.grad_norm)
        real = sum(int((b["segment_ids"] > 0).sum()) for b in micro_batches)
        s_eff = np.mean([effective_seq_length(b["segment_ids"]) for b in micro_batches])
        self.tokens += real
        self.predicted += out.num_tokens
        self.flop_tokens += real * float(s_eff)  # token-weighted s_eff for the FLOPs formula
        self.seconds += seconds
        self.steps += 1
        self.last = {"lr": lr, "global_batch_size": batch_size, "seq_length": seq_length, "mask_prob": mask_prob}

    def summary(self, global_tokens: float, cfg: Config, world: int, precision: Precision) -> dict:
        """loss and grad_norm are means over the interval's applied steps (exact values at interval 1);
        mfu is against the precision's peak (Precision.peak_flops: H100 SXM dense bf16, or FP8)."""
        nan = float("nan")
        s_eff = self.flop_tokens / max(self.tokens, 1)
        predicted_fraction = self.predicted / max(global_tokens, 1)
        tokens_per_second = global_tokens / max(self.seconds, 1e-9)
        per_device = tokens_per_second / world
        fpt = flops_per_token(cfg.model, s_eff, predicted_fraction)
        return {"loss": float(np.mean(self.losses)) if self.losses else nan,
                "grad_norm": float(np.mean(self.norms)) if self.norms else nan,
                **self.last,
                "tokens_per_second": tokens_per_second,
                "tflops_per_gpu": per_device * fpt / 1e12,
                "mfu": mfu(per_device, fpt, precision.peak_flops),
                "step_seconds": self.seconds / max(self.steps, 1)}


# ------------------------------------------------------------------------------------------ helpers


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """A tqdm bar on an interactive terminal; disabled (a no-op) in batch logs, which get log lines."""
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def write_run_config(cfg: Config):
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", to_yaml(cfg))


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory; on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def get_rng_state() -> dict:
    _, keys, pos, *_ = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
             "python": list(random.getstate()[1])}  # tensors and ints: loadable with weights_only=True
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
