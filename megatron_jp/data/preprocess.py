"""Corpora -> Megatron shards: the engine behind tools/preprocess_data.py (same flags as Megatron-LM's).

Inputs: JSONL (plain, `.gz`, `.zst`) and parquet, mixed, globs allowed (megatron_jp.data.inputs).
The run is cut into parts of about --part-size-mb (byte ranges of a JSONL file cut at line starts,
runs of parquet row groups, whole compressed files, or several small files). Each of `--workers`
processes reads its own parts, tokenizes them and writes each as its own shards in
`{prefix}.parts/` (megatron_jp.data.tokenize_worker); the main process only plans, watches the
workers (megatron_jp.data.worker_pool: one that dies stops the run at once, naming the cause and the
input) and appends each finished part, in input order, to the output (the .bin copied by the
kernel), so the result is byte for byte what one process writes. Per key the output is
`{prefix}_{key}_document.bin/.idx` (uint16 ids when the vocabulary has < 65500 entries, else int32)
and with `--word-boundaries` also `..._document_words.bin/.idx` (uint8 word-start flags), plus the
provenance sidecar `{prefix}_{key}_document.json` (megatron_jp.data.provenance).

Restart: a run that stops (time limit, node failure, a dead worker) keeps its complete parts; rerun
with the same arguments and it redoes only the others. A part is reused only when its record names
the same settings (tokenizer file hash, keys, word boundaries, EOD, error policy) and the same input
bytes (file, size, mtime, range), and its files have the recorded sizes. The parts folder is removed
when the output is complete, and on a bad input (the input must change anyway). Temporary files
(`*.tmpPID`) of a killed run are removed by the next run over the same prefix.

Bad input (invalid UTF-8 or JSON, not an object, missing key, non-string value, empty text, a
document over --max-document-bytes, a truncated or corrupt .gz/.zst stream, a corrupt parquet row
group) stops the run naming `file:line` (or `file: row group G, row R`) and the reason
(`--on-error fail`, the default), or is counted by reason and skipped (`--on-error skip`). Outputs
are written under temporary names and renamed when complete: a failed or killed run leaves no file
that looks like a complete shard. An output path that is also an input, or a file at an output path
that preprocess_data did not write, is refused.

`--slice I/N` processes slice I of N of the (expanded, ordered) input files: contiguous ranges of
about equal bytes, so an array job's outputs merged in slice order (tools/merge_datasets.py) are
byte for byte what one run over all files writes. Within a slice the workers share the parts.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import signal
import sys
import time
from importlib import metadata

import numpy as np

from megatron_jp.data import indexed, provenance, tokenize_worker
from megatron_jp.data.inputs import InputError, expand_inputs, plan_parts, select_slice
from megatron_jp.data.segment import SEGMENTERS, build_segmenter
from megatron_jp.data.tokenize_worker import PART_FORMAT, PartFailed, part_prefix, record_path
from megatron_jp.data.tokenizers import TOKENIZER_TYPES, build_tokenizer
from megatron_jp.data.worker_pool import WorkerDied, WorkerPool
from megatron_jp.files import describe_os_error, remove_quietly

REASONS = {
    "invalid_utf8": "invalid UTF-8", "invalid_json": "invalid JSON", "not_object": "not a JSON object",
    "missing_key": "missing key", "not_string": "non-string value", "empty_text": "empty text",
    "too_large": "document too large", "bad_gzip": "truncated or corrupt gzip", "bad_zstd": "truncated or corrupt zstd",
    "bad_parquet": "corrupt parquet row group",
}
# a part's shards (and a writer's lengths file) and its record, under their final or temporary names
_PART_FILE = re.compile(r"^\d{6}(_.+_document(_words)?\.(bin|idx|lengths)|\.json)(\.tmp\d+)?$")
_TEMPORARY = re.compile(r"\.tmp(\d+)$")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="preprocess_data.py", allow_abbrev=False,
        description="Tokenize JSONL (.jsonl, .gz, .zst) and parquet corpora into Megatron shards. Each worker reads, "
                    "tokenizes and writes its own parts ({prefix}.parts/); they are appended in input order, so any "
                    "--workers gives the same bytes. A run that stops keeps its complete parts: rerun the same "
                    "command and only the rest is done.",
        epilog="Exit status: 0; 2 for bad input or an output that cannot be written (one `error:` line); 1 when a "
               "worker dies (the cause and its input are named); 128+N on signal N.")
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True,
                   help="JSONL (.jsonl, .jsonl.gz, .jsonl.zst) and .parquet files, mixed; globs allowed")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys (parquet: columns) to extract; a dotted name reaches a nested field (default: text)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", default="", help="SentencePiece .model or tokenizer folder")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token")
    g.add_argument("--word-boundaries", default="none", choices=SEGMENTERS,
                   help="also write word-start flags (for whole word masking) from this segmenter")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    g.add_argument("--workers", type=int, default=1,
                   help="processes that each read, tokenize and write their own parts (1: in this process)")
    g.add_argument("--part-size-mb", type=float, default=256,
                   help="input MB per part: the unit of work, of restart and of balance between workers")
    g.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="fail: stop at the first bad line (file:line: reason); skip: count and go on")
    g.add_argument("--max-document-bytes", type=int, default=16 << 20,
                   help="refuse longer JSONL lines with their reason (0: no limit; memory grows with it)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--slice", default="", metavar="I/N",
                   help="process only slice I (0-based) of N of the input files: contiguous, about equal bytes "
                        "(array jobs; merge the outputs in slice order with tools/merge_datasets.py)")
    args = p.parse_args(argv)
    if args.workers < 1 or not args.part_size_mb > 0:
        p.error("--workers must be >= 1 and --part-size-mb > 0")
    return args


def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def parts_dir(prefix: str) -> str:
    return prefix + ".parts"


# ------------------------------------------------------------------ what may be written, and leftovers

def shard_prefixes(args, words: bool | None = None) -> list[str]:
    """The prefix of every shard the run writes: per key its tokens, and its word flags if asked
    (`words` None) or if `words`."""
    words = args.word_boundaries != "none" if words is None else words
    out = []
    for key in args.json_keys:
        prefix = output_prefix(args.output_prefix, key)
        out += [prefix] + ([indexed.words_prefix(prefix)] if words else [])
    return out


def output_files(args) -> list[str]:
    """Every file the run writes or replaces (not the parts)."""
    files = [f for q in shard_prefixes(args) for f in (indexed.bin_path(q), indexed.idx_path(q))]
    return files + [provenance.sidecar_path(output_prefix(args.output_prefix, k)) for k in args.json_keys]


def _not_ours(path: str) -> str | None:
    """Why an existing file at an output path is not a shard or sidecar a previous run wrote (None if it is)."""
    if path.endswith(".json"):
        try:
            return None if provenance.read_sidecar(path[:-5]) is not None else "not a file"
        except indexed.ShardFormatError:
            return "not a shard sidecar"
    if path.endswith(".idx"):
        try:
            indexed.read_header(path)
        except (indexed.ShardFormatError, OSError):
            return "not a Megatron index"
    return None


def check_outputs(args, inputs: list[str]) -> None:
    """Refuse an output that is also an input, and a file at an output path that is not ours to replace."""
    real_inputs = {os.path.realpath(p): p for p in inputs}
    parts = os.path.realpath(parts_dir(args.output_prefix))
    for path in output_files(args):
        if os.path.realpath(path) in real_inputs:
            raise InputError(f"--input {real_inputs[os.path.realpath(path)]} is also an output of this run "
                             f"({path}); choose another --output-prefix")
        if os.path.lexists(path) and (why := _not_ours(path)):
            raise InputError(f"{path} exists and is {why}: preprocess_data replaces only what it wrote; "
                             "move it, or choose another --output-prefix")
    for real, given in real_inputs.items():
        if real.startswith(parts + os.sep):
            raise InputError(f"--input {given} lies in {parts_dir(args.output_prefix)}, this run's parts folder")
    if os.path.lexists(parts) and not os.path.isdir(parts):
        raise InputError(f"{parts_dir(args.output_prefix)} exists and is not a folder; move it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(args) -> list[str]:
    """Delete the temporary files (`*.tmpPID`) that a killed run over this prefix left, when that
    process is gone: beside the outputs and in the parts folder. Return what was removed."""
    # with or without word flags: the killed run may have been asked for them
    candidates = output_files(args) + [q + ext for q in shard_prefixes(args, words=True)
                                       for ext in (".bin", ".idx", ".lengths")]
    folder = os.path.dirname(os.path.abspath(args.output_prefix))
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    found = [os.path.join(folder, n) for n in names
             if (m := _TEMPORARY.search(n)) and any(n[:m.start()] == os.path.basename(c) for c in candidates)]
    parts = parts_dir(args.output_prefix)
    if os.path.isdir(parts):
        found += [os.path.join(parts, n) for n in os.listdir(parts) if _PART_FILE.match(n) and _TEMPORARY.search(n)]
    removed = [p for p in found if not _alive(int(_TEMPORARY.search(p).group(1)))]
    for path in removed:
        remove_quietly(path)
    return removed


def remove_parts(folder: str, temporary_only: bool) -> None:
    """Delete the parts' files (or only their temporary ones); the folder too once empty. Files whose
    names are not ours stay."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if _PART_FILE.match(name) and (not temporary_only or _TEMPORARY.search(name)):
            remove_quietly(os.path.join(folder, name))
    if not temporary_only and not os.listdir(folder):
        os.rmdir(folder)


