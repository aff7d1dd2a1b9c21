"""Train a SentencePiece unigram tokenizer for Japanese encoders and export it for Hugging Face.

    python tools/train_tokenizer.py --input corpus.txt [more.txt ...] --model-prefix out/spm --vocab-size 32000

Writes out/spm.model (+ .vocab) and out/spm-hf/ (tokenizer.json, tokenizer_config.json,
special_tokens_map.json), whose fast tokenizer gives the same ids as the .model. Options follow
llm-jp / sarashina: byte fallback (no unknown characters), digits split one by one, no dummy
prefix, whitespace kept as written. Special tokens: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
Input files are plain text, one sentence or paragraph per line (a JSONL corpus: pass --json-key).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jp.data.tokenizers import SentencePieceTokenizer, save_hf_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, help="text files (one sentence/paragraph per line)")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model, PREFIX.vocab and PREFIX-hf/")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--json-key", default=None, help="read JSONL and train on this key instead of plain lines")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="characters outside the coverage fall back to bytes")
    p.add_argument("--normalization", default="nfkc", choices=["nfkc", "nmt_nfkc", "identity", "nfkc_cf"],
                   help="SentencePiece normalization rule (nfkc keeps newlines and tabs)")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="sentences sampled for training (0: all)")
    p.add_argument("--max-sentence-length", type=int, default=16384, help="longer lines are skipped (bytes)")
    p.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=1234, help="seed of the sentence sampling")
    return p.parse_args(argv)


def jsonl_to_text(paths: list[str], key: str, out) -> None:
    """Write the `key` field of every JSONL record, one line per paragraph, to the file `out`."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = json.loads(line).get(key) if line.strip() else None
                if isinstance(text, str):
                    out.writelines(s + "\n" for s in text.splitlines() if s.strip())


def train(args) -> str:
    import sentencepiece as spm

    spm.set_random_generator_seed(args.seed)  # sentence sampling is random
    spm.SentencePieceTrainer.train(
        input=args.input, model_prefix=args.model_prefix, vocab_size=args.vocab_size, model_type="unigram",
        byte_fallback=True, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, normalization_rule_name=args.normalization,
        character_coverage=args.character_coverage, input_sentence_size=args.input_sentence_size,
        shuffle_input_sentence=True, max_sentence_length=args.max_sentence_length, seed_sentencepiece_size=1_000_000,
        pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]", bos_id=-1, eos_id=-1,
        control_symbols=["[CLS]", "[SEP]", "[MASK]"], hard_vocab_limit=False,
        num_threads=args.num_threads, minloglevel=2)
    return args.model_prefix + ".model"


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [p for p in args.input if not os.path.isfile(p)]
    if missing:
        print(f"error: input file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as tmp:
        if args.json_key:
            jsonl_to_text(args.input, args.json_key, tmp)
            args.input = [tmp.name]
    try:
        model = train(args)
    finally:
        os.unlink(tmp.name)
    tok = SentencePieceTokenizer(model)
    if tok.vocab_size < args.vocab_size:
        print(f"warning: the corpus supports only {tok.vocab_size} pieces (< --vocab-size {args.vocab_size})",
              file=sys.stderr)
    hf_dir = save_hf_tokenizer(tok, args.model_prefix + "-hf")
    print(json.dumps({"model": model, "hf": hf_dir, "vocab_size": tok.vocab_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
