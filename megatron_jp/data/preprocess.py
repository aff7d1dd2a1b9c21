"""JSONL -> Megatron shards: the engine behind tools/preprocess_data.py (same flags as Megatron-LM's).

Streaming: the main process reads input lines (plain or .gz) into chunks of about CHUNK_BYTES and
hands them to a pool of `--workers` processes (spawned, each loading the tokenizer and segmenter
once); at most 2 x workers + 2 chunks are in flight and results are written in input order, so
memory is bounded by a few chunks whatever the corpus size. Per key the output is
`{prefix}_{key}_document.bin/.idx` (uint16 ids when the vocabulary has < 65500 entries, else
int32) and with `--word-boundaries` also `..._document_words.bin/.idx` (uint8 word-start flags).

Bad lines (invalid UTF-8, invalid JSON, not an object, missing key, non-string value, empty text,
a document over --max-document-bytes, a truncated .gz) stop the run with `file:line: reason`
(`--on-error fail`, the default) or are counted by reason and skipped (`--on-error skip`). Shards
are written under temporary names and renamed only when every input was read: a failed or killed
run leaves no file that looks like a complete shard. Each shard gets its provenance sidecar
`{prefix}.json` (megatron_jp.data.provenance), published after the shard, the old one removed first.

`--slice I/N` processes slice I of N of the (expanded, ordered) input files: contiguous ranges of
about equal bytes, so an array job's outputs merged in slice order (tools/merge_datasets.py) are
byte for byte what one run over all files writes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import multiprocessing
import os
import signal
import sys
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from megatron_jp.data import indexed, provenance
from megatron_jp.data.segment import SEGMENTERS, build_segmenter, segmenter_flags_all, text_chunks
from megatron_jp.data.tokenizers import TOKENIZER_TYPES, build_tokenizer

CHUNK_BYTES = 1 << 20
CHUNK_LINES = 4096
LONG_TEXT_CHARS = 1 << 20  # longer texts are tokenized piecewise (at line breaks) to bound memory
JOIN_LIMIT = 1 << 22  # ids of a chunk up to this many are sent back as one array
GROUP_CHARS = 1 << 20  # characters encoded phase by phase (tokenizer, MeCab, alignment) at a time
REASONS = {
    "invalid_utf8": "invalid UTF-8", "invalid_json": "invalid JSON", "not_object": "not a JSON object",
    "missing_key": "missing key", "not_string": "non-string value", "empty_text": "empty text",
    "too_large": "document too large", "bad_gzip": "truncated or corrupt gzip",
}


class PreprocessError(RuntimeError):
    """A bad input line under --on-error fail; the message is `file:line: reason`."""


@dataclass
class Chunk:
    """Lines of one input file handed to a worker; `errors` holds what the reader already found."""

    path: str
    lines: list = field(default_factory=list)  # (line number, raw bytes)
    errors: list = field(default_factory=list)  # (line number, reason code, message)
    raw_bytes: int = 0  # bytes of the lines
    file_bytes: int = 0  # bytes of the file read for them (compressed for .gz): drives the progress bar


@dataclass
class ChunkResult:
    path: str
    tokens: dict  # key -> (id arrays, document lengths, word-flag arrays or None)
    errors: list
    n_docs: int
    n_text_bytes: int
    blank_lines: int


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="preprocess_data.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, help="JSONL files (.gz too), globs allowed")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (default: text)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", default="", help="SentencePiece .model or tokenizer folder")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token")
    g.add_argument("--word-boundaries", default="none", choices=SEGMENTERS,
                   help="also write word-start flags (for whole word masking) from this segmenter")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (1: in this process)")
    g.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="fail: stop at the first bad line (file:line: reason); skip: count and go on")
    g.add_argument("--max-document-bytes", type=int, default=16 << 20,
                   help="refuse longer JSONL lines with their reason (0: no limit; memory grows with it)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--slice", default="", metavar="I/N",
                   help="process only slice I (0-based) of N of the input files: contiguous, about equal bytes "
                        "(array jobs; merge the outputs in slice order with tools/merge_datasets.py)")
    return p.parse_args(argv)


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


def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


# ----------------------------------------------------------------------------------------- reading

def _open(path: str):
    raw = open(path, "rb")
    return raw, (gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw)


def _read_line(f, limit: int):
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


def iter_chunks(paths: list[str], max_doc_bytes: int):
    """Chunks of raw lines from every file in order, with reader-level errors attached."""
    for path in paths:
        raw, f = _open(path)
        chunk, line_no, consumed = Chunk(path), 0, 0
        try:
            while True:
                try:
                    line, oversize = _read_line(f, max_doc_bytes)
                except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
                    chunk.errors.append((line_no + 1, "bad_gzip", f"truncated or corrupt gzip stream ({err})"))
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
                    chunk = Chunk(path)
            chunk.file_bytes = os.path.getsize(path) - consumed
            yield chunk
        finally:
            f.close()
            raw.close()


# ----------------------------------------------------------------------------------------- workers

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
        if key not in obj:
            return None, ("missing_key", f"missing key {key!r} (keys present: {', '.join(list(obj)[:8])})")
        value = obj[key]
        if not isinstance(value, str):
            return None, ("not_string", f"value of key {key!r} is {type(value).__name__}, expected a string")
        if not value.strip():
            return None, ("empty_text", f"empty text in key {key!r}")
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
    """One array for a chunk of ordinary documents (one pickle, one write); a huge document's parts
    stay apart, since joining would copy it once more."""
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


def process_chunk(chunk: Chunk) -> ChunkResult:
    """Parse, validate and tokenize the lines of a chunk (runs in a worker)."""
    opts = _WORKER["opts"]
    keys, errors = opts["keys"], list(chunk.errors)
    per_key = {k: [] for k in keys}
    n_docs = n_bytes = blanks = 0
    dtype = np.dtype(opts["dtype"])
    for i, (line_no, raw) in enumerate(chunk.lines):
        chunk.lines[i] = None  # drop each raw line once parsed: a huge document is held once, not twice
        size, blank = len(raw), not raw.strip()
        texts, err = (None, None) if blank else parse_line(raw, keys)
        del raw
        if blank or err:
            blanks += blank
            errors += [(line_no, *err)] if err else []
            continue
        n_docs += 1
        n_bytes += size
        for key, text in zip(keys, texts):
            per_key[key].append(text)
    per_key = {key: _encode_docs(docs, dtype) for key, docs in per_key.items()}
    eod = _WORKER["tokenizer"].eod_id
    tokens = {k: _key_arrays(docs, opts, eod) for k, docs in per_key.items()}
    return ChunkResult(chunk.path, tokens, sorted(errors), n_docs, n_bytes, blanks)


# ------------------------------------------------------------------------------------------ driver

def ordered_results(chunks, opts: dict, workers: int):
    """Process chunks in order; with workers > 1 keep at most 2*workers+2 of them in flight."""
    if workers <= 1:
        init_worker(opts)
        for chunk in chunks:
            yield chunk, process_chunk(chunk)
        return
    ctx = multiprocessing.get_context("spawn")  # no inherited tokenizer threads or open shard files
    with ctx.Pool(workers, initializer=init_worker, initargs=(opts,)) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(process_chunk, (chunk,))))
            while len(pending) >= 2 * workers + 2:
                done, res = pending.popleft()
                yield done, res.get()
        while pending:
            done, res = pending.popleft()
            yield done, res.get()


def _cpu_seconds(children: bool = True) -> float:
    """CPU time of this process and (children) of its finished children (the pool's workers, once joined)."""
    import resource

    who = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) if children else (resource.RUSAGE_SELF,)
    return sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime for w in who)