# ------------------------------------------------------------------------------------------ restart

def _versions(word_boundaries: str) -> dict:
    names = {"unidic-lite": ("fugashi", "unidic-lite"), "sudachi": ("sudachipy", "sudachidict-core")}
    out = {}
    for name in names.get(word_boundaries, ()):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def settings_key(args, tokenizer, dtype) -> dict:
    """Everything besides the input bytes that a part's shards depend on."""
    return {"format": PART_FORMAT, "tokenizer": provenance.tokenizer_info(tokenizer), "keys": args.json_keys,
            "word_boundaries": args.word_boundaries, "segmenter": _versions(args.word_boundaries),
            "append_eod": args.append_eod, "dtype": np.dtype(dtype).str, "on_error": args.on_error,
            "max_document_bytes": args.max_document_bytes}


def part_key(settings: dict, part) -> str:
    pieces = []
    for p in part.pieces:
        st = os.stat(p.path)
        pieces.append([os.path.realpath(p.path), st.st_size, st.st_mtime_ns, p.kind, p.start, p.stop])
    return hashlib.sha256(json.dumps([settings, pieces], sort_keys=True).encode()).hexdigest()


def complete_record(folder: str, index: int, key: str) -> dict | None:
    """The record of a part complete for these settings and inputs, or None (then it is redone)."""
    try:
        with open(record_path(folder, index), encoding="utf-8") as f:
            record = json.load(f)
        if record.get("format") != PART_FORMAT or record.get("key") != key:
            return None
        sizes_ok = all(os.path.getsize(os.path.join(folder, name)) == size for name, size in record["files"].items())
        return record if sizes_ok else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------ merging

