"""Data loaders for training: micro-batches per data-parallel rank, resumable, with curricula.

    train, valid = build_data_loaders(cfg.data, tokenizer, micro_batch_size=4, dp_rank=r, dp_size=n,
                                      seed=cfg.train.seed, global_batch_size=cfg.train.global_batch_size,
                                      mask_prob_at=..., seq_length_at=...)
    batch = next(train)            # dict of (B, S) int64 tensors: input_ids, labels, segment_ids, position_ids
    state = train.state_dict()     # {"consumed_samples": ..., ...}; train.load_state_dict(state) resumes

Sample order: micro-step m covers global samples [m*B*dp, (m+1)*B*dp); rank r takes its B
consecutive ones (Megatron's pretraining sampler). `consumed_samples` counts samples over all ranks.

Curricula: the mask rate and seq length of a batch are functions of the optimizer step
(step = consumed_samples // global_batch_size): `mask_prob_at(step) -> float`,
`seq_length_at(step) -> int` (e.g. megatron_jp.training.schedules' `LinearSchedule(0.3, 0.15,
10_000)` or `StagedSchedule({0: 128, 90_000: 512})`). The sampler, which runs ahead of the DataLoader
workers, stamps each batch with its values, so prefetched batches are always right; a batch
is a pure function of (seed, sample indices, seq_length, mask_prob), hence reproducible and
resumable. `set_mask_prob(p)` / `set_seq_length(s)` (a value or a schedule) may also be called
from the training loop: prefetched batches that no longer match are dropped. A new seq_length
builds that length's packed index (a schedule with `values()` has all of its lengths built before
the workers start).

Indices live in the index cache (`data.cache_dir`, default `index-cache/` next to the first shard
of data.paths; megatron_jp.data.index_cache): built once by one process, memory-mapped by all, so
a rank's memory does not grow with the corpus. `tools/build_index.py` builds them ahead of a job.
Every shard's provenance sidecar is checked against the tokenizer (megatron_jp.data.provenance).
`TrainLoader.summary(steps, consumed_at)` is the per-source table printed at start.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass

import torch

from megatron_jp.data import indexed, provenance
from megatron_jp.data.datasets import TRAIN, VALID, MLMDataset, PackedSource, parse_blend, split_bounds
from megatron_jp.data.index_cache import IndexCache
from megatron_jp.data.masking import Masker


def _constant(value):
    return lambda step: value


@dataclass(frozen=True)
class BatchSpec:
    """What one rank's micro-batch is: its first global sample, size, seq length and mask rate."""

    consumed: int
    first: int
    size: int
    seq_length: int
    mask_prob: float


class _Plan:
    """Which samples, seq length and mask rate each micro-batch of one rank gets. It holds no
    reference to the loader, so the DataLoader iterator that samples from it forms no cycle with
    the TrainLoader (a cycle delays the workers' shutdown by seconds)."""

    def __init__(self, micro_batch_size: int, dp_rank: int, dp_size: int, global_batch_size: int | None,
                 step_of=None):
        self.micro_batch_size, self.dp_rank = micro_batch_size, dp_rank
        self.samples_per_micro_step = micro_batch_size * dp_size
        self.global_batch_size = global_batch_size or self.samples_per_micro_step
        self.step_of = step_of or self._fixed_batch_step
        self.mask_prob_at = self.seq_length_at = None

    def _fixed_batch_step(self, consumed: int) -> int:
        return consumed // self.global_batch_size

    def spec_at(self, consumed: int) -> BatchSpec:
        step = self.step_of(consumed)
        first = consumed + self.dp_rank * self.micro_batch_size
        return BatchSpec(consumed, first, self.micro_batch_size, int(self.seq_length_at(step)),
                         float(self.mask_prob_at(step)))


class _SpecStream:
    """The DataLoader's sampler: an endless stream of BatchSpecs from a starting position."""

    def __init__(self, plan: _Plan, consumed: int):
        self.plan, self.consumed = plan, consumed

    def __iter__(self):
        consumed = self.consumed
        while True:
            yield self.plan.spec_at(consumed)
            consumed += self.plan.samples_per_micro_step


class _SpecDataset(torch.utils.data.Dataset):
    def __init__(self, mlm: MLMDataset):
        self.mlm = mlm

    def __getitem__(self, spec: BatchSpec):
        return self.mlm.batch(range(spec.first, spec.first + spec.size), spec.seq_length, spec.mask_prob), spec


def _no_collate(item):
    return item


