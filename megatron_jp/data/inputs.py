"""The corpora preprocess_data reads: formats, the plan that cuts a run into parts, and reading a piece.

Formats, by file name: `.parquet` (pyarrow; row groups), `.gz` (gzip), `.zst`/`.zstd` (zstandard),
anything else plain JSON lines. A text is found by its key; a dotted key (`meta.text`) walks nested
objects (JSONL) or struct columns (parquet) unless a key of that exact name exists.

Pieces and parts: a plain JSONL file is cut at line starts into byte ranges of about `part_bytes`, a
parquet file at row-group boundaries into runs of row groups of about `part_bytes` (compressed), and
a compressed JSONL file is one piece (a gzip or zstd stream cannot be entered in the middle). A part is
a run of consecutive pieces of about `part_bytes`: the unit a worker reads, tokenizes and writes on
its own. The plan depends only on the files and `part_bytes`, so a rerun makes the same parts.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import zlib
from dataclasses import dataclass, field

import numpy as np

CHUNK_BYTES = 1 << 20
CHUNK_LINES = 4096
PARQUET_BATCH_ROWS = 1024  # rows decoded at a time: memory stays bounded whatever the row group's size


class InputError(ValueError):
    """An input that cannot be read at all (a corrupt parquet footer, a missing file): named."""


@dataclass(frozen=True)
class Piece:
    """Lines [start, stop) in bytes of a plain JSONL file, row groups [start, stop) of a parquet file,
    or a whole compressed file (start 0, stop its size)."""

    path: str
    kind: str  # "jsonl", "gzip", "zstd" or "parquet"
    start: int
    stop: int
    size: int  # input bytes it stands for (part sizes, progress)

    def describe(self) -> str:
        if self.kind == "parquet":
            return f"{self.path} (row groups {self.start}..{self.stop - 1})"
        if self.kind == "jsonl":
            return f"{self.path} (bytes {self.start:,}..{self.stop:,})"
        return self.path


@dataclass(frozen=True)
class Part:
    index: int
    pieces: tuple

    @property
    def size(self) -> int:
        return sum(p.size for p in self.pieces)

    def describe(self) -> str:
        names = [p.describe() for p in self.pieces]
        return names[0] if len(names) == 1 else f"{names[0]} ... {names[-1]} ({len(names)} pieces)"


@dataclass
class Chunk:
    """Documents of one piece handed to the tokenizer. `lines` holds (line number in the piece, raw
    JSON bytes); `rows` holds ready texts ((row group, row), texts or None, (code, message) or None,
    bytes); `errors` what the reader itself found ((location, code, message))."""

    path: str
    lines: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    raw_bytes: int = 0
    file_bytes: int = 0  # input bytes consumed for them (compressed for .gz/.zst): the progress


def file_kind(path: str) -> str:
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".gz"):
        return "gzip"
    if name.endswith((".zst", ".zstd")):
        return "zstd"
    return "jsonl"


def expand_inputs(patterns: list[str]) -> list[str]:
    """Every file named or matched by a glob, in the order given (globs sorted)."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        missing = [m for m in matches if not os.path.isfile(m)]
        if not matches or missing:
            raise FileNotFoundError(f"--input {pattern}: no such file" + ("" if matches else " (glob matched nothing)"))
        files += matches
    return files


def select_slice(paths: list[str], spec: str) -> list[str]:
    """The files of slice "I/N": file f belongs to slice floor(N * bytes before f / all bytes)."""
    if not spec:
        return paths
    try:
        index, count = (int(v) for v in spec.split("/"))
    except ValueError:
        raise ValueError(f"--slice {spec!r}: expected I/N, e.g. 3/64") from None
    if not 0 <= index < count:
        raise ValueError(f"--slice {spec!r}: I must lie in [0, N)")
    sizes = np.array([os.path.getsize(p) for p in paths], dtype=np.int64)
    before = np.cumsum(sizes) - sizes
    total = int(sizes.sum())
    slices = before * count // total if total else np.arange(len(paths)) * count // max(len(paths), 1)
    return [p for p, s in zip(paths, slices.tolist()) if s == index]


# ----------------------------------------------------------------------------------------- planning

def _next_line_start(f, target: int, size: int) -> int:
    """The first line start at or after byte `target` (size when none)."""
    f.seek(target - 1)
    pos = target - 1
    while block := f.read(1 << 16):
        at = block.find(b"\n")
        if at >= 0:
            return pos + at + 1
        pos += len(block)
    return size


def _jsonl_pieces(path: str, part_bytes: int) -> list[Piece]:
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        for target in range(part_bytes, size, part_bytes):
            cut = _next_line_start(f, max(target, cuts[-1] + 1), size)
            if cuts[-1] < cut < size:
                cuts.append(cut)
    cuts.append(size)
    return [Piece(path, "jsonl", a, b, b - a) for a, b in zip(cuts[:-1], cuts[1:])]