class Merger:
    """The output writers of every key; parts are appended strictly in input order as they finish."""

    def __init__(self, args, dtype, folder: str):
        self.args, self.folder, self.records, self.next = args, folder, {}, 0
        self.writers = {}
        for key in args.json_keys:  # filled one by one, so abort() sees each
            prefix = output_prefix(args.output_prefix, key)
            self.writers[key] = [indexed.IndexedDatasetWriter(prefix, dtype), None]
            if args.word_boundaries != "none":
                self.writers[key][1] = indexed.IndexedDatasetWriter(indexed.words_prefix(prefix), np.uint8)

    def each(self):
        return [w for pair in self.writers.values() for w in pair if w is not None]

    def add(self, index: int, record: dict) -> None:
        self.records[index] = record
        while self.next in self.records:
            for key, (tok_writer, word_writer) in self.writers.items():
                prefix = part_prefix(self.folder, self.next, key)
                tok_writer.add_shard(indexed.IndexedDataset(prefix))
                if word_writer is not None:
                    word_writer.add_shard(indexed.IndexedDataset(indexed.words_prefix(prefix)))
            self.next += 1

    def totals(self) -> dict:
        out = {"documents": 0, "text_bytes": 0, "blank_lines": 0, "skipped": collections.Counter()}
        for r in self.records.values():
            for k in ("documents", "text_bytes", "blank_lines"):
                out[k] += r[k]
            out["skipped"].update(r["skipped"])
        return out

    def sidecars(self, tokenizer, n_files: int) -> dict:
        """key -> temporary sidecar path (the shards are finalized first)."""
        totals, out = self.totals(), {}
        for key, (tok_writer, _) in self.writers.items():
            counts = {"documents": tok_writer.n_docs, "tokens": tok_writer.n_tokens, "input_files": n_files,
                      "zero_token_documents": sum(r["keys"][key]["zero_token_documents"]
                                                  for r in self.records.values()),
                      "skipped": totals["skipped"], "blank_lines": totals["blank_lines"],
                      "text_bytes": totals["text_bytes"]}
            record = provenance.shard_record(tokenizer, word_boundaries=self.args.word_boundaries, json_key=key,
                                             append_eod=self.args.append_eod, dtype=tok_writer.dtype, counts=counts)
            out[key] = provenance.write_sidecar(tok_writer.prefix, record, tok_writer.tag)
        return out

    def commit(self, tokenizer, n_files: int) -> None:
        """Old sidecars go first and new ones come last, so a sidecar never describes another shard."""
        for w in self.each():
            w.finalize()
        sidecars = self.sidecars(tokenizer, n_files)
        for tok_writer, _ in self.writers.values():
            remove_quietly(provenance.sidecar_path(tok_writer.prefix))
        for w in self.each():
            w.commit()
        for key, tmp in sidecars.items():
            os.replace(tmp, provenance.sidecar_path(self.writers[key][0].prefix))

    def abort(self) -> None:
        for w in self.each():
            w.abort()
            remove_quietly(provenance.sidecar_path(w.prefix) + w.tag)