class TrainLoader:
    """Endless iterator of this rank's micro-batches; `state_dict()`/`load_state_dict()` resume it."""

    def __init__(self, mlm: MLMDataset, *, micro_batch_size: int, dp_rank: int, dp_size: int, num_workers: int,
                 global_batch_size: int | None, mask_prob_at, seq_length_at, seed: int, step_of=None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.mlm, self.micro_batch_size, self.dp_rank, self.dp_size = mlm, micro_batch_size, dp_rank, dp_size
        self.plan = _Plan(micro_batch_size, dp_rank, dp_size, global_batch_size, step_of)
        self.samples_per_micro_step = self.plan.samples_per_micro_step
        self.global_batch_size = self.plan.global_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.consumed_samples, self.last_spec, self._it = 0, None, None
        self.set_mask_prob(mask_prob_at)
        self.set_seq_length(seq_length_at)

    @staticmethod
    def _schedule(value_or_fn):
        return value_or_fn if callable(value_or_fn) else _constant(value_or_fn)

    def set_mask_prob(self, value_or_schedule) -> None:
        """Mask rate from the next batch on: a float, or a function of the optimizer step."""
        self.plan.mask_prob_at = self._schedule(value_or_schedule)

    def set_seq_length(self, value_or_schedule) -> None:
        """Seq length from the next batch on: an int, or a function of the optimizer step."""
        self.plan.seq_length_at = self._schedule(value_or_schedule)
        for s in getattr(value_or_schedule, "values", lambda: [value_or_schedule])():
            if isinstance(s, numbers.Integral):
                self.mlm.prepare(int(s))

    @property
    def step(self) -> int:
        return self.plan.step_of(self.consumed_samples)

    def spec_at(self, consumed: int) -> BatchSpec:
        return self.plan.spec_at(consumed)

    def _start(self):
        stream = _SpecStream(self.plan, self.consumed_samples)
        if self.num_workers <= 0:
            self._it = (_SpecDataset(self.mlm)[spec] for spec in stream)
            return
        # pinned host memory on GPU machines: the step's copies to the device then run without waiting
        loader = torch.utils.data.DataLoader(_SpecDataset(self.mlm), sampler=stream, batch_size=None,
                                             num_workers=self.num_workers, collate_fn=_no_collate,
                                             prefetch_factor=2, persistent_workers=False,
                                             pin_memory=torch.cuda.is_available())
        self._it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        expected = self.spec_at(self.consumed_samples)
        if self._it is None:
            self._start()
        batch, spec = next(self._it)
        if spec != expected:  # schedule changed after these were prefetched: restart here
            self._it = None
            return self.__next__()
        self.consumed_samples += self.samples_per_micro_step
        self.last_spec = spec
        return batch

    def summary(self, total_steps: int, consumed_at=None) -> str:
        """The per-source table of the blend (megatron_jp.data.summary) for a run of total_steps;
        consumed_at(step) -> samples before that step (the default: a fixed global batch size)."""
        from megatron_jp.data.summary import blend_summary, stage_samples

        consumed_at = consumed_at or (lambda step: step * self.global_batch_size)
        stages = stage_samples(self.plan.seq_length_at, total_steps, consumed_at)
        return blend_summary(self.mlm, stages, total_steps)

    def close(self) -> None:
        """Stop the DataLoader workers now (they also stop when the loader is garbage collected)."""
        self._it = None

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed,
                "micro_batch_size": self.micro_batch_size, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this run uses {self.seed}: "
                             "the sample order would differ; keep train.seed to resume")
        self.consumed_samples = int(state["consumed_samples"])
        self._it = None


