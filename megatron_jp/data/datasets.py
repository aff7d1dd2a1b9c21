"""Blended, split, packed MLM datasets: global sample index -> (B, S) batch following the batch contract.

* Blend: `"w1 prefix1 w2 prefix2 ..."` or one prefix (Megatron style). Sample i of the blend is
  mapped to (dataset, k) by a fixed interleaving with period BLEND_PERIOD: each period holds
  round(w_d * period) samples of dataset d, spread evenly (the k-th at time (k + 1/2) / n_d), so
  the mapping is O(1), deterministic and needs no table over the whole run.
* Split: the documents of each prefix are split in order by the `split` weights ("98,2"): the
  first part trains, the next validates (a third value, Megatron's test part, is left out).
* Packing: the documents of a part are shuffled once (seeded) and packed into rows
  (megatron_jp.data.packing) for a given seq_length; sample k of a dataset is row
  perm_e[k mod rows] with a fresh seeded permutation per epoch e = k // rows. Indices are built
  lazily per seq_length and cached, so a curriculum can change seq_length between batches.
* Batch: rows are laid out as [CLS] piece [SEP] [CLS] piece [SEP] ... [PAD]..., with
  `segment_ids` 1..n per piece (0 on padding), `position_ids` restarting at 0 per piece, and MLM
  masks from megatron_jp.data.masking keyed by (seed, split stream, global sample index).
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_jp.data import indexed
from megatron_jp.data.masking import Masker, row_randoms
from megatron_jp.data.packing import PACKING_METHODS, build_packed_index

BLEND_PERIOD = 1 << 16
TRAIN, VALID = 0, 1


def parse_blend(paths: str) -> list[tuple[float, str]]:
    """[(weight, prefix)] from "prefix" or "w1 prefix1 w2 prefix2 ..."; weights normalised to sum 1."""
    items = paths.split()
    if not items:
        raise ValueError("data.paths is empty: give a shard prefix or 'w1 prefix1 w2 prefix2'")
    if len(items) == 1:
        return [(1.0, items[0])]
    if len(items) % 2:
        raise ValueError(f"data.paths {paths!r}: expected weight/prefix pairs, got an odd number of items")
    pairs = []
    for w, prefix in zip(items[::2], items[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"data.paths {paths!r}: {w!r} is not a weight (format: 'w1 prefix1 w2 prefix2')") from None
        if weight < 0:
            raise ValueError(f"data.paths {paths!r}: negative weight {weight} for {prefix}")
        pairs.append((weight, prefix))
    total = sum(w for w, _ in pairs)
    if total <= 0:
        raise ValueError(f"data.paths {paths!r}: weights sum to 0")
    return [(w / total, p) for w, p in pairs]


def split_bounds(n_docs: int, split: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Document ranges (train, valid) of a prefix with n_docs documents for weights "a,b[,c]"."""
    try:
        weights = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"data.split {split!r}: expected comma-separated weights such as '98,2'") from None
    weights += [0.0] * (3 - len(weights))
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"data.split {split!r}: expected 2 or 3 non-negative weights, not all 0")
    total = sum(weights)
    train_end = int(round(n_docs * weights[0] / total))
    valid_end = int(round(n_docs * (weights[0] + weights[1]) / total))
    return (0, train_end), (train_end, valid_end)


class BlendIndex:
    """O(1) deterministic map from a blend sample index to (dataset, sample index in the dataset)."""

    def __init__(self, weights, period: int = BLEND_PERIOD):
        w = np.asarray(weights, dtype=np.float64)
        counts = np.floor(w * period).astype(np.int64)
        # Largest remainders fill the period; a dataset with weight > 0 gets at least one slot.
        counts[np.argsort(-(w * period - counts), kind="stable")[:period - counts.sum()]] += 1
        counts = np.where(w > 0, np.maximum(counts, 1), 0)
        self.counts, self.period = counts, int(counts.sum())
        dataset = np.repeat(np.arange(len(w)), counts)
        rank = np.arange(self.period) - np.repeat(np.cumsum(counts) - counts, counts)
        order = np.lexsort((dataset, (rank + 0.5) / counts[dataset]))
        self.dataset, self.rank = dataset[order], rank[order]

    def __call__(self, indices) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        cycle, pos = np.divmod(indices, self.period)
        d = self.dataset[pos]
        return d, cycle * self.counts[d] + self.rank[pos]


