"""Merge Megatron indexed shards into one (word-flag shards and provenance sidecars too).

    python tools/merge_datasets.py --input data/part0_text_document data/part1_text_document \
        --output-prefix data/all_text_document
    python tools/merge_datasets.py --input data/parts/ --output-prefix data/all_text_document

--input takes shard prefixes or folders (every *.idx inside, sorted by name, word shards excluded).
Documents keep their order, so the slices of `preprocess_data.py --slice I/N` merged in slice order
give the bytes of one run over all files. Sidecars (`{prefix}.json`) must agree on the tokenizer
(--allow-tokenizer-mismatch overrides); the merged one sums the counts and lists differing word
boundaries, keys or EOD settings. An output prefix whose files exist is refused unless --overwrite,
and one whose files are also inputs (e.g. a rerun over a folder that now holds the merged shard) is
refused always.
"""

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jp.data import indexed, provenance  # noqa: E402


def input_prefixes(items: list[str]) -> list[str]:
    prefixes = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(p[:-4] for p in glob.glob(os.path.join(item, "*.idx")))
            prefixes += [p for p in found if not p.endswith(indexed.WORDS_SUFFIX)]
        else:
            prefixes.append(item[:-4] if item.endswith((".bin", ".idx")) else item)
    return prefixes


def shard_files(prefix: str) -> list[str]:
    """Every file a merge reads or writes for a prefix: tokens, word flags, sidecar."""
    words = indexed.words_prefix(prefix)
    return [indexed.idx_path(prefix), indexed.bin_path(prefix), indexed.idx_path(words), indexed.bin_path(words),
            provenance.sidecar_path(prefix)]


def check_output(prefixes: list[str], out: str, overwrite: bool) -> None:
    """Refuse an output that is one of the inputs, and existing output files unless `overwrite`."""
    reads = {os.path.realpath(f): p for p in prefixes for f in shard_files(p)}
    for f in shard_files(out):
        if os.path.realpath(f) in reads:
            raise ValueError(f"--output-prefix {out} is also an input ({reads[os.path.realpath(f)]}): merging it "
                             "into itself would double its documents; choose another prefix")
    existing = [f for f in shard_files(out) if os.path.exists(f)]
    if existing and not overwrite:
        raise ValueError(f"{existing[0]} exists: pass --overwrite to replace the merged shard, or choose another "
                         "--output-prefix")


def merged_sidecar(prefixes: list[str], allow_mismatch: bool):
    """(merged record or None, warning or None); refuses inputs made with other tokenizers."""
    records = [provenance.read_sidecar(p) for p in prefixes]
    missing = [p for p, r in zip(prefixes, records) if r is None]
    if missing:
        return None, (f"{len(missing)} of {len(prefixes)} inputs have no provenance sidecar (first: {missing[0]}); "
                      "the merged shard gets none")
    return provenance.merge_records(prefixes, records, allow_mismatch), None


def merge(prefixes: list[str], out: str, allow_mismatch: bool = False) -> tuple[indexed.IndexedDataset, list[str]]:
    """Merge token shards, word shards (when every input has one) and sidecars; return (shard, warnings)."""
    record, warning = merged_sidecar(prefixes, allow_mismatch)  # refuse before writing anything
    warnings = [warning] if warning else []
    with_words = [indexed.exists(indexed.words_prefix(q)) for q in prefixes]
    stale = [provenance.sidecar_path(out)]  # (--overwrite) never leave an old sidecar or word shard beside new ones
    stale += [] if all(with_words) else [indexed.idx_path(indexed.words_prefix(out)),
                                         indexed.bin_path(indexed.words_prefix(out))]
    for path in stale:
        if os.path.exists(path):
            os.unlink(path)
    merged = indexed.merge(prefixes, out)
    if all(with_words):
        words = indexed.merge([indexed.words_prefix(q) for q in prefixes], indexed.words_prefix(out))
        merged.check_words(words)
    elif any(with_words):
        warnings.append("only some inputs have word-flag shards; merged tokens only")
    if record is not None:
        record["word_boundaries"] = record["word_boundaries"] if all(with_words) else "none"
        tag = f".tmp{os.getpid()}"
        os.replace(provenance.write_sidecar(out, record, tag), provenance.sidecar_path(out))
    return merged, warnings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, help="shard prefixes or folders of shards")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing merged shard at --output-prefix")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="merge shards whose sidecars name different tokenizers (experts: the ids must agree)")
    args = p.parse_args(argv)
    prefixes = input_prefixes(args.input)
    try:
        check_output(prefixes, args.output_prefix, args.overwrite)
        merged, warnings = merge(prefixes, args.output_prefix, args.allow_tokenizer_mismatch)
    except (indexed.ShardFormatError, ValueError, OSError) as err:  # bad input: one line, status 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"merged {len(prefixes)} shards: {len(merged):,} documents, {merged.n_tokens:,} tokens "
          f"-> {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
