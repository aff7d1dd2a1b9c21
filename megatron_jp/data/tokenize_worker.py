"""One preprocess_data worker: read a part of the input, tokenize it, write the part's own shards.

A part (megatron_jp.data.inputs.Part) becomes, in the parts folder, `NNNNNN_{key}_document.bin/.idx`
(+ `_words` with word boundaries) per key and, written last, its record `NNNNNN.json`: the part's
key (a hash of the run's settings and of the pieces' files), the sizes of its files and its counts.
A part counts as complete only when its record exists, names the same key and every file has the
recorded size; so a rerun reuses exactly the parts of the same inputs and settings.

Memory per worker: one chunk (CHUNK_BYTES of lines, CHUNK_LINES lines or one document up to
--max-document-bytes; PARQUET_BATCH_ROWS rows at a time for parquet) and its ids, plus the tokenizer
and MeCab's dictionary (~50 MB for unidic-lite); never the part or the corpus, since the part's
shards are streamed to disk.
"""

from __future__ import annotations

import json
import os
import resource

import numpy as np

from megatron_jp.data import indexed
from megatron_jp.data.inputs import Chunk, Part, location, lookup, piece_chunks, text_error
from megatron_jp.data.segment import build_segmenter, segmenter_flags_all, text_chunks
from megatron_jp.data.tokenizers import build_tokenizer

PART_FORMAT = 1
LONG_TEXT_CHARS = 1 << 20  # longer texts are tokenized piecewise (at line breaks) to bound memory
JOIN_LIMIT = 1 << 22  # ids of a chunk up to this many are written as one array
GROUP_CHARS = 1 << 20  # characters encoded phase by phase (tokenizer, MeCab, alignment) at a time


class PartFailed(RuntimeError):
    """A bad input under --on-error fail; the message is `file:line: reason [code]; ...`."""


_WORKER: dict = {}


def init_worker(opts: dict) -> None:
    """Load the tokenizer and segmenter once per process."""
    _WORKER["opts"] = opts
    _WORKER["tokenizer"] = build_tokenizer(opts["tokenizer_type"], opts["tokenizer_model"])
    _WORKER["segmenter"] = build_segmenter(opts["word_boundaries"])


def parse_line(raw: bytes, keys: list[str]):
    """(texts, None) for a good line, else (None, (reason code, message))."""
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, ("invalid_utf8", f"invalid UTF-8 at byte {err.start}")
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as err:
        return None, ("invalid_json", f"invalid JSON ({err.msg} at column {err.colno})")
    if not isinstance(obj, dict):
        return None, ("not_object", f"expected a JSON object, found {type(obj).__name__}")
    texts = []
    for key in keys:
        try:
            value = lookup(obj, key)
        except KeyError:
            return None, ("missing_key", f"missing key {key!r} (keys present: {', '.join(list(obj)[:8])})")
        if err := text_error(key, value):
            return None, err
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return None, ("invalid_utf8", f"key {key!r} has an unpaired surrogate escape at character {err.start}")
        texts.append(value)
    return texts, None


def _pieces(text: str):
    return [text] if len(text) <= LONG_TEXT_CHARS else (c for _, c in text_chunks(text, LONG_TEXT_CHARS))


