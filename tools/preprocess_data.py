"""Tokenize corpora into Megatron indexed shards (flags as Megatron-LM's preprocess_data.py).

    python tools/preprocess_data.py --input 'corpus/*.jsonl.zst' 'fineweb2/*.parquet' --json-keys text \
        --output-prefix data/corpus --tokenizer-type SentencePieceTokenizer --tokenizer-model spm.model \
        --workers 64 --word-boundaries unidic-lite [--append-eod] [--on-error skip]

Reads JSONL (.jsonl, .jsonl.gz, .jsonl.zst) and parquet, mixed. Each worker reads, tokenizes and writes
its own parts of the input in data/corpus.parts/; the parts are appended in input order into
data/corpus_text_document.bin/.idx (+ _words.bin/.idx with --word-boundaries) and the folder is
removed. A run that stops keeps its complete parts: the same command again does only the rest.
Exit status 2 with one `error:` line for bad input (`file:line: reason` unless --on-error skip) or an
output that cannot be written, 1 when a worker dies. See megatron_jp/data/preprocess.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jp.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