class PackedSource:
    """The documents [lo, hi) of one shard, shuffled once and packed into rows per seq_length."""

    def __init__(self, prefix: str, doc_range: tuple[int, int], packing: str, seed: int, stream: int,
                 whole_word: bool):
        if packing not in PACKING_METHODS:
            raise ValueError(f"data.packing {packing!r}: choose one of {', '.join(PACKING_METHODS)}")
        self.prefix, self.packing, self.seed, self.stream = prefix, packing, seed, stream
        self.tokens = indexed.IndexedDataset(prefix)
        self.words = indexed.open_words(prefix, self.tokens) if whole_word else None
        lo, hi = doc_range
        order = _generator(seed, stream, 0xD0C).permutation(hi - lo) + lo
        self.docs = order[self.tokens.doc_lengths[order] > 0]
        self._indices: dict = {}
        self._perm: dict = {}

    def __len__(self) -> int:
        return len(self.docs)

    def index(self, seq_length: int):
        if seq_length not in self._indices:
            self._indices[seq_length] = build_packed_index(self.packing, self.docs,
                                                           self.tokens.doc_lengths[self.docs], seq_length)
        return self._indices[seq_length]

    def rows_for(self, samples: np.ndarray, seq_length: int) -> np.ndarray:
        """Row of each dataset sample k: a seeded permutation of all rows per epoch."""
        n_rows = self.index(seq_length).num_rows
        epochs, pos = np.divmod(samples, n_rows)
        rows = np.empty_like(samples)
        for e in np.unique(epochs):
            rows[epochs == e] = self._permutation(seq_length, int(e), n_rows)[pos[epochs == e]]
        return rows

    def _permutation(self, seq_length: int, epoch: int, n_rows: int) -> np.ndarray:
        key = (seq_length, epoch)
        if key not in self._perm:
            if len(self._perm) >= 4:  # a batch spans at most two epochs; keep memory flat
                self._perm.pop(next(iter(self._perm)))
            self._perm[key] = _generator(self.seed, self.stream, 0xE0C0 + epoch).permutation(n_rows)
        return self._perm[key]

    def __getstate__(self):
        # Rebuilt lazily in each DataLoader worker only when not inherited by fork.
        return {k: v for k, v in self.__dict__.items() if k != "_perm"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._perm = {}


def _generator(seed: int, stream: int, purpose: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(key=np.array([seed, (stream << 32) | purpose], dtype=np.uint64)))


class MLMDataset:
    """Builds contract batches (dicts of (B, S) int64 tensors) for global sample indices of a blend."""

    def __init__(self, sources: list[PackedSource], weights, tokenizer, masker: Masker, seed: int, stream: int):
        self.sources, self.blend, self.masker = sources, BlendIndex(weights), masker
        self.seed, self.stream = seed, stream
        self.cls_id, self.sep_id, self.pad_id = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id

    def num_rows(self, seq_length: int) -> int:
        return sum(s.index(seq_length).num_rows for s in self.sources)

    def prepare(self, seq_length: int) -> None:
        """Build the packed indices for seq_length now (before DataLoader workers fork)."""
        for s in self.sources:
            s.index(seq_length)

    def batch(self, indices, seq_length: int, mask_prob: float) -> dict[str, torch.Tensor]:
        ids, words, seg, pos = self.layout(np.asarray(indices, dtype=np.int64), seq_length)
        randoms = row_randoms(self.seed, self.stream, indices, seq_length)
        masked, labels = self.masker(ids, words, randoms, mask_prob)
        return {"input_ids": torch.from_numpy(masked), "labels": torch.from_numpy(labels),
                "segment_ids": torch.from_numpy(seg), "position_ids": torch.from_numpy(pos)}

    def layout(self, indices: np.ndarray, seq_length: int):
        """(ids, word starts or None, segment ids, position ids) of the rows of these samples."""
        B, S = len(indices), seq_length
        ids = np.full(B * S, self.pad_id, dtype=np.int64)
        seg, pos = np.zeros(B * S, np.int64), np.zeros(B * S, np.int64)
        words = np.zeros(B * S, dtype=bool) if self.masker.whole_word else None
        d_of, k_of = self.blend(indices)
        for d in np.unique(d_of):
            rows_here = np.flatnonzero(d_of == d)
            self._fill(self.sources[d], rows_here, k_of[rows_here], S, (ids, words, seg, pos))
        shape = (B, S)
        return ids.reshape(shape), None if words is None else words.reshape(shape), seg.reshape(shape), pos.reshape(shape)

    def _fill(self, src: PackedSource, batch_rows, samples, S: int, out) -> None:
        ids, words, seg, pos = out
        index = src.index(S)
        pieces, row_of_piece = index.rows(src.rows_for(samples, S))
        length = index.length[pieces]
        span = length + 2
        end_in_row = _segmented_cumsum(span, row_of_piece)
        base = batch_rows[row_of_piece] * S + end_in_row - span  # [CLS] slot of each piece
        rank = _segmented_cumsum(np.ones_like(span), row_of_piece)  # 1..n within the row
        slots = _ranges(base, span)
        seg[slots] = np.repeat(rank, span)
        pos[slots] = slots - np.repeat(base, span)
        ids[base], ids[base + span - 1] = self.cls_id, self.sep_id
        dst = _ranges(base + 1, length)
        src_pos = _ranges(src.tokens.doc_offsets[index.doc[pieces]] + index.start[pieces], length)
        ids[dst] = src.tokens.tokens[src_pos]
        if words is not None:
            words[dst] = src.words.tokens[src_pos] != 0
            words[base + 1] = True  # a piece may start inside a word: it still starts a unit


def _segmented_cumsum(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum of `values` restarting where the (sorted) `groups` value changes."""
    total = np.cumsum(values)
    first = np.r_[True, groups[1:] != groups[:-1]] if len(groups) else np.zeros(0, bool)
    start_idx = np.maximum.accumulate(np.where(first, np.arange(len(values)), 0))
    return total - (total - values)[start_idx]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    before = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - before, lengths) + np.arange(total)

