"""One shard's part of a blend: its documents packed into rows once, then drawn epoch by epoch.

* Document order: the documents [lo, hi) of the shard are shuffled block-wise: blocks of DOC_BLOCK
  consecutive documents in a seeded order, the documents of each block in a seeded order. Each
  block is one contiguous read of the .idx, so building needs O(DOC_BLOCK) memory whatever the
  shard size; which documents share a row is local to a block, but rows are drawn in a global
  random order (below), so batches mix the whole shard.
* Rows: the shuffled documents are packed (megatron_jp.data.packing.StreamPacker) into an entry of
  the index cache (megatron_jp.data.index_cache): `offset` (int64, first token of each piece in the
  .bin), `length` (piece lengths) and `row_ptr` (int64, CSR offsets of each row's pieces), built
  once per (shard, document range, packing, seq_length, seed, stream) and memory-mapped by every
  process. Its summary counts documents, zero-token documents, tokens, pieces and rows.
* Epochs: sample k of the source is row perm_e(k mod rows) of epoch e = k // rows, perm_e a seeded
  Feistel bijection (megatron_jp.data.permutation): no table, any number of epochs.
"""

from __future__ import annotations

import os

import numpy as np

from megatron_jp.data import indexed
from megatron_jp.data.index_cache import IndexCache
from megatron_jp.data.packing import PACKING_METHODS, StreamPacker
from megatron_jp.data.permutation import FeistelPermutation

DOC_BLOCK = 1 << 16
ROWS_VERSION = 1  # bump when the rows built for the same key change
_ORDER, _BLOCK, _EPOCH = 0xD0C, 0x10000000, 0xE0C00000  # Philox purposes (below 2**32)


class DataError(ValueError):
    """Data that cannot be trained on (a token id outside the vocabulary, a damaged index...)."""


def _generator(seed: int, stream: int, purpose: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(key=np.array([seed, (stream << 32) | purpose], dtype=np.uint64)))


