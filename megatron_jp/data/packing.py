"""Rows of `seq_length` tokens from documents: which piece of which document goes where.

Every piece of a document becomes `[CLS] tokens [SEP]` in its row, so a piece holds at most
`seq_length - 2` tokens and costs its length + 2. Three methods:

* `none`: one document per row, truncated to seq_length - 2, the rest padding.
* `concat`: documents back to back in the given order; a document that does not fit in what is
  left of a row continues in the next one (a row ends early only when fewer than 3 slots remain).
* `best_fit`: documents longer than a row are split into row-sized pieces; then, within windows
  of `window` pieces, best-fit decreasing bin packing (each piece, longest first, goes to the open
  row with the least room that still fits it), which leaves little padding and never splits a
  document that fits in a row.

The result is a `PackedIndex`: piece arrays (document, start token, length) in row order and
`row_ptr`, the CSR offsets of each row's pieces. The sequential loops of concat and best_fit run
in C++ (`megatron_jp._helpers`, built from csrc/helpers/) when it is built, else in Python with
identical results (tests check both).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

try:  # built by setup.py from csrc/helpers/*.cpp; absent in a plain source checkout
    from megatron_jp import _helpers
except ImportError:  # pragma: no cover - depends on the build
    _helpers = None

PACKING_METHODS = ("none", "concat", "best_fit")
BEST_FIT_WINDOW = 8192
MIN_ROOM = 3  # [CLS] + one token + [SEP]


@dataclass
class PackedIndex:
    """Pieces in row order (`doc`, `start`, `length` per piece) and row offsets `row_ptr` (rows + 1)."""

    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    row_ptr: np.ndarray
    seq_length: int

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(piece indices of `rows` in order, row position (0..len(rows)-1) of each piece)."""
        first, count = self.row_ptr[rows], np.diff(self.row_ptr)[rows]
        total = int(count.sum())
        before = np.cumsum(count) - count
        pieces = np.repeat(first - before, count) + np.arange(total)
        return pieces, np.repeat(np.arange(len(rows)), count)

    def padding_fraction(self) -> float:
        used = int(self.length.sum()) + 2 * len(self.length)
        return 1.0 - used / max(self.num_rows * self.seq_length, 1)


def split_documents(docs: np.ndarray, lengths: np.ndarray, max_len: int):
    """(doc, start, length) of the pieces of at most max_len tokens each; empty documents vanish."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n_pieces = -(-lengths // max_len)
    doc = np.repeat(np.asarray(docs, dtype=np.int64), n_pieces)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    start = k * max_len
    return doc, start, np.minimum(max_len, np.repeat(lengths, n_pieces) - start)


def pack_none(docs, lengths, seq_length: int) -> PackedIndex:
    keep = np.asarray(lengths) > 0
    doc = np.asarray(docs, dtype=np.int64)[keep]
    length = np.minimum(np.asarray(lengths, dtype=np.int64)[keep], seq_length - 2)
    return PackedIndex(doc, np.zeros_like(doc), length, np.arange(len(doc) + 1, dtype=np.int64), seq_length)


def _concat_python(lengths: np.ndarray, seq_length: int):
    """(source document position, start, length) per piece and row_ptr, filling rows in order."""
    src, starts, sizes, row_ptr = [], [], [], [0]
    room = seq_length
    for i, total in enumerate(lengths.tolist()):
        start = 0
        while start < total:
            if room < MIN_ROOM:
                row_ptr.append(len(src))
                room = seq_length
            take = min(total - start, room - 2)
            src.append(i)
            starts.append(start)
            sizes.append(take)
            room -= take + 2
            start += take
    if len(src) > row_ptr[-1]:
        row_ptr.append(len(src))
    return (np.asarray(src, np.int64), np.asarray(starts, np.int64), np.asarray(sizes, np.int64),
            np.asarray(row_ptr, np.int64))


def pack_concat(docs, lengths, seq_length: int) -> PackedIndex:
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    impl = _helpers.pack_concat if _helpers is not None else _concat_python
    src, start, length, row_ptr = impl(lengths, seq_length)
    return PackedIndex(np.asarray(docs, dtype=np.int64)[src], start, length, row_ptr, seq_length)


def _best_fit_python(sizes: np.ndarray, seq_length: int, window: int):
    """(piece order, row_ptr): best-fit decreasing within consecutive windows of pieces."""
    order_out, row_ptr = [], [0]
    for lo in range(0, len(sizes), window):
        part = sizes[lo:lo + window]
        rows, free = [], []  # free: sorted (room left, row number)
        for p in np.argsort(-part, kind="stable").tolist():
            need = int(part[p]) + 2
            i = bisect.bisect_left(free, (need, -1))
            if i < len(free):
                room, row = free.pop(i)
            else:
                room, row = seq_length, len(rows)
                rows.append([])
            rows[row].append(lo + p)
            if room - need >= MIN_ROOM:
                bisect.insort(free, (room - need, row))
        for row in rows:
            order_out += row
            row_ptr.append(len(order_out))
    return np.asarray(order_out, np.int64), np.asarray(row_ptr, np.int64)


def pack_best_fit(docs, lengths, seq_length: int, window: int = BEST_FIT_WINDOW) -> PackedIndex:
    doc, start, length = split_documents(docs, lengths, seq_length - 2)
    impl = _helpers.pack_best_fit if _helpers is not None else _best_fit_python
    order, row_ptr = impl(np.ascontiguousarray(length), seq_length, window)
    return PackedIndex(doc[order], start[order], length[order], row_ptr, seq_length)


def build_packed_index(method: str, docs, lengths, seq_length: int) -> PackedIndex:
    """Pack documents `docs` (ids, in the order to use) of the given lengths into rows."""
    if seq_length < MIN_ROOM:
        raise ValueError(f"seq_length {seq_length} leaves no room for [CLS] token [SEP]")
    if method == "none":
        return pack_none(docs, lengths, seq_length)
    if method == "concat":
        return pack_concat(docs, lengths, seq_length)
    if method == "best_fit":
        return pack_best_fit(docs, lengths, seq_length)
    raise ValueError(f"unknown packing {method!r}; choose one of {', '.join(PACKING_METHODS)}")