def _encode_pieces(pieces: list[str], dtype) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(ids in the output dtype, word flags or None) of each text. With a segmenter in phases: every
    text through the tokenizer, then every text through MeCab, then the alignment, so that each
    library's tables stay in the CPU caches (interleaving them per document cost a quarter of the
    speed: bench/preprocess.py)."""
    tok, seg = _WORKER["tokenizer"], _WORKER["segmenter"]
    if seg is None:
        return [(tok.encode(p).astype(dtype, copy=False), None) for p in pieces]
    encoded = [tok.encode_with_offsets(p) for p in pieces]
    flags = segmenter_flags_all(seg, pieces, [(s, e) for _, s, e in encoded])
    return [(ids.astype(dtype, copy=False), f) for (ids, _, _), f in zip(encoded, flags)]


def _encode_docs(texts: list[str], dtype) -> list[tuple[list, list | None]]:
    """(id arrays, flag arrays or None) of each document; very long ones piecewise, and pieces
    encoded in groups of about GROUP_CHARS characters, so memory stays bounded."""
    with_flags = _WORKER["segmenter"] is not None
    out = [([], [] if with_flags else None) for _ in texts]
    group, size = [], 0

    def flush():
        for (doc, _), (ids, flags) in zip(group, _encode_pieces([p for _, p in group], dtype)):
            out[doc][0].append(ids)
            if with_flags:
                out[doc][1].append(flags)
        group.clear()

    for doc, text in enumerate(texts):
        for piece in _pieces(text):
            group.append((doc, piece))
            size += len(piece)
            if size >= GROUP_CHARS:
                flush()
                size = 0
    flush()
    return out


def _joined(arrays: list) -> list:
    """One array for a chunk of ordinary documents (one write); a huge document's parts stay apart,
    since joining would copy it once more."""
    return [np.concatenate(arrays)] if 1 < len(arrays) and sum(map(len, arrays)) <= JOIN_LIMIT else arrays


def _key_arrays(docs: list, opts: dict, eod: int):
    """(id arrays, document lengths, flag arrays or None) of one key."""
    dtype = np.dtype(opts["dtype"])
    ids, lengths, flags = [], [], []
    for parts, part_flags in docs:
        if opts["append_eod"]:
            parts = parts + [np.array([eod], dtype=dtype)]
            part_flags = None if part_flags is None else part_flags + [np.ones(1, np.uint8)]
        ids += parts
        lengths.append(sum(len(p) for p in parts))
        if part_flags is not None:
            flags += part_flags
    flags = _joined(flags) if opts["word_boundaries"] != "none" else None
    return _joined(ids), np.asarray(lengths, dtype=np.int64), flags


def _documents(chunk: Chunk, keys: list[str]):
    """(location, texts or None, (code, message) or None, bytes) of each non-blank document; blank count."""
    docs, blanks = [], 0
    for i, (line_no, raw) in enumerate(chunk.lines):
        chunk.lines[i] = None  # drop each raw line once parsed: a huge document is held once, not twice
        if not raw.strip():
            blanks += 1
            continue
        texts, err = parse_line(raw, keys)
        docs.append((line_no, texts, err, len(raw)))
    return docs + chunk.rows, blanks


def process_chunk(chunk: Chunk) -> dict:
    """Parse, validate and tokenize a chunk: {"tokens": key -> (ids, lengths, flags), "errors",
    "n_docs", "n_text_bytes", "blank_lines"}."""
    opts = _WORKER["opts"]
    keys, errors = opts["keys"], list(chunk.errors)
    per_key = {k: [] for k in keys}
    docs, blanks = _documents(chunk, keys)
    n_docs = n_bytes = 0
    for loc, texts, err, size in docs:
        if err:
            errors.append((loc, *err))
            continue
        n_docs += 1
        n_bytes += size
        for key, text in zip(keys, texts):
            per_key[key].append(text)
    dtype = np.dtype(opts["dtype"])
    eod = _WORKER["tokenizer"].eod_id
    tokens = {k: _key_arrays(_encode_docs(texts, dtype), opts, eod) for k, texts in per_key.items()}
    return {"tokens": tokens, "errors": sorted(errors), "n_docs": n_docs, "n_text_bytes": n_bytes,
            "blank_lines": blanks}


# ------------------------------------------------------------------------------------------- parts

def part_prefix(parts_dir: str, index: int, key: str) -> str:
    return os.path.join(parts_dir, f"{index:06d}_{key}_document")


def record_path(parts_dir: str, index: int) -> str:
    return os.path.join(parts_dir, f"{index:06d}.json")


class _PartWriters:
    """The token (and word) writers of every key of one part, and its counts."""

    def __init__(self, parts_dir: str, index: int, opts: dict):
        self.writers = {}
        self.counts = {"documents": 0, "text_bytes": 0, "blank_lines": 0, "skipped": {}}
        self.empty = dict.fromkeys(opts["keys"], 0)
        for key in opts["keys"]:  # filled one by one, so abort() sees each
            prefix = part_prefix(parts_dir, index, key)
            self.writers[key] = [indexed.IndexedDatasetWriter(prefix, np.dtype(opts["dtype"])), None]
            if opts["word_boundaries"] != "none":
                self.writers[key][1] = indexed.IndexedDatasetWriter(indexed.words_prefix(prefix), np.uint8)

    def each(self):
        return [w for pair in self.writers.values() for w in pair if w is not None]

    def add(self, result: dict) -> None:
        for key, (parts, lengths, words) in result["tokens"].items():
            tok_writer, word_writer = self.writers[key]
            tok_writer.add_parts(parts, lengths)
            if word_writer is not None:
                word_writer.add_parts(words, lengths)
            self.empty[key] += int(np.count_nonzero(lengths == 0))
        self.counts["documents"] += result["n_docs"]
        self.counts["text_bytes"] += result["n_text_bytes"]
        self.counts["blank_lines"] += result["blank_lines"]
        for _, code, _ in result["errors"]:
            self.counts["skipped"][code] = self.counts["skipped"].get(code, 0) + 1

    def commit(self, key: str, parts_dir: str, index: int) -> dict:
        """Publish the shards, then the record (last: it marks the part complete); return the record."""
        for w in self.each():
            w.commit()
        files = {}
        for w in self.each():
            for path in (indexed.bin_path(w.prefix), indexed.idx_path(w.prefix)):
                files[os.path.basename(path)] = os.path.getsize(path)
        per_key = {k: {"documents": w.n_docs, "tokens": w.n_tokens, "zero_token_documents": self.empty[k]}
                   for k, (w, _) in self.writers.items()}
        record = {"format": PART_FORMAT, "key": key, "part": index, "files": files, "keys": per_key, **self.counts,
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}  # Linux: KB
        path = record_path(parts_dir, index)
        with open(path + f".tmp{os.getpid()}", "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(path + f".tmp{os.getpid()}", path)
        return record


def _fail(piece, errors: list) -> None:
    loc, code, message = errors[0]
    raise PartFailed(f"{location(piece, loc)}: {message} [{code}]; fix the input or pass --on-error skip")


def run_part(part: Part, key: str, progress=None) -> dict:
    """Read, tokenize and write one part; return its record. `progress(documents, input bytes)` is
    called after each chunk. Raises PartFailed on a bad input under --on-error fail; whatever happens,
    no temporary file of the part is left (a killed process's are removed by the next run)."""
    opts = _WORKER["opts"]
    out = _PartWriters(opts["parts_dir"], part.index, opts)
    try:
        for piece in part.pieces:
            for chunk in piece_chunks(piece, opts["keys"], opts["max_document_bytes"]):
                result = process_chunk(chunk)
                if result["errors"] and opts["on_error"] == "fail":
                    _fail(piece, result["errors"])
                out.add(result)
                if progress is not None:
                    progress(result["n_docs"], chunk.file_bytes)
        for w in out.each():
            w.finalize()
        return out.commit(key, opts["parts_dir"], part.index)
    except BaseException:
        for w in out.each():
            w.abort()
        raise