def document_blocks(n_docs: int, seed: int, stream: int):
    """(first document of the block relative to the range, order of its documents) in block order."""
    n_blocks = -(-n_docs // DOC_BLOCK)
    for b in _generator(seed, stream, _ORDER).permutation(n_blocks).tolist():
        size = min(DOC_BLOCK, n_docs - b * DOC_BLOCK)
        yield b * DOC_BLOCK, _generator(seed, stream, _BLOCK + b).permutation(size)


def document_order(n_docs: int, seed: int, stream: int) -> np.ndarray:
    """The whole shuffled order (O(n) memory: for tests and small shards)."""
    parts = [first + perm for first, perm in document_blocks(n_docs, seed, stream)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def shard_identity(prefix: str) -> dict:
    """What a cached index of this shard depends on: its real path and, per file, size, mtime, inode and
    ctime. Size and mtime alone can be kept by a rewrite (`os.utime` restores an mtime); a rewrite in
    place changes the ctime, which no call can set back, and a rewrite by rename gives a new inode."""
    files = {}
    for name, path in (("idx", indexed.idx_path(prefix)), ("bin", indexed.bin_path(prefix))):
        st = os.stat(path)
        files[name] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    return {"prefix": os.path.realpath(prefix), **files}


def length_dtype(seq_length: int):
    return np.uint16 if seq_length - 2 <= np.iinfo(np.uint16).max else np.int32


def build_rows(tokens: indexed.IndexedDataset, doc_range, packing: str, seq_length: int, seed: int, stream: int,
               keep_empty: bool, writer) -> dict:
    """Write the `offset`, `length`, `row_ptr` arrays of one source into a cache entry; return its summary."""
    lo, hi = doc_range
    packer = StreamPacker(packing, seq_length, keep_empty)
    out = {"offset": writer.array("offset", np.int64), "length": writer.array("length", length_dtype(seq_length)),
           "row_ptr": writer.array("row_ptr", np.int64)}
    out["row_ptr"].append([0])
    counts = {"documents": hi - lo, "empty_documents": 0, "tokens": 0, "tokens_in_rows": 0}

    def emit(chunk):
        out["offset"].append(chunk.offset)
        out["length"].append(chunk.length)
        out["row_ptr"].append(chunk.row_ends)
        counts["tokens_in_rows"] += int(chunk.length.sum())

    for first, perm in document_blocks(hi - lo, seed, stream):
        offsets, lengths = tokens.read_doc_spans(lo + first, lo + first + len(perm))
        counts["empty_documents"] += int(np.count_nonzero(lengths == 0))
        counts["tokens"] += int(lengths.sum())
        emit(packer.add(offsets[perm], lengths[perm]))
    emit(packer.finish())
    pieces, rows = out["offset"].length, out["row_ptr"].length - 1
    used = counts["tokens_in_rows"] + 2 * pieces
    return {**counts, "pieces": pieces, "rows": rows, "padding": 1.0 - used / max(rows * seq_length, 1)}


class PackedRows:
    """A mapped rows entry: `offset`, `length`, `row_ptr` (read-only memmaps) and its summary."""

    def __init__(self, entry, n_tokens: int):
        self.path, self.summary = entry.path, entry.summary
        self.offset, self.length, self.row_ptr = (entry.arrays[k] for k in ("offset", "length", "row_ptr"))
        self.num_rows = len(self.row_ptr) - 1
        self.n_tokens = n_tokens

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(piece indices of `rows` in order, position (0..len(rows)-1) of the row of each piece)."""
        rows = np.asarray(rows, dtype=np.int64)
        first = self.row_ptr[rows]
        count = self.row_ptr[rows + 1] - first
        before = np.cumsum(count) - count
        pieces = np.repeat(first - before, count) + np.arange(int(count.sum()))
        return pieces, np.repeat(np.arange(len(rows)), count)

    def pieces(self, pieces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first token, length) of these pieces, checked against the shard (a damaged entry is refused)."""
        offset, length = self.offset[pieces].astype(np.int64), self.length[pieces].astype(np.int64)
        if len(offset) and (offset.min() < 0 or (offset + length).max() > self.n_tokens):
            raise DataError(f"index cache entry {self.path} points outside its shard ({self.n_tokens} tokens): "
                            "it is damaged; delete that folder and it is rebuilt")
        return offset, length


class PackedSource:
    """The documents [lo, hi) of one shard, packed into rows per seq_length (cached) and drawn by epoch."""

    def __init__(self, prefix: str, doc_range: tuple[int, int], packing: str, seed: int, stream: int,
                 whole_word: bool, cache: IndexCache, keep_empty: bool = False):
        if packing not in PACKING_METHODS:
            raise ValueError(f"data.packing {packing!r}: choose one of {', '.join(PACKING_METHODS)}")
        self.prefix, self.doc_range, self.packing = prefix, tuple(int(v) for v in doc_range), packing
        self.seed, self.stream, self.keep_empty, self.cache = seed, stream, keep_empty, cache
        self.tokens = indexed.IndexedDataset(prefix)
        self.words = indexed.open_words(prefix, self.tokens) if whole_word else None
        self._rows: dict = {}
        self._perms: dict = {}

    def __len__(self) -> int:
        return self.doc_range[1] - self.doc_range[0]

    def key(self, seq_length: int) -> dict:
        return {"shard": shard_identity(self.prefix), "docs": list(self.doc_range), "packing": self.packing,
                "seq_length": seq_length, "seed": self.seed, "stream": self.stream, "keep_empty": self.keep_empty,
                "doc_block": DOC_BLOCK, "version": ROWS_VERSION}

    def index(self, seq_length: int) -> PackedRows:
        """The rows for seq_length: mapped from the cache, built there first if needed."""
        if seq_length not in self._rows:
            def build(writer):
                return build_rows(self.tokens, self.doc_range, self.packing, seq_length, self.seed, self.stream,
                                  self.keep_empty, writer)

            entry = self.cache.get_or_build("rows", self.key(seq_length), build)
            self._rows[seq_length] = PackedRows(entry, self.tokens.n_tokens)
        return self._rows[seq_length]

    def rows_for(self, samples: np.ndarray, seq_length: int) -> np.ndarray:
        """Row of each dataset sample k: a seeded bijection of all rows per epoch."""
        n_rows = self.index(seq_length).num_rows
        if n_rows == 0:
            raise DataError(f"{self.prefix}: documents {self.doc_range[0]}..{self.doc_range[1] - 1} give no rows "
                            f"(all empty); drop the shard from the blend or set data.keep_empty_documents")
        epochs, pos = np.divmod(samples, n_rows)
        rows = np.empty_like(samples)
        for e in np.unique(epochs).tolist():
            here = epochs == e
            rows[here] = self._permutation(int(e), n_rows)(pos[here])
        return rows

    def _permutation(self, epoch: int, n_rows: int) -> FeistelPermutation:
        key = (n_rows, epoch)
        if key not in self._perms:
            if len(self._perms) >= 8:  # a batch spans at most two epochs; keep the dict small
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = FeistelPermutation(n_rows, [self.seed, (self.stream << 32) | (_EPOCH + epoch)])
        return self._perms[key]

    def documents(self, seq_length: int) -> np.ndarray:
        """Sorted ids of the documents that reach the rows (reads the whole entry: for tests and tools)."""
        index = self.index(seq_length)
        return np.unique(self.tokens.document_at(np.asarray(index.offset)))

    def __getstate__(self):
        # Maps are reopened (not copied) in each DataLoader worker that is not forked.
        return {k: v for k, v in self.__dict__.items() if k not in ("_rows", "_perms")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._rows, self._perms = {}, {}