class Stats:
    def __init__(self):
        self.start, self.start_cpu, self.start_main_cpu = time.time(), _cpu_seconds(), _cpu_seconds(False)
        self.docs = self.tokens = self.text_bytes = self.blank_lines = 0
        self.skipped = collections.Counter()

    def add(self, result: ChunkResult, n_tokens: int) -> None:
        self.docs += result.n_docs
        self.tokens += n_tokens
        self.text_bytes += result.n_text_bytes
        self.blank_lines += result.blank_lines
        self.skipped.update(code for _, code, _ in result.errors)

    def rates(self) -> str:
        dt = max(time.time() - self.start, 1e-9)
        return f"{self.docs / dt:,.0f} docs/s, {self.text_bytes / dt / 1e6:.2f} MB/s, {self.tokens / dt:,.0f} tok/s"

    def summary(self) -> dict:
        return {"documents": self.docs, "tokens": self.tokens, "skipped": dict(self.skipped),
                "skipped_total": sum(self.skipped.values()), "blank_lines": self.blank_lines,
                "text_bytes": self.text_bytes, "seconds": round(time.time() - self.start, 3),
                "cpu_seconds": round(_cpu_seconds() - self.start_cpu, 3),
                "main_cpu_seconds": round(_cpu_seconds(False) - self.start_main_cpu, 3)}


def _make_writers(args, dtype, writers: dict) -> None:
    """Fill `writers` (key -> (token writer, word writer or None)) one by one, so cleanup sees each."""
    for key in args.json_keys:
        prefix = output_prefix(args.output_prefix, key)
        writers[key] = (indexed.IndexedDatasetWriter(prefix, dtype), None)
        if args.word_boundaries != "none":
            writers[key] = (writers[key][0], indexed.IndexedDatasetWriter(indexed.words_prefix(prefix), np.uint8))


