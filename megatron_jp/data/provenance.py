"""Shard provenance: the JSON sidecar `{prefix}.json` written next to every shard, and its checks.

    {"format": 1, "megatron_jp": "0.1.0",
     "tokenizer": {"type": "SentencePieceTokenizer", "file": "spm.model", "sha256": "...", "vocab_size": 32000,
                   "special_ids": {"cls": 2, "sep": 3, "mask": 4, "pad": 0, "unk": 1, "eod": 3}},
     "word_boundaries": "unidic-lite", "json_key": "text", "append_eod": false, "dtype": "uint16",
     "documents": 1000, "tokens": 250000, "zero_token_documents": 0, "skipped": {"invalid_json": 2},
     "blank_lines": 0, "input_files": 3, "text_bytes": 1234567}

Deterministic (no times, hosts or paths), so the merge of slices equals one run over all files.
Training and merging compare the tokenizer of every sidecar with the one they use (type, file hash,
vocabulary size, special ids) and refuse a mismatch naming both, unless told otherwise
(`data.ignore_tokenizer_mismatch`, `merge_datasets.py --allow-tokenizer-mismatch`). A sidecar whose
counts differ from its shard's belongs to another run and is refused. Shards without a sidecar
(written by Megatron-LM or before sidecars existed) are used with a note: nothing can be checked.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os

import numpy as np

import megatron_jp
from megatron_jp.data.indexed import ShardFormatError

FORMAT = 1
SPECIALS = ("cls", "sep", "mask", "pad", "unk", "eod")
SUMMED = ("documents", "tokens", "zero_token_documents", "blank_lines", "input_files", "text_bytes")
DESCRIPTIVE = ("word_boundaries", "json_key", "append_eod")  # merged shards may differ: the merge lists them


NO_SIDECAR = "no provenance sidecar"


class TokenizerMismatch(ShardFormatError):
    """A shard made with another tokenizer than the one configured."""


def sidecar_path(prefix: str) -> str:
    return prefix + ".json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def tokenizer_file(tokenizer) -> str | None:
    """The file that defines the tokenizer's ids (None for the built-in byte tokenizer)."""
    path = getattr(tokenizer, "path", "") or ""
    if not path:
        return None
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return path if os.path.isfile(path) else None


def tokenizer_info(tokenizer) -> dict | None:
    """What the sidecar records of a tokenizer; None for objects that are not megatron_jp tokenizers."""
    if not getattr(tokenizer, "type_name", ""):
        return None
    file = tokenizer_file(tokenizer)
    return {"type": tokenizer.type_name, "file": os.path.basename(file) if file else None,
            "sha256": _sha256(file) if file else None, "vocab_size": int(tokenizer.vocab_size),
            "special_ids": {k: int(getattr(tokenizer, f"{k}_id")) for k in SPECIALS}}


def describe_tokenizer(info: dict) -> str:
    digest = f"sha256 {info['sha256'][:12]}, " if info.get("sha256") else ""
    return f"{info['type']} {info.get('file') or '(built in)'} ({digest}vocab {info['vocab_size']:,})"


def tokenizer_differences(a: dict, b: dict) -> list[str]:
    """Which of type, file hash, vocabulary size, special ids differ (the file name may)."""
    return [k for k in ("type", "sha256", "vocab_size", "special_ids") if a.get(k) != b.get(k)]


def shard_record(tokenizer, *, word_boundaries: str, json_key: str, append_eod: bool, dtype, counts: dict) -> dict:
    record = {"format": FORMAT, "megatron_jp": megatron_jp.__version__, "tokenizer": tokenizer_info(tokenizer),
              "word_boundaries": word_boundaries, "json_key": json_key, "append_eod": bool(append_eod),
              "dtype": np.dtype(dtype).name, "skipped": dict(sorted(counts.get("skipped", {}).items()))}
    record.update({k: int(counts.get(k, 0)) for k in SUMMED})
    return record


def write_sidecar(prefix: str, record: dict, tag: str = "") -> str:
    """Write `{prefix}.json{tag}` (a temporary name when tag is given; publish with os.replace)."""
    path = sidecar_path(prefix) + tag
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    return path


def read_sidecar(prefix: str) -> dict | None:
    """The sidecar of `prefix`, or None when it has none; a malformed one is refused naming the file."""
    path = sidecar_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        raise ShardFormatError(f"{path}: unreadable provenance sidecar ({err}); re-run tools/preprocess_data.py "
                               "or delete it") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or "tokenizer" not in record:
        raise ShardFormatError(f"{path}: not a megatron_jp shard sidecar (format {FORMAT} expected)")
    return record


def check_shard(prefix: str, shard, expected: dict | None, allow_mismatch: bool) -> str | None:
    """Raise if the sidecar contradicts the shard or (unless allowed) the tokenizer; return a note or None."""
    record = read_sidecar(prefix)
    if record is None:
        return NO_SIDECAR
    if record["documents"] != len(shard) or record["tokens"] != shard.n_tokens:
        raise ShardFormatError(f"{sidecar_path(prefix)} describes {record['documents']:,} documents and "
                               f"{record['tokens']:,} tokens, the shard holds {len(shard):,} and {shard.n_tokens:,}: "
                               "the sidecar belongs to another run; re-run tools/preprocess_data.py")
    theirs = record["tokenizer"]
    if expected is None or theirs is None or not tokenizer_differences(theirs, expected):
        return None
    message = (f"{prefix} was tokenized with {describe_tokenizer(theirs)}, but the configured tokenizer is "
               f"{describe_tokenizer(expected)} (they differ in {', '.join(tokenizer_differences(theirs, expected))})")
    if not allow_mismatch:
        raise TokenizerMismatch(message + "; re-run tools/preprocess_data.py with the configured tokenizer, or set "
                                "data.ignore_tokenizer_mismatch=true if you know both give the same ids")
    return message + " (data.ignore_tokenizer_mismatch is set)"


def merge_records(prefixes: list[str], records: list[dict], allow_mismatch: bool = False) -> dict:
    """The sidecar of the concatenation of shards: counts summed; the tokenizer must agree (unless
    allowed); word boundaries, key and EOD that differ become the sorted list of their values."""
    first = records[0]
    for prefix, record in zip(prefixes[1:], records[1:]):
        if record.get("dtype") != first.get("dtype"):
            raise ShardFormatError(f"{prefix} holds {record.get('dtype')} ids, {prefixes[0]} {first.get('dtype')}: "
                                   "such shards cannot be merged")
        bad = tokenizer_differences(record["tokenizer"] or {}, first["tokenizer"] or {})
        if bad and not allow_mismatch:
            raise TokenizerMismatch(f"{prefix} was tokenized with {describe_tokenizer(record['tokenizer'])}, "
                                    f"{prefixes[0]} with {describe_tokenizer(first['tokenizer'])}; merge shards of one "
                                    "tokenizer, or pass --allow-tokenizer-mismatch")
    merged = dict(first)
    merged["megatron_jp"] = megatron_jp.__version__
    for key in DESCRIPTIVE:
        values = sorted({json.dumps(r.get(key)) for r in records})
        merged[key] = first.get(key) if len(values) == 1 else [json.loads(v) for v in values]
    for key in SUMMED:
        merged[key] = sum(int(r.get(key, 0)) for r in records)
    skipped = collections.Counter()
    for r in records:
        skipped.update(r.get("skipped", {}))
    merged["skipped"] = dict(sorted(skipped.items()))
    return merged
