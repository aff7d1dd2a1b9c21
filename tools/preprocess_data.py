"""Tokenize JSONL corpora into Megatron indexed shards (flags as Megatron-LM's preprocess_data.py).

    python tools/preprocess_data.py --input 'corpus/*.jsonl.gz' --json-keys text \
        --output-prefix data/corpus --tokenizer-type SentencePieceTokenizer --tokenizer-model spm.model \
        --workers 8 --word-boundaries unidic-lite [--append-eod] [--on-error skip]

Writes data/corpus_text_document.bin/.idx (+ _words.bin/.idx with --word-boundaries). Exit status
1 with `file:line: reason` on the first bad line unless --on-error skip. See
megatron_jp/data/preprocess.py for the details.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jp.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