def parquet_file(path: str):
    """An open pyarrow ParquetFile (page checksums verified where written); a corrupt footer is named."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError...: all mean the same here
        raise InputError(f"{path}: not a readable parquet file ({err})") from None


def _parquet_pieces(path: str, part_bytes: int) -> list[Piece]:
    meta = parquet_file(path).metadata
    sizes = [_group_bytes(meta, g) for g in range(meta.num_row_groups)]
    pieces, first, size = [], 0, 0
    for g, s in enumerate(sizes):
        if size and size + s > part_bytes:
            pieces.append(Piece(path, "parquet", first, g, size))
            first, size = g, 0
        size += s
    if size or not pieces:
        pieces.append(Piece(path, "parquet", first, len(sizes), size))
    return pieces


def file_pieces(path: str, part_bytes: int) -> list[Piece]:
    kind = file_kind(path)
    if kind == "jsonl":
        return _jsonl_pieces(path, part_bytes)
    if kind == "parquet":
        return _parquet_pieces(path, part_bytes)
    return [Piece(path, kind, 0, os.path.getsize(path), os.path.getsize(path))]


def plan_parts(paths: list[str], part_bytes: int) -> list[Part]:
    """Consecutive pieces of every file, in input order, grouped into parts of about part_bytes."""
    parts, current, size = [], [], 0
    for path in paths:
        for piece in file_pieces(path, part_bytes):
            if current and size + piece.size > part_bytes:
                parts.append(Part(len(parts), tuple(current)))
                current, size = [], 0
            current.append(piece)
            size += piece.size
    if current:
        parts.append(Part(len(parts), tuple(current)))
    return parts


# ------------------------------------------------------------------------------------------ reading

def read_line(f, limit: int):
    """(line, too_long_size): reads at most limit+1 bytes; the rest of an oversize line is drained."""
    if limit <= 0:
        return f.readline(), 0
    line = f.readline(limit + 1)
    if len(line) <= limit or line.endswith(b"\n"):
        return line, 0
    size = len(line)
    while line and not line.endswith(b"\n"):  # drain without keeping: memory stays bounded
        line = f.readline(1 << 20)
        size += len(line)
    return None, size


STREAM_ERRORS = {"gzip": ("bad_gzip", "truncated or corrupt gzip stream"),
                 "zstd": ("bad_zstd", "truncated or corrupt zstd stream")}


def _zstd_reader(raw):
    try:
        import zstandard
    except ImportError:
        raise ImportError(f"{raw.name}: reading .zst needs zstandard (pip install zstandard)") from None
    return io.BufferedReader(_ZstdStream(raw, zstandard.ZstdDecompressor()), 1 << 20)


class _ZstdStream(io.RawIOBase):
    """The decompressed bytes of every frame of a zstd file, in 64 KB input blocks (a block expands
    to at most the format's ratio); a file that ends inside a frame raises EOFError, which zstandard's
    own stream reader lets pass silently. A damaged frame raises ZstdError where a checksum (the zstd
    command writes one by default) or the format itself catches it."""

    def __init__(self, raw, decompressor):
        self.raw, self.decompressor = raw, decompressor
        self.frame, self.fed = decompressor.decompressobj(), False
        self.pending, self.at = b"", 0

    def readable(self):
        return True

    def _fill(self) -> None:
        while self.at >= len(self.pending):
            if self.frame.eof:
                rest = self.frame.unused_data
                self.frame, self.fed = self.decompressor.decompressobj(), bool(rest)
                self.pending, self.at = (self.frame.decompress(rest) if rest else b""), 0
                continue
            block = self.raw.read(1 << 16)
            if not block:
                if self.fed:
                    raise EOFError("the file ends inside a zstd frame")
                return
            self.fed = True
            self.pending, self.at = self.frame.decompress(block), 0

    def readinto(self, buffer):
        self._fill()
        n = min(len(buffer), len(self.pending) - self.at)
        buffer[:n] = memoryview(self.pending)[self.at:self.at + n]
        self.at += n
        return n


def _open_stream(piece: Piece):
    """(raw file, line reader) positioned at the piece's first line."""
    raw = open(piece.path, "rb")
    if piece.kind == "gzip":
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    if piece.kind == "zstd":
        return raw, _zstd_reader(raw)
    raw.seek(piece.start)
    return raw, raw


def _line_chunks(piece: Piece, max_doc_bytes: int):
    """Chunks of raw lines of a JSONL piece; line numbers count from the piece's first line."""
    raw, f = _open_stream(piece)
    chunk, line_no, consumed = Chunk(piece.path), 0, piece.start
    code, what = STREAM_ERRORS.get(piece.kind, ("", ""))
    try:
        while piece.kind != "jsonl" or raw.tell() < piece.stop:
            try:
                line, oversize = read_line(f, max_doc_bytes)
            except (EOFError, gzip.BadGzipFile, zlib.error, OSError, _zstd_error()) as err:
                chunk.errors.append((line_no + 1, code, f"{what} ({err})"))
                break
            if line == b"" and not oversize:
                break
            line_no += 1
            if oversize:
                chunk.errors.append((line_no, "too_large", f"document of {oversize:,} bytes exceeds "
                                     f"--max-document-bytes {max_doc_bytes:,} (raise it, or 0 for no limit)"))
            else:
                chunk.lines.append((line_no, line))
                chunk.raw_bytes += len(line)
            if chunk.raw_bytes >= CHUNK_BYTES or len(chunk.lines) >= CHUNK_LINES:
                chunk.file_bytes, consumed = raw.tell() - consumed, raw.tell()
                yield chunk
                chunk = Chunk(piece.path)
        chunk.file_bytes = piece.start + piece.size - consumed
        yield chunk
    finally:
        f.close()
        raw.close()


def _zstd_error():
    try:
        import zstandard
        return zstandard.ZstdError
    except ImportError:
        return OSError


def lookup(obj, key: str):
    """obj[key], or for a dotted key absent as such, the nested value; KeyError when missing."""
    if key in obj:
        return obj[key]
    value = obj
    for name in key.split("."):
        if not isinstance(value, dict) or name not in value:
            raise KeyError(key)
        value = value[name]
    return value


def _parquet_column(batch, key: str):
    """The Python values of `key` in a record batch (a dotted key walks struct columns); None if absent."""
    names = batch.schema.names
    if key in names:
        return batch.column(key).to_pylist()
    head, _, rest = key.partition(".")
    if not rest or head not in names:
        return None
    values = batch.column(head).to_pylist()
    try:
        return [None if v is None else lookup(v, rest) for v in values]
    except KeyError:
        return None


def text_error(key: str, value):
    """(code, message) when `value` is no usable text, else None (the rules of a JSONL line's key)."""
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        return "not_string", f"value of key {key!r} is {kind}, expected a string"
    if not value.strip():
        return "empty_text", f"empty text in key {key!r}"
    return None


def _batch_rows(batch, keys: list[str], group: int, first_row: int, names: list[str]) -> list:
    columns = {k: _parquet_column(batch, k) for k in keys}
    rows = []
    for i in range(batch.num_rows):
        texts, err = [], None
        for key in keys:
            if columns[key] is None:
                err = ("missing_key", f"missing key {key!r} (columns present: {', '.join(names[:8])})")
                break
            err = text_error(key, columns[key][i])
            if err:
                break
            texts.append(columns[key][i])
        size = sum(len(t.encode("utf-8")) for t in texts) if err is None else 0
        rows.append(((group, first_row + i), None if err else texts, err, size))
    return rows


def _group_bytes(meta, group: int) -> int:
    return sum(meta.row_group(group).column(c).total_compressed_size for c in range(meta.num_columns))


def _parquet_chunks(piece: Piece, keys: list[str]):
    """Chunks of about CHUNK_BYTES of text from a parquet piece, batch by batch; a corrupt row group is
    named (its rows before the damage are kept, as the lines of a truncated .gz are)."""
    pf = parquet_file(piece.path)
    names = pf.schema_arrow.names
    heads = sorted({k if k in names else k.split(".")[0] for k in keys} & set(names))
    meta = pf.metadata
    for group in range(piece.start, piece.stop):
        per_row = _group_bytes(meta, group) / max(meta.row_group(group).num_rows, 1)  # progress share of a row
        chunk, row, done = Chunk(piece.path), 0, 0
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=heads):
                chunk.rows += _batch_rows(batch, keys, group, row, names)
                chunk.raw_bytes += sum(r[3] for r in chunk.rows[-batch.num_rows:])
                row += batch.num_rows
                if chunk.raw_bytes >= CHUNK_BYTES:
                    chunk.file_bytes, done = round(row * per_row) - done, round(row * per_row)
                    yield chunk
                    chunk = Chunk(piece.path)
        except Exception as err:  # pyarrow's errors for damaged pages have no common base but Exception
            chunk.errors.append(((group, row), "bad_parquet", f"corrupt row group ({type(err).__name__}: {err})"))
        chunk.file_bytes = _group_bytes(meta, group) - done
        yield chunk


def piece_chunks(piece: Piece, keys: list[str], max_doc_bytes: int):
    """The chunks of one piece, in order."""
    if piece.kind == "parquet":
        return _parquet_chunks(piece, keys)
    return _line_chunks(piece, max_doc_bytes)


def absolute_line(piece: Piece, line: int) -> int:
    """The line number in its file of line `line` (1-based) of a piece (counts the lines before it)."""
    if piece.kind != "jsonl" or piece.start == 0:
        return line
    before, left = 0, piece.start
    with open(piece.path, "rb") as f:
        while left > 0 and (block := f.read(min(left, 1 << 20))):
            before += block.count(b"\n")
            left -= len(block)
    return before + line


def location(piece: Piece, loc) -> str:
    """`file:line` for a JSONL line, `file: row group G, row R` for a parquet row."""
    if piece.kind == "parquet":
        return f"{piece.path}: row group {loc[0]}, row {loc[1]}"
    return f"{piece.path}:{absolute_line(piece, loc)}"
