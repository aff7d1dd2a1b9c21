"""Merge Megatron indexed shards into one (word-flag shards too, when every input has one).

    python tools/merge_datasets.py --input data/part0_text_document data/part1_text_document \
        --output-prefix data/all_text_document
    python tools/merge_datasets.py --input data/parts/ --output-prefix data/all_text_document

--input takes shard prefixes or folders (every *.idx inside, sorted by name, word shards excluded).
"""

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jp.data import indexed  # noqa: E402


def input_prefixes(items: list[str]) -> list[str]:
    prefixes = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(p[:-4] for p in glob.glob(os.path.join(item, "*.idx")))
            prefixes += [p for p in found if not p.endswith(indexed.WORDS_SUFFIX)]
        else:
            prefixes.append(item[:-4] if item.endswith((".bin", ".idx")) else item)
    return prefixes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, help="shard prefixes or folders of shards")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    prefixes = input_prefixes(args.input)
    try:
        merged = indexed.merge(prefixes, args.output_prefix)
        with_words = [indexed.exists(indexed.words_prefix(q)) for q in prefixes]
        if all(with_words):
            words = indexed.merge([indexed.words_prefix(q) for q in prefixes], indexed.words_prefix(args.output_prefix))
            merged.check_words(words)
        elif any(with_words):
            print("warning: only some inputs have word-flag shards; merged tokens only", file=sys.stderr)
    except (indexed.ShardFormatError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} shards: {len(merged):,} documents, {len(merged.tokens):,} tokens "
          f"-> {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