# ------------------------------------------------------------------------------------------- driver

def _in_process(tasks, opts: dict):
    """The worker's loop run in this process (--workers 1): the same messages as WorkerPool.run."""
    tokenize_worker.init_worker(opts)
    events = []
    for part, key in tasks:
        record = tokenize_worker.run_part(part, key, lambda docs, nbytes: events.append(("progress", docs, nbytes)))
        yield from events
        events.clear()
        yield "done", part.index, record


def _cpu_seconds(children: bool = True) -> float:
    """CPU time of this process and (children) of its finished children (the workers, once joined)."""
    import resource

    who = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) if children else (resource.RUSAGE_SELF,)
    return sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime for w in who)


class Progress:
    """Input bytes done across all workers (tqdm gives MB/s and the ETA), documents and tokens."""

    def __init__(self, total: int, done: int, docs: int, quiet: bool):
        from tqdm import tqdm

        self.start, self.docs, self.docs0 = time.time(), docs, docs
        self.bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, disable=quiet, file=sys.stderr,
                        mininterval=0.5, desc="preprocess", dynamic_ncols=True)

    def update(self, docs: int, nbytes: int) -> None:
        self.docs += docs
        self.bar.update(nbytes)
        rate = (self.docs - self.docs0) / max(time.time() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.docs:,} docs, {rate:,.0f} docs/s", refresh=False)


def _interrupted(folder: str, merger: Merger | None, n_parts: int) -> str:
    done = len(merger.records) if merger else 0
    return (f"{done} of {n_parts} parts are complete in {folder}: rerun the same command to do only the rest, "
            "or delete that folder")


def _plan(args):
    paths = select_slice(expand_inputs(args.input), args.slice)
    check_outputs(args, paths)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    build_segmenter(args.word_boundaries)  # fail now, not in a worker, if the segmenter is missing
    return paths, tokenizer, plan_parts(paths, max(1, int(args.part_size_mb * 1e6)))


def _worker_opts(args, dtype, folder: str) -> dict:
    return {"keys": args.json_keys, "tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model,
            "word_boundaries": args.word_boundaries, "append_eod": args.append_eod, "dtype": np.dtype(dtype).str,
            "parts_dir": folder, "on_error": args.on_error, "max_document_bytes": args.max_document_bytes}


def _resume(parts: list, folder: str, settings: dict) -> tuple[dict, list]:
    """(index -> record of each part complete from an earlier run, [(part, key)] of those to do)."""
    keys = [part_key(settings, p) for p in parts]
    reused = {p.index: r for p in parts if (r := complete_record(folder, p.index, keys[p.index]))}
    return reused, [(p, keys[p.index]) for p in parts if p.index not in reused]


def _execute(args, todo: list, opts: dict, merger: Merger, progress: Progress, clock: dict) -> None:
    """Run the parts to do (in workers, or here with --workers 1), appending each as it finishes."""
    pool = WorkerPool(min(args.workers, len(todo)), opts) if args.workers > 1 and todo else None
    clock["startup"] = _cpu_seconds(False) - clock["main"]  # fixed costs: tokenizer hash, plan, starting workers
    try:
        for message in (pool.run(todo) if pool else _in_process(todo, opts)):
            if message[0] == "progress":
                progress.update(message[1], message[2])
            else:
                merger.add(message[1], message[2])
    finally:
        if pool:
            pool.close()