class ValidLoader:
    """Fixed validation batches: every iteration yields the same `len(self)` micro-batches."""

    def __init__(self, mlm: MLMDataset, *, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seq_length: int, mask_prob: float, max_batches: int | None = None):
        self.mlm, self.micro_batch_size, self.dp_rank, self.dp_size = mlm, micro_batch_size, dp_rank, dp_size
        self.seq_length, self.mask_prob = seq_length, mask_prob
        self.max_batches = max_batches

    def __len__(self) -> int:
        n = max(1, self.mlm.num_rows(self.seq_length) // (self.micro_batch_size * self.dp_size))
        return n if self.max_batches is None else min(n, self.max_batches)

    def __iter__(self):
        step = self.micro_batch_size * self.dp_size
        for m in range(len(self)):
            first = m * step + self.dp_rank * self.micro_batch_size
            yield self.mlm.batch(range(first, first + self.micro_batch_size), self.seq_length, self.mask_prob)


STREAM_STRIDE = 1 << 20  # source d of split stream s draws from stream s * STREAM_STRIDE + d


def cache_root(cfg) -> str:
    """data.cache_dir, or `index-cache/` next to the first shard of data.paths."""
    if getattr(cfg, "cache_dir", ""):
        return cfg.cache_dir
    first = parse_blend(cfg.paths)[0][1]
    return os.path.join(os.path.dirname(os.path.abspath(first)), "index-cache")


def _sources(paths: str, part: int | None, cfg, seed: int, stream: int, cache: IndexCache, tok_info, notes,
             unchecked):
    """(sources, weights) of a blend; `part` picks the train or valid documents of each prefix."""
    sources, weights = [], []
    for d, (weight, prefix) in enumerate(parse_blend(paths)):
        shard = indexed.IndexedDataset(prefix)
        note = provenance.check_shard(prefix, shard, tok_info, getattr(cfg, "ignore_tokenizer_mismatch", False))
        if note == provenance.NO_SIDECAR:
            unchecked.append(prefix)
        elif note:
            notes.append(note)
        doc_range = (0, len(shard)) if part is None else split_bounds(len(shard), cfg.split)[part]
        if doc_range[1] > doc_range[0]:
            sources.append(PackedSource(prefix, doc_range, cfg.packing, seed, stream * STREAM_STRIDE + d,
                                        cfg.whole_word_masking, cache, getattr(cfg, "keep_empty_documents", False)))
            weights.append(weight)
    return sources, weights


def build_mlm_dataset(cfg, tokenizer, seed: int, stream: int, cache: IndexCache | None = None) -> MLMDataset | None:
    """The train (stream TRAIN) or valid (stream VALID) MLMDataset of a DataConfig, or None if empty."""
    cache, notes, unchecked = cache or IndexCache(cache_root(cfg)), [], []
    tok_info = provenance.tokenizer_info(tokenizer)
    if stream == VALID and cfg.valid_paths:
        sources, weights = _sources(cfg.valid_paths, None, cfg, seed, stream, cache, tok_info, notes, unchecked)
    else:
        sources, weights = _sources(cfg.paths, stream, cfg, seed, stream, cache, tok_info, notes, unchecked)
    if not sources:
        return None
    masker = Masker(tokenizer.vocab_size, tokenizer.mask_id, tokenizer.special_ids, cfg.mask_token_prob,
                    cfg.random_token_prob, cfg.whole_word_masking)
    mlm = MLMDataset(sources, weights, tokenizer, masker, seed, stream, cache=cache)
    mlm.notes += notes
    mlm.unchecked += unchecked
    return mlm


def raise_open_file_limit(needed: int) -> None:
    """Every memory map holds a file descriptor (shard .bin/.idx, word shard, 3 arrays per index):
    a blend of hundreds of shards passes the common soft limit of 1024, so raise it toward the hard
    limit (as far as needed, plus room for everything else)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 1024
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def build_data_loaders(data_cfg, tokenizer, *, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                       global_batch_size: int | None = None, mask_prob_at=None, seq_length_at=None,
                       valid_max_batches: int | None = None, step_of=None):
    """(train_loader, valid_loader or None) for a DataConfig-like object (see the module docstring).

    mask_prob_at / seq_length_at default to the constants data_cfg.mask_prob / data_cfg.seq_length.
    step_of(consumed_samples) -> optimizer step, for the curricula; the default, consumed //
    global_batch_size, is wrong under a batch-size ramp-up, which passes its own.
    """
    n_stages = len(getattr(seq_length_at, "values", lambda: [None])())
    n_sources = len(parse_blend(data_cfg.paths)) + (len(parse_blend(data_cfg.valid_paths)) if data_cfg.valid_paths else 0)
    raise_open_file_limit(2 * n_sources * (4 + 3 * (n_stages + 1)))
    cache = IndexCache(cache_root(data_cfg))
    train_set = build_mlm_dataset(data_cfg, tokenizer, seed, TRAIN, cache)
    if train_set is None:
        raise ValueError(f"data.paths {str(data_cfg.paths)!r} with split {data_cfg.split!r} leaves no training documents")
    train = TrainLoader(train_set, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                        num_workers=data_cfg.num_workers, global_batch_size=global_batch_size,
                        mask_prob_at=data_cfg.mask_prob if mask_prob_at is None else mask_prob_at,
                        seq_length_at=data_cfg.seq_length if seq_length_at is None else seq_length_at, seed=seed,
                        step_of=step_of)
    valid_set = build_mlm_dataset(data_cfg, tokenizer, seed, VALID, cache)
    if valid_set is not None:
        valid_set.prepare(data_cfg.seq_length)  # build (or map) its index now, not at the first evaluation
    valid = None if valid_set is None else ValidLoader(
        valid_set, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
        seq_length=data_cfg.seq_length, mask_prob=data_cfg.mask_prob, max_batches=valid_max_batches)
    return train, valid