def _each(writers: dict):
    return [w for pair in writers.values() for w in pair if w is not None]


def _write(writers, result: ChunkResult, empty: collections.Counter) -> int:
    n = 0
    for key, (parts, lengths, words) in result.tokens.items():
        tok_writer, word_writer = writers[key]
        tok_writer.add_parts(parts, lengths)
        if word_writer is not None:
            word_writer.add_parts(words, lengths)
        n += int(lengths.sum())
        empty[key] += int(np.count_nonzero(lengths == 0))
    return n


def _sidecars(args, tokenizer, writers: dict, stats, empty, n_files: int) -> dict:
    """key -> temporary sidecar path, written once every shard is finalized."""
    out = {}
    for key, (tok_writer, _) in writers.items():
        counts = {"documents": tok_writer.n_docs, "tokens": tok_writer.n_tokens, "zero_token_documents": empty[key],
                  "skipped": stats.skipped, "blank_lines": stats.blank_lines, "input_files": n_files,
                  "text_bytes": stats.text_bytes}
        record = provenance.shard_record(tokenizer, word_boundaries=args.word_boundaries, json_key=key,
                                         append_eod=args.append_eod, dtype=tok_writer.dtype, counts=counts)
        out[key] = provenance.write_sidecar(tok_writer.prefix, record, tok_writer.tag)
    return out


def _commit(writers: dict, sidecars: dict) -> None:
    """Old sidecars go first and new ones come last, so a sidecar never describes another shard."""
    for tok_writer, _ in writers.values():
        if os.path.exists(provenance.sidecar_path(tok_writer.prefix)):
            os.unlink(provenance.sidecar_path(tok_writer.prefix))
    for w in _each(writers):
        w.commit()
    for key, tmp in sidecars.items():
        os.replace(tmp, provenance.sidecar_path(writers[key][0].prefix))


def _check_errors(result: ChunkResult, on_error: str) -> None:
    if result.errors and on_error == "fail":
        line, code, message = result.errors[0]
        raise PreprocessError(f"{result.path}:{line}: {message} [{code}]; fix the line or pass --on-error skip")


def _progress(total: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, disable=quiet, file=sys.stderr, mininterval=0.5,
                desc="preprocess", dynamic_ncols=True)


def run(args) -> dict:
    """Preprocess per `args` (see parse_args); return the summary. Raises PreprocessError on bad input."""
    paths = select_slice(expand_inputs(args.input), args.slice)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    dtype = indexed.optimal_dtype(tokenizer.vocab_size)
    opts = {"keys": args.json_keys, "tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model,
            "word_boundaries": args.word_boundaries, "append_eod": args.append_eod, "dtype": np.dtype(dtype).str}
    build_segmenter(args.word_boundaries)  # fail now, not in a worker, if the segmenter is missing
    stats, bar = Stats(), _progress(sum(os.path.getsize(p) for p in paths), args.quiet)
    writers, sidecars, empty = {}, {}, collections.Counter()
    try:
        _make_writers(args, dtype, writers)  # inside try: a signal from here on cleans up
        for chunk, result in ordered_results(iter_chunks(paths, args.max_document_bytes), opts, args.workers):
            _check_errors(result, args.on_error)
            stats.add(result, _write(writers, result, empty))
            bar.update(chunk.file_bytes)
            bar.set_postfix_str(stats.rates(), refresh=False)
        for w in _each(writers):
            w.finalize()
        sidecars = _sidecars(args, tokenizer, writers, stats, empty, len(paths))
        _commit(writers, sidecars)  # only once every shard is complete
    except BaseException:
        for w in _each(writers):
            w.abort()
        for tmp in sidecars.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    finally:
        bar.close()
    summary = stats.summary()
    summary["zero_token_documents"] = sum(empty.values())
    summary["outputs"] = [output_prefix(args.output_prefix, k) for k in args.json_keys]
    return summary


def print_summary(summary: dict) -> None:
    skipped = ", ".join(f"{REASONS.get(k, k)}: {v}" for k, v in sorted(summary["skipped"].items())) or "none"
    print(f"documents {summary['documents']:,} | tokens {summary['tokens']:,} | zero-token documents "
          f"{summary['zero_token_documents']:,} | skipped {summary['skipped_total']:,} ({skipped}) | blank lines "
          f"{summary['blank_lines']:,} | {summary['seconds']:.1f} s", file=sys.stderr)
    print(json.dumps(summary, ensure_ascii=False))


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run(), which deletes the temporary files


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        summary = run(args)
    except (PreprocessError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0
