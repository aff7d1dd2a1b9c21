"""Blended, split, packed MLM datasets: global sample index -> (B, S) batch following the batch contract.

* Blend: `"w1 prefix1 w2 prefix2 ..."` or one prefix (Megatron style). Sample i of the blend is
  mapped to (dataset, k) by a fixed interleaving with a period P (BLEND_PERIOD, doubled up to
  MAX_BLEND_PERIOD until every weight gets >= MIN_SLOTS slots, so blends of hundreds of shards keep
  their weights within ~1%): each period holds round(w_d * P) samples of dataset d, spread evenly
  (the k-th at time (k + 1/2) / n_d), so the mapping is O(1) and deterministic. A table of P
  entries; above BLEND_PERIOD it lives in the index cache, memory-mapped.
* Split: the documents of each prefix are split in order by the `split` weights ("98,2"): the
  first part trains, the next validates (a third value, Megatron's test part, is left out).
* Packing, epochs: megatron_jp.data.sources (rows built once in the index cache, a seeded bijection
  per epoch). Indices are built per seq_length on first use, so a curriculum can change seq_length
  between batches.
* Batch: rows are laid out as [CLS] piece [SEP] [CLS] piece [SEP] ... [PAD]..., with
  `segment_ids` 1..n per piece (0 on padding), `position_ids` restarting at 0 per piece, and MLM
  masks from megatron_jp.data.masking keyed by (seed, split stream, global sample index). A token
  id outside the tokenizer's vocabulary is refused here, naming the shard and document.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_jp.config_fields import Blend
from megatron_jp.data import indexed
from megatron_jp.data.masking import Masker, row_randoms
from megatron_jp.data.sources import DataError, PackedSource

BLEND_PERIOD = 1 << 16
MAX_BLEND_PERIOD = 1 << 22
MIN_SLOTS = 64  # slots per period of the lightest dataset: its realised weight is within 1/128 of its own
TRAIN, VALID = 0, 1


def parse_blend(paths) -> list[tuple[float, str]]:
    """[(weight, prefix)] of data.paths: a Blend the config parsed once, or its text (tools, benches)."""
    blend = paths if isinstance(paths, Blend) else Blend.parse(paths, "data.paths")
    if not blend:
        raise ValueError("data.paths is empty: give a shard prefix or 'w1 prefix1 w2 prefix2'")
    return list(blend.sources)


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


def blend_period(weights) -> int:
    """BLEND_PERIOD, doubled (up to MAX_BLEND_PERIOD) until the lightest weight gets MIN_SLOTS slots."""
    w = np.asarray(weights, dtype=np.float64)
    lightest = w[w > 0].min() if (w > 0).any() else 1.0
    period = BLEND_PERIOD
    while period < MAX_BLEND_PERIOD and lightest * period < MIN_SLOTS:
        period *= 2
    return period


def blend_counts(weights, period: int) -> np.ndarray:
    """Slots per period of each dataset: largest remainders fill the period; weight > 0 gets >= 1."""
    w = np.asarray(weights, dtype=np.float64)
    counts = np.floor(w * period).astype(np.int64)
    counts[np.argsort(-(w * period - counts), kind="stable")[:period - counts.sum()]] += 1
    return np.where(w > 0, np.maximum(counts, 1), 0)


def blend_table(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dataset, rank within the dataset) of each slot of a period, the k-th of d at (k + 1/2) / n_d."""
    dataset = np.repeat(np.arange(len(counts)), counts)
    rank = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    order = np.lexsort((dataset, (rank + 0.5) / counts[dataset]))
    return dataset[order], rank[order]


class BlendIndex:
    """O(1) deterministic map from a blend sample index to (dataset, sample index in the dataset)."""

    def __init__(self, weights, period: int | None = None, cache=None):
        period = period or blend_period(weights)
        self.counts = blend_counts(weights, period)
        self.period = int(self.counts.sum())
        if cache is None or self.period <= BLEND_PERIOD:
            self.dataset, self.rank = blend_table(self.counts)
            return

        def build(writer):
            dataset, rank = blend_table(self.counts)
            writer.array("dataset", np.int32).append(dataset)
            writer.array("rank", np.int64).append(rank)
            return {"period": self.period}

        entry = cache.get_or_build("blend", {"counts": self.counts.tolist(), "version": 1}, build)
        self.dataset, self.rank = entry.arrays["dataset"], entry.arrays["rank"]

    @property
    def realized_weights(self) -> np.ndarray:
        return self.counts / self.period

    def __call__(self, indices) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        cycle, pos = np.divmod(indices, self.period)
        d = np.asarray(self.dataset[pos], dtype=np.int64)
        return d, cycle * self.counts[d] + np.asarray(self.rank[pos], dtype=np.int64)


class MLMDataset:
    """Builds contract batches (dicts of (B, S) int64 tensors) for global sample indices of a blend."""

    def __init__(self, sources: list[PackedSource], weights, tokenizer, masker: Masker, seed: int, stream: int,
                 cache=None):
        self.sources, self.blend, self.masker = sources, BlendIndex(weights, cache=cache), masker
        self.cache = cache
        self.weights = np.asarray(weights, dtype=np.float64)
        self.seed, self.stream = seed, stream
        self.cls_id, self.sep_id, self.pad_id = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id
        self.vocab_size = int(tokenizer.vocab_size)
        self.notes: list[str] = []  # what the start-up summary should say (e.g. a tokenizer mismatch allowed)
        self.unchecked: list[str] = []  # shards without a provenance sidecar

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
        offset, length = index.pieces(pieces)
        span = length + 2
        end_in_row = _segmented_cumsum(span, row_of_piece)
        base = batch_rows[row_of_piece] * S + end_in_row - span  # [CLS] slot of each piece
        rank = _segmented_cumsum(np.ones_like(span), row_of_piece)  # 1..n within the row
        slots = _ranges(base, span)
        seg[slots] = np.repeat(rank, span)
        pos[slots] = slots - np.repeat(base, span)
        ids[base], ids[base + span - 1] = self.cls_id, self.sep_id
        dst = _ranges(base + 1, length)
        src_pos = _ranges(offset, length)
        values = src.tokens.tokens[src_pos]
        self._check_ids(src, values, src_pos)
        ids[dst] = values
        if words is not None:
            words[dst] = src.words.tokens[src_pos] != 0
            words[base + 1] = True  # a piece may start inside a word: it still starts a unit

    def _check_ids(self, src: PackedSource, values: np.ndarray, src_pos: np.ndarray) -> None:
        """Refuse ids the model cannot embed (a shard made with another tokenizer), naming the document."""
        if not values.size:
            return
        bad = (values >= self.vocab_size) | (values < 0) if values.dtype.kind == "i" else values >= self.vocab_size
        if bad.any():
            first = int(np.argmax(bad))
            doc = int(src.tokens.document_at([src_pos[first]])[0])
            raise DataError(f"{indexed.bin_path(src.prefix)}: document {doc} holds token id {int(values[first])}, "
                            f"outside the tokenizer's vocabulary of {self.vocab_size}: the shard was made with "
                            "another tokenizer than data.tokenizer_model; re-run tools/preprocess_data.py with it")


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

