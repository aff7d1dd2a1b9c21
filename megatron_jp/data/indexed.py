"""Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`): a checking mmap reader and a streaming writer.

Format (little-endian), byte-compatible with megatron-core's IndexedDataset: `.idx` = 9-byte magic
`MMIDIDX\\x00\\x00`, u64 version 1, u8 dtype code, u64 sequence count N, u64 document count D
(documents + 1), int32[N] sequence lengths, int64[N] byte offsets into `.bin`, int64[D] document
indices (sequence index where each document starts, then N). `.bin` is the raw concatenation.

The writer streams tokens to `.bin` and sequence lengths to a side file, so memory stays bounded
whatever the corpus size; it writes under temporary names and `commit()` renames them, the `.idx`
last, so an interrupted run never leaves a shard that looks complete. The reader refuses a wrong
magic, version or dtype, an index or data file of the wrong size, and a word-flag shard whose
lengths differ from its token shard, naming the file.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from megatron_jp.files import close_quietly, remove_quietly

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
CODES = {np.dtype(t): c for c, t in DTYPES.items()}
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8
WORDS_SUFFIX = "_words"
_CHUNK = 1 << 20  # elements per streamed block when finalising or merging


class ShardFormatError(ValueError):
    """A .bin/.idx pair that is not a valid (or not the expected) Megatron indexed dataset."""


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def words_prefix(prefix: str) -> str:
    """Prefix of the word-start flag shard that goes with the token shard `prefix`."""
    return prefix + WORDS_SUFFIX


def exists(prefix: str) -> bool:
    return os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))


def optimal_dtype(vocab_size: int):
    """uint16 when every id fits with Megatron's margin (vocab < 65500), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def read_header(path: str) -> tuple[np.dtype, int, int]:
    """(dtype, sequence count, document-index count) of an .idx file, checked."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE or raw[:9] != MAGIC:
        raise ShardFormatError(f"{path}: not a Megatron index (bad magic {raw[:9]!r}, expected {MAGIC!r})")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", raw[9:])
    if version != VERSION:
        raise ShardFormatError(f"{path}: index version {version}, only version {VERSION} is supported")
    if code not in DTYPES:
        raise ShardFormatError(f"{path}: unknown dtype code {code} (known: {sorted(DTYPES)})")
    return np.dtype(DTYPES[code]), n_seq, n_doc


class IndexedDataset:
    """Read-only view of a shard: `len()` documents, `get(i)` tokens, `doc_spans`, flat `tokens`.

    A document is the run of sequences between two document indices (one sequence per document in
    shards from our preprocess_data; several with Megatron's --split-sentences). Opening a shard
    reads its header only: per-document arrays are never materialised, so memory does not grow
    with the corpus (`doc_lengths`/`doc_offsets` exist for small shards and tests; they build
    O(N) arrays on first use). Pickles by path, so DataLoader workers reopen the mmap instead of
    copying it.
    """

    def __init__(self, prefix: str, expect_dtype=None):
        self.prefix, self.expect_dtype = prefix, expect_dtype
        for path in (idx_path(prefix), bin_path(prefix)):
            if not os.path.isfile(path):
                raise ShardFormatError(f"{path} does not exist (was preprocess_data run with this prefix?)")
        self.dtype, n_seq, n_doc = read_header(idx_path(prefix))
        if expect_dtype is not None and self.dtype != np.dtype(expect_dtype):
            raise ShardFormatError(f"{idx_path(prefix)}: dtype {self.dtype}, expected {np.dtype(expect_dtype)}")
        self._map_index(n_seq, n_doc)
        self._map_data()

    def _map_index(self, n_seq: int, n_doc: int) -> None:
        path = idx_path(self.prefix)
        expected = HEADER_SIZE + n_seq * 12 + n_doc * 8
        if os.path.getsize(path) != expected:
            raise ShardFormatError(f"{path}: {os.path.getsize(path)} bytes, the header implies {expected} "
                                   "(truncated or corrupt index)")
        buf = np.memmap(path, dtype=np.uint8, mode="r")
        self.sequence_lengths = buf[HEADER_SIZE:HEADER_SIZE + 4 * n_seq].view(np.int32)
        off = HEADER_SIZE + 4 * n_seq
        self.sequence_pointers = buf[off:off + 8 * n_seq].view(np.int64)
        self.document_indices = buf[off + 8 * n_seq:].view(np.int64)
        self._doc_index_offset = off + 8 * n_seq  # byte offset of document_indices in the .idx
        if n_doc < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != n_seq:
            raise ShardFormatError(f"{path}: document indices must run from 0 to the sequence count {n_seq}")

    def _map_data(self) -> None:
        path = bin_path(self.prefix)
        item = self.dtype.itemsize
        n_seq = len(self.sequence_lengths)
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * item if n_seq else 0
        size = os.path.getsize(path)
        if size != end:
            raise ShardFormatError(f"{path}: {size} bytes, the index {idx_path(self.prefix)} describes {end} "
                                   "(truncated .bin, or .bin and .idx from different runs)")
        self.tokens = np.memmap(path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)
        self.n_tokens = end // item
        self._lazy: dict = {}

    def __len__(self) -> int:
        return len(self.document_indices) - 1

    def doc_spans(self, docs) -> tuple[np.ndarray, np.ndarray]:
        """(first token, token count) of each document in `docs`, read through the mmap (touches only
        the index pages of those documents)."""
        docs = np.asarray(docs, dtype=np.int64)
        first, stop = self.document_indices[docs], self.document_indices[docs + 1]
        n_seq = len(self.sequence_lengths)
        item = self.dtype.itemsize
        safe_first = np.minimum(first, max(n_seq - 1, 0))
        start = np.where(first < n_seq, self.sequence_pointers[safe_first] // item if n_seq else 0, self.n_tokens)
        last = np.maximum(stop - 1, 0)
        end = (self.sequence_pointers[last] // item + self.sequence_lengths[last]) if n_seq else np.zeros_like(docs)
        lengths = np.where(stop > first, end - start, 0)
        return start.astype(np.int64), lengths.astype(np.int64)

    def read_doc_spans(self, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(first token, token count) of documents [first, stop) with file reads, not the mmap: a pass
        over a huge index (building the sample index) leaves nothing resident in this process.
        Sequences must be contiguous in the .bin (Megatron's layout); a spot check refuses others."""
        path = idx_path(self.prefix)
        n_seq, item = len(self.sequence_lengths), self.dtype.itemsize
        di = np.fromfile(path, dtype=np.int64, count=stop - first + 1, offset=self._doc_index_offset + 8 * first)
        s0, s1 = int(di[0]), int(di[-1])
        lengths = np.fromfile(path, dtype=np.int32, count=s1 - s0, offset=HEADER_SIZE + 4 * s0)
        cum = np.zeros(s1 - s0 + 1, dtype=np.int64)
        np.cumsum(lengths, out=cum[1:])
        # pointers by file reads too: one touch of the mmap maps ~0.5 MB around it (fault-around)
        base = self._pointer(s0) // item if s0 < n_seq else self.n_tokens
        if s1 > s0 and self._pointer(s1 - 1) != (base + int(cum[-2])) * item:
            raise ShardFormatError(f"{path}: sequences {s0}..{s1 - 1} are not contiguous in "
                                   f"{bin_path(self.prefix)}; rewrite the shard with tools/merge_datasets.py")
        rel = di - s0
        return base + cum[rel[:-1]], cum[rel[1:]] - cum[rel[:-1]]

    def _pointer(self, seq: int) -> int:
        offset = HEADER_SIZE + 4 * len(self.sequence_lengths) + 8 * seq
        return int(np.fromfile(idx_path(self.prefix), dtype=np.int64, count=1, offset=offset)[0])

    def document_at(self, token_offsets) -> np.ndarray:
        """Index of the document holding each token offset (binary search in the index)."""
        pos = np.asarray(token_offsets, dtype=np.int64) * self.dtype.itemsize
        seq = np.searchsorted(self.sequence_pointers, pos, side="right") - 1
        return np.searchsorted(self.document_indices, seq, side="right") - 1

    @property
    def doc_offsets(self) -> np.ndarray:
        """First token of every document (an O(N) array: for small shards and tests)."""
        return self._all_spans()[0]

    @property
    def doc_lengths(self) -> np.ndarray:
        """Token count of every document (an O(N) array: for small shards and tests)."""
        return self._all_spans()[1]

    def _all_spans(self):
        if "spans" not in self._lazy:
            self._lazy["spans"] = self.read_doc_spans(0, len(self))
        return self._lazy["spans"]

    def get(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        first, total = (int(v[0]) for v in self.doc_spans([doc]))
        start = first + offset
        stop = first + total if length is None else start + length
        return np.asarray(self.tokens[start:stop])

    def __getitem__(self, doc: int) -> np.ndarray:
        return self.get(doc)

    def check_words(self, words: "IndexedDataset") -> None:
        """Raise unless `words` is a uint8 shard with exactly this shard's sequence lengths."""
        if words.dtype != np.uint8:
            raise ShardFormatError(f"{idx_path(words.prefix)}: word flags must be uint8, found {words.dtype}")
        same = (len(words.sequence_lengths) == len(self.sequence_lengths)
                and np.array_equal(words.sequence_lengths, self.sequence_lengths))
        if not same:
            raise ShardFormatError(f"{idx_path(words.prefix)}: sequence lengths differ from {idx_path(self.prefix)}; "
                                   "rebuild both with preprocess_data --word-boundaries")

    def __getstate__(self):
        return {"prefix": self.prefix, "expect_dtype": self.expect_dtype}

    def __setstate__(self, state):
        self.__init__(state["prefix"], state["expect_dtype"])


def open_words(prefix: str, tokens: IndexedDataset) -> IndexedDataset:
    """The word-flag shard of `prefix`, checked against its token shard."""
    wp = words_prefix(prefix)
    if not exists(wp):
        raise ShardFormatError(f"{idx_path(wp)} does not exist: whole word masking needs word flags; run "
                               "tools/preprocess_data.py with --word-boundaries unidic-lite")
    words = IndexedDataset(wp, expect_dtype=np.uint8)
    tokens.check_words(words)
    return words


class IndexedDatasetWriter:
    """Stream documents into PREFIX.bin/.idx under temporary names; `commit()` publishes them."""

    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"dtype {self.dtype} has no Megatron code")
        self.tag = f".tmp{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(bin_path(prefix) + self.tag, "wb")
        self._lengths = open(prefix + ".lengths" + self.tag, "wb")
        self.n_docs = self.n_tokens = 0
        self.finalized = False

    def add_document(self, tokens) -> None:
        self.add_documents(np.asarray(tokens), np.array([len(tokens)], dtype=np.int64))

    def add_documents(self, flat, lengths) -> None:
        """Append several documents given as one flat array and their lengths."""
        self.add_parts([flat], lengths)

    def add_parts(self, parts, lengths) -> None:
        """Append documents whose tokens are the concatenation of `parts` (split anywhere)."""
        n = 0
        for part in parts:
            part = np.asarray(part)
            self._check_range(part)
            self._bin.write(part.astype(self.dtype, copy=False).data)
            n += part.size
        lengths = np.asarray(lengths, dtype=np.int64)
        if n != int(lengths.sum()):
            raise ValueError(f"{self.prefix}: {n} tokens given for documents of {int(lengths.sum())} tokens")
        self._lengths.write(lengths.astype(np.int32).tobytes())
        self.n_docs += len(lengths)
        self.n_tokens += n

    def add_shard(self, src: "IndexedDataset") -> None:
        """Append every document of a shard of this dtype: its .bin copied as bytes (copy_file_range:
        the kernel copies, so merging costs the merging process little CPU), its lengths in blocks."""
        if src.dtype != self.dtype:
            raise ShardFormatError(f"{idx_path(src.prefix)}: dtype {src.dtype}, expected {self.dtype}")
        n = 0
        for first in range(0, len(src), _CHUNK):
            _, lengths = src.read_doc_spans(first, min(first + _CHUNK, len(src)))
            self._lengths.write(lengths.astype(np.int32).tobytes())
            n += int(lengths.sum())
        if n != src.n_tokens:
            raise ShardFormatError(f"{bin_path(src.prefix)}: its documents hold {n} of its {src.n_tokens} tokens")
        self._bin.flush()
        with open(bin_path(src.prefix), "rb") as f:
            _copy_bytes(f, self._bin, n * self.dtype.itemsize)
        self._bin.seek(0, os.SEEK_END)  # the buffered file's idea of its position follows the copy
        self.n_docs += len(src)
        self.n_tokens += n

    def _check_range(self, part: np.ndarray) -> None:
        if part.size and part.dtype != self.dtype and part.dtype.kind in "iu" and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            if part.min() < info.min or part.max() > info.max:
                raise ValueError(f"{self.prefix}: values outside the range of {self.dtype}")

    def finalize(self) -> None:
        """Write the temporary .idx from the streamed lengths (in blocks: memory stays bounded)."""
        self._bin.close()
        self._lengths.close()
        lengths_file = self._lengths.name
        with open(idx_path(self.prefix) + self.tag, "wb") as out:
            out.write(MAGIC + struct.pack("<QBQQ", VERSION, CODES[self.dtype], self.n_docs, self.n_docs + 1))
            _copy_file(lengths_file, out)
            _write_pointers(lengths_file, self.n_docs, self.dtype.itemsize, out)
            _write_arange(self.n_docs + 1, out)
        os.unlink(lengths_file)
        self.finalized = True

    def commit(self) -> None:
        """Rename into place: old .idx removed first and new .idx last, so no mixed pair looks complete."""
        if not self.finalized:
            self.finalize()
        if os.path.exists(idx_path(self.prefix)):
            os.unlink(idx_path(self.prefix))
        os.replace(bin_path(self.prefix) + self.tag, bin_path(self.prefix))
        os.replace(idx_path(self.prefix) + self.tag, idx_path(self.prefix))

    def abort(self) -> None:
        """Close and delete every temporary file (safe to call twice). Never raises: on a full disk
        closing flushes buffered writes that fail again (ENOSPC), and the files must go all the same."""
        for f in (self._bin, self._lengths):
            close_quietly(f)
        for path in (bin_path(self.prefix) + self.tag, idx_path(self.prefix) + self.tag,
                     self.prefix + ".lengths" + self.tag):
            remove_quietly(path)


def _copy_bytes(src, out, size: int) -> None:
    """Append `size` bytes of file `src` to the (flushed) file `out`, in the kernel where it can."""
    left = size
    try:
        while left > 0:
            done = os.copy_file_range(src.fileno(), out.fileno(), min(left, 1 << 30))
            if done == 0:
                break
            left -= done
    except OSError:  # a file system (or kernel) without copy_file_range across these files
        src.seek(size - left)
        out.seek(0, os.SEEK_END)
        while left > 0 and (block := src.read(min(left, 4 * _CHUNK))):
            out.write(block)
            left -= len(block)
    if left:
        raise ShardFormatError(f"{src.name}: ended {left} bytes early while being copied")


def _copy_file(path: str, out) -> None:
    with open(path, "rb") as f:
        while block := f.read(4 * _CHUNK):
            out.write(block)


def _write_pointers(lengths_file: str, n: int, itemsize: int, out) -> None:
    start = 0
    for first in range(0, n, _CHUNK):
        lengths = np.fromfile(lengths_file, dtype=np.int32, count=min(_CHUNK, n - first), offset=4 * first)
        ends = start + np.cumsum(lengths.astype(np.int64)) * itemsize
        out.write(np.concatenate(([start], ends[:-1])).astype(np.int64).tobytes())
        start = int(ends[-1])


def _write_arange(n: int, out) -> None:
    for first in range(0, n, _CHUNK):
        out.write(np.arange(first, min(first + _CHUNK, n), dtype=np.int64).tobytes())


def merge(prefixes: list[str], out_prefix: str) -> IndexedDataset:
    """Concatenate shards (same dtype) into out_prefix, keeping each input's document boundaries."""
    if not prefixes:
        raise ValueError("merge: no input shards")
    sources = [IndexedDataset(p) for p in prefixes]
    dtypes = {s.dtype for s in sources}
    if len(dtypes) > 1:
        raise ShardFormatError(f"cannot merge shards of different dtypes: "
                               + ", ".join(f"{s.prefix}={s.dtype}" for s in sources))
    writer = IndexedDatasetWriter(out_prefix, dtypes.pop())
    try:
        for src in sources:
            writer.add_shard(src)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return IndexedDataset(out_prefix)
