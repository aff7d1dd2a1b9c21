"""Train a SentencePiece unigram tokenizer for Japanese encoders and export it for Hugging Face.

    python tools/train_tokenizer.py --input corpus.txt [more.txt ...] --model-prefix out/spm --vocab-size 32000

Writes out/spm.model (+ .vocab) and out/spm-hf/ (tokenizer.json, tokenizer_config.json,
special_tokens_map.json), whose fast tokenizer gives the same ids as the .model. Options follow
llm-jp / sarashina: byte fallback (no unknown characters), digits split one by one, no dummy
prefix, whitespace kept as written. Special tokens: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
Input files are plain text, one sentence or paragraph per line (a JSONL corpus: pass --json-key).
Bad input exits with status 2 and one line naming it; outputs are written under temporary names and
renamed when complete. Existing outputs are refused unless --overwrite (then PREFIX-hf/ is replaced
whole), and an output that is also an input is refused always.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jp.data.tokenizers import (SentencePieceTokenizer, TokenizerError, save_hf_tokenizer)  # noqa: E402
from megatron_jp.files import (chmod_as_created, describe_os_error, holds_files, inside, remove_quietly)  # noqa: E402

MIN_VOCAB = 5 + 256 + 1  # the five specials, the 256 byte-fallback pieces, at least one piece of text


class InputError(ValueError):
    """Bad input; the message names it."""


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
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model, .vocab and -hf/")
    args = p.parse_args(argv)
    if args.vocab_size < MIN_VOCAB:
        p.error(f"--vocab-size must be at least {MIN_VOCAB} (5 specials + 256 byte pieces + text), got {args.vocab_size}")
    if not 0 < args.character_coverage <= 1:
        p.error(f"--character-coverage must be in (0, 1], got {args.character_coverage}")
    for name in ("input_sentence_size", "max_sentence_length", "num_threads"):
        if getattr(args, name) < (0 if name == "input_sentence_size" else 1):
            p.error(f"--{name.replace('_', '-')} is {getattr(args, name)}: too small")
    return args


def jsonl_to_text(paths: list[str], key: str, out) -> None:
    """Write the `key` field of every JSONL record, one line per paragraph, to the file `out`."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line) if line.strip() else {}
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{number}: not valid JSON ({e.msg}); --json-key reads JSONL") from None
                text = record.get(key) if isinstance(record, dict) else None
                if isinstance(text, str):
                    out.writelines(s + "\n" for s in text.splitlines() if s.strip())


def check_inputs(paths: list[str]):
    for path in paths:
        if not os.path.isfile(path):
            raise InputError(f"input file not found (or not a file): {path}")
        try:
            with open(path, encoding="utf-8") as f:
                f.read(1 << 16)
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text (a binary file?); give plain text or JSONL") from None
        except OSError as e:
            raise InputError(f"{path}: cannot be read ({e})") from None


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


def train_atomically(args) -> str:
    """Train under a temporary prefix beside the real one, then rename PREFIX.model and PREFIX.vocab."""
    final = args.model_prefix
    folder = os.path.dirname(os.path.abspath(final))
    os.makedirs(folder, exist_ok=True)
    tmp_prefix = os.path.join(folder, f".{os.path.basename(final)}.{os.getpid()}.tmp")
    text = None
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as text:
            if args.json_key:
                jsonl_to_text(args.input, args.json_key, text)
        inputs = [text.name] if args.json_key else args.input
        train(argparse.Namespace(**{**vars(args), "input": inputs, "model_prefix": tmp_prefix}))
        for ext in (".vocab", ".model"):  # .model last: its presence means the pair is complete
            chmod_as_created(tmp_prefix + ext)
            os.replace(tmp_prefix + ext, final + ext)
    except RuntimeError as e:  # SentencePiece reports bad input (an empty corpus, too few pieces) this way
        raise InputError(f"SentencePiece cannot train on {', '.join(args.input)}: "
                         f"{str(e).strip().splitlines()[-1][:300]}") from None
    finally:
        if text is not None:
            remove_quietly(text.name)
        for ext in (".model", ".vocab"):
            remove_quietly(tmp_prefix + ext)
    return final + ".model"


def check_outputs(args) -> None:
    """Refuse outputs that are inputs, and (without --overwrite) outputs that exist."""
    prefix = args.model_prefix
    outputs = [prefix + ".model", prefix + ".vocab", prefix + "-hf"]
    for path in args.input:
        if any(inside(path, out) for out in outputs):
            raise InputError(f"--model-prefix {prefix} would write over the input {path}; choose another prefix")
    existing = [out for out in outputs if holds_files(out)]
    if existing and not args.overwrite:
        raise InputError(f"{existing[0]} exists: pass --overwrite to replace the tokenizer, or choose another "
                         "--model-prefix")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_outputs(args)
        check_inputs(args.input)
        model = train_atomically(args)
        tok = SentencePieceTokenizer(model)
        if tok.vocab_size < args.vocab_size:
            print(f"warning: the corpus supports only {tok.vocab_size} pieces (< --vocab-size {args.vocab_size})",
                  file=sys.stderr)
        hf_dir = save_hf_tokenizer(tok, args.model_prefix + "-hf", replace=True)
    except (InputError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {describe_os_error(e) or e}", file=sys.stderr)
        return 2
    print(json.dumps({"model": model, "hf": hf_dir, "vocab_size": tok.vocab_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
