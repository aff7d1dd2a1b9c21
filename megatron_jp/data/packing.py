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

`StreamPacker` runs the same methods over documents fed in chunks (the index cache builds with it,
so memory stays bounded whatever the corpus size) and gives exactly the rows that one call over
the concatenated documents would: best_fit windows are counted over the whole piece stream and
concat carries its open row across chunks. Zero-token documents vanish, or become one empty piece
(`[CLS][SEP]`) with keep_empty.
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


def split_documents(docs: np.ndarray, lengths: np.ndarray, max_len: int, keep_empty: bool = False):
    """(doc, start, length) of the pieces of at most max_len tokens each; empty documents vanish
    unless keep_empty (then each is one piece of length 0)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n_pieces = -(-lengths // max_len)
    if keep_empty:
        n_pieces = np.maximum(n_pieces, 1)
    doc = np.repeat(np.asarray(docs, dtype=np.int64), n_pieces)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    start = k * max_len
    return doc, start, np.minimum(max_len, np.repeat(lengths, n_pieces) - start)


def pack_none(docs, lengths, seq_length: int, keep_empty: bool = False) -> PackedIndex:
    keep = np.ones(len(lengths), bool) if keep_empty else np.asarray(lengths) > 0
    doc = np.asarray(docs, dtype=np.int64)[keep]
    length = np.minimum(np.asarray(lengths, dtype=np.int64)[keep], seq_length - 2)
    return PackedIndex(doc, np.zeros_like(doc), length, np.arange(len(doc) + 1, dtype=np.int64), seq_length)


def _concat_python(lengths: np.ndarray, seq_length: int, room: int, keep_empty: bool):
    """(source document position, start, length) per piece, the row ends within this call and the
    room left in the open row (see pack_concat in csrc/helpers/packing.cpp)."""
    src, starts, sizes, row_ends = [], [], [], []
    for i, total in enumerate(lengths.tolist()):
        start, first = 0, keep_empty and total == 0
        while start < total or first:
            first = False
            if room < MIN_ROOM:
                row_ends.append(len(src))
                room = seq_length
            take = min(total - start, room - 2)
            src.append(i)
            starts.append(start)
            sizes.append(take)
            room -= take + 2
            start += take
    return (np.asarray(src, np.int64), np.asarray(starts, np.int64), np.asarray(sizes, np.int64),
            np.asarray(row_ends, np.int64), room)


def _concat(lengths, seq_length: int, room: int, keep_empty: bool):
    impl = _helpers.pack_concat if _helpers is not None else _concat_python
    return impl(np.ascontiguousarray(lengths, dtype=np.int64), seq_length, room, keep_empty)


def pack_concat(docs, lengths, seq_length: int, keep_empty: bool = False) -> PackedIndex:
    src, start, length, row_ends, _ = _concat(lengths, seq_length, seq_length, keep_empty)
    row_ptr = np.concatenate(([0], row_ends, [len(src)] if len(src) > (row_ends[-1] if len(row_ends) else 0) else []))
    return PackedIndex(np.asarray(docs, dtype=np.int64)[src], start, length, row_ptr.astype(np.int64), seq_length)


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


def _best_fit(sizes, seq_length: int, window: int):
    impl = _helpers.pack_best_fit if _helpers is not None else _best_fit_python
    return impl(np.ascontiguousarray(sizes, dtype=np.int64), seq_length, window)


def pack_best_fit(docs, lengths, seq_length: int, window: int = BEST_FIT_WINDOW,
                  keep_empty: bool = False) -> PackedIndex:
    doc, start, length = split_documents(docs, lengths, seq_length - 2, keep_empty)
    order, row_ptr = _best_fit(length, seq_length, window)
    return PackedIndex(doc[order], start[order], length[order], row_ptr, seq_length)


def _check_method(method: str, seq_length: int) -> None:
    if seq_length < MIN_ROOM:
        raise ValueError(f"seq_length {seq_length} leaves no room for [CLS] token [SEP]")
    if method not in PACKING_METHODS:
        raise ValueError(f"unknown packing {method!r}; choose one of {', '.join(PACKING_METHODS)}")


def build_packed_index(method: str, docs, lengths, seq_length: int, keep_empty: bool = False) -> PackedIndex:
    """Pack documents `docs` (ids, in the order to use) of the given lengths into rows."""
    _check_method(method, seq_length)
    if method == "none":
        return pack_none(docs, lengths, seq_length, keep_empty)
    if method == "concat":
        return pack_concat(docs, lengths, seq_length, keep_empty)
    return pack_best_fit(docs, lengths, seq_length, keep_empty=keep_empty)


@dataclass
class PackedChunk:
    """Pieces of a StreamPacker call in row order: first token and length of each, and `row_ends`,
    the global piece count at the end of each row completed by the call."""

    offset: np.ndarray
    length: np.ndarray
    row_ends: np.ndarray


class StreamPacker:
    """Pack documents given in chunks as (first token, length) arrays; see the module docstring."""

    def __init__(self, method: str, seq_length: int, keep_empty: bool = False, window: int = BEST_FIT_WINDOW):
        _check_method(method, seq_length)
        self.method, self.seq_length, self.keep_empty, self.window = method, seq_length, keep_empty, window
        self.pieces = 0  # pieces emitted so far
        self.room = seq_length  # concat: room left in the open row
        self.closed = 0  # concat: pieces in rows already closed
        self._pending = (np.zeros(0, np.int64), np.zeros(0, np.int64))  # best_fit: pieces of an unfinished window

    def add(self, offsets, lengths) -> PackedChunk:
        offsets, lengths = np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
        if self.method == "none":
            return self._none(offsets, lengths)
        if self.method == "concat":
            return self._concat(offsets, lengths)
        doc, start, size = split_documents(np.arange(len(lengths)), lengths, self.seq_length - 2, self.keep_empty)
        off = np.concatenate((self._pending[0], offsets[doc] + start))
        size = np.concatenate((self._pending[1], size))
        full = len(size) // self.window * self.window
        self._pending = (off[full:], size[full:])
        return self._best_fit(off[:full], size[:full])

    def finish(self) -> PackedChunk:
        """The rows still open: best_fit's last (partial) window, concat's last row."""
        if self.method == "best_fit":
            off, size = self._pending
            self._pending = (np.zeros(0, np.int64), np.zeros(0, np.int64))
            return self._best_fit(off, size)
        ends = [self.pieces] if self.method == "concat" and self.pieces > self.closed else []
        self.closed = self.pieces
        return PackedChunk(np.zeros(0, np.int64), np.zeros(0, np.int64), np.asarray(ends, np.int64))

    def _none(self, offsets, lengths) -> PackedChunk:
        keep = np.ones(len(lengths), bool) if self.keep_empty else lengths > 0
        n = int(keep.sum())
        ends = self.pieces + np.arange(1, n + 1, dtype=np.int64)
        self.pieces += n
        return PackedChunk(offsets[keep], np.minimum(lengths[keep], self.seq_length - 2), ends)

    def _concat(self, offsets, lengths) -> PackedChunk:
        src, start, size, row_ends, self.room = _concat(lengths, self.seq_length, self.room, self.keep_empty)
        ends = self.pieces + row_ends
        self.pieces += len(src)
        self.closed = int(ends[-1]) if len(ends) else self.closed
        return PackedChunk(offsets[src] + start, size, ends)

    def _best_fit(self, off, size) -> PackedChunk:
        if not len(size):
            return PackedChunk(off, size, np.zeros(0, np.int64))
        order, row_ptr = _best_fit(size, self.seq_length, self.window)
        ends = self.pieces + row_ptr[1:]
        self.pieces += len(size)
        return PackedChunk(off[order], size[order], ends)