def _summary(args, merger: Merger, n_parts: int, n_reused: int, clock: dict) -> dict:
    totals, records = merger.totals(), merger.records.values()
    return {"documents": totals["documents"], "tokens": sum(w.n_tokens for w, _ in merger.writers.values()),
            "skipped": dict(totals["skipped"]), "skipped_total": sum(totals["skipped"].values()),
            "blank_lines": totals["blank_lines"], "text_bytes": totals["text_bytes"],
            "zero_token_documents": sum(r["keys"][k]["zero_token_documents"] for r in records for k in args.json_keys),
            "parts": n_parts, "parts_reused": n_reused, "workers": args.workers,
            "peak_rss_mb": max((r.get("peak_rss_mb", 0) for r in records), default=0),
            "seconds": round(time.time() - clock["wall"], 3), "cpu_seconds": round(_cpu_seconds() - clock["cpu"], 3),
            "main_cpu_seconds": round(_cpu_seconds(False) - clock["main"], 3),
            "main_cpu_startup_seconds": round(clock["startup"], 3),
            "outputs": [output_prefix(args.output_prefix, k) for k in args.json_keys]}


def run(args) -> dict:
    """Preprocess per `args` (see parse_args); return the summary. Raises PartFailed on bad input,
    WorkerDied when a worker dies."""
    clock = {"wall": time.time(), "cpu": _cpu_seconds(), "main": _cpu_seconds(False)}
    paths, tokenizer, parts = _plan(args)
    dtype = indexed.optimal_dtype(tokenizer.vocab_size)
    folder = parts_dir(args.output_prefix)
    remove_leftovers(args)
    os.makedirs(folder, exist_ok=True)
    reused, todo = _resume(parts, folder, settings_key(args, tokenizer, dtype))
    progress = Progress(sum(p.size for p in parts), sum(parts[i].size for i in reused),
                        sum(r["documents"] for r in reused.values()), args.quiet)
    merger = None
    try:
        merger = Merger(args, dtype, folder)  # inside try: a signal from here on cleans up
        for index in sorted(reused):
            merger.add(index, reused[index])
        _execute(args, todo, _worker_opts(args, dtype, folder), merger, progress, clock)
        merger.commit(tokenizer, len(paths))
    except BaseException as err:
        if merger:
            merger.abort()
        bad_input = isinstance(err, PartFailed)  # the input must change: its parts are of no use
        remove_parts(folder, temporary_only=not bad_input)
        if not bad_input:
            err.add_note(_interrupted(folder, merger, len(parts)))
        raise
    finally:
        progress.bar.close()
    remove_parts(folder, temporary_only=False)
    return _summary(args, merger, len(parts), len(reused), clock)


def print_summary(summary: dict) -> None:
    skipped = ", ".join(f"{REASONS.get(k, k)}: {v}" for k, v in sorted(summary["skipped"].items())) or "none"
    print(f"documents {summary['documents']:,} | tokens {summary['tokens']:,} | zero-token documents "
          f"{summary['zero_token_documents']:,} | skipped {summary['skipped_total']:,} ({skipped}) | blank lines "
          f"{summary['blank_lines']:,} | parts {summary['parts']:,} ({summary['parts_reused']:,} kept from an "
          f"earlier run) | {summary['seconds']:.1f} s", file=sys.stderr)
    print(json.dumps(summary, ensure_ascii=False))


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run(), which deletes the temporary files


def _notes(err: BaseException) -> str:
    return "".join(f"; {n}" for n in getattr(err, "__notes__", ()))


def main(argv=None) -> int:
    """Exit status 0, 2 for bad input or an unwritable output (one `error:` line), 1 when a worker
    died or failed, 128+N on signal N."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        summary = run(args)
    except (PartFailed, InputError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}{_notes(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only folder, a full disk: no traceback from deep inside
        print(f"error: {describe_os_error(err) or f'{err.filename}: {err.strerror}'}{_notes(err)}", file=sys.stderr)
        return 2
    except (WorkerDied, RuntimeError) as err:
        print(f"error: {err}{_notes(err)}", file=sys.stderr)
        return 1
    except (SystemExit, KeyboardInterrupt) as err:
        print(f"stopped{_notes(err)}", file=sys.stderr)
        if isinstance(err, KeyboardInterrupt):
            return 130
        raise
    print_summary(summary)
    return 0
