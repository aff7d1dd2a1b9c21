"""Build Hugging Face `tokenizer.json` files for our tokenizers, and write tokenizer folders.

A SentencePiece unigram model becomes a `tokenizers` Unigram model with the same pieces and scores,
the model's own precompiled normalisation map, its whitespace handling and byte fallback, so the
fast tokenizer yields the same ids as SentencePiece. The byte tokenizer becomes a merge-free
byte-level BPE whose ids equal `ByteTokenizer`'s. Folders carry `tokenizer_config.json` with
`tokenizer_class: PreTrainedTokenizerFast`, which loads in transformers 4.x and 5.x.

The SentencePiece model proto is read with a few lines of wire-format decoding rather than the
protobuf package, which the sentencepiece wheel does not pull in.
"""

from __future__ import annotations

import json
import os
import struct

SPECIAL_KEYS = ("cls", "sep", "mask", "pad", "unk")

# sentencepiece_model.proto field numbers used below.
_MODEL_PIECES, _MODEL_TRAINER, _MODEL_NORMALIZER = 1, 2, 3
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TRAINER_MODEL_TYPE, _TRAINER_BYTE_FALLBACK, _TRAINER_WS_SUFFIX = 3, 35, 24
_NORM_CHARSMAP, _NORM_DUMMY_PREFIX, _NORM_EXTRA_WS, _NORM_ESCAPE_WS = 2, 3, 4, 5
_TYPE_NORMAL, _TYPE_UNKNOWN, _TYPE_USER_DEFINED = 1, 2, 4
# Pieces SentencePiece never matches in text (control, unused, byte) get this score so the Unigram
# lattice of `tokenizers` does not pick them for literal text like "<0x41>" either.
_NEVER_MATCH_SCORE = -1e6


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def proto_fields(buf: bytes) -> dict[int, list]:
    """Top-level fields of a serialized protobuf message: field number -> values (int or bytes)."""
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {number})")
        fields.setdefault(number, []).append(value)
    return fields


def _last(fields: dict, number: int, default):
    return fields[number][-1] if number in fields else default


def read_spm_model(serialized: bytes) -> dict:
    """The parts of a SentencePiece ModelProto needed to rebuild it with `tokenizers`."""
    model = proto_fields(serialized)
    trainer = proto_fields(_last(model, _MODEL_TRAINER, b""))
    norm = proto_fields(_last(model, _MODEL_NORMALIZER, b""))
    pieces = []
    for raw in model.get(_MODEL_PIECES, []):
        p = proto_fields(raw)
        score = struct.unpack("<f", _last(p, _PIECE_SCORE, b"\0\0\0\0"))[0]
        pieces.append((_last(p, _PIECE_TEXT, b"").decode("utf-8"), score, _last(p, _PIECE_TYPE, _TYPE_NORMAL)))
    return {
        "pieces": pieces,
        "model_type": _last(trainer, _TRAINER_MODEL_TYPE, 1),
        "byte_fallback": bool(_last(trainer, _TRAINER_BYTE_FALLBACK, 0)),
        "whitespace_suffix": bool(_last(trainer, _TRAINER_WS_SUFFIX, 0)),
        "charsmap": _last(norm, _NORM_CHARSMAP, b""),
        "add_dummy_prefix": bool(_last(norm, _NORM_DUMMY_PREFIX, 1)),
        "remove_extra_whitespaces": bool(_last(norm, _NORM_EXTRA_WS, 1)),
        "escape_whitespaces": bool(_last(norm, _NORM_ESCAPE_WS, 1)),
    }


def _spm_normalizer(spec: dict):
    from tokenizers import Regex, normalizers

    steps = []
    if spec["charsmap"]:
        steps.append(normalizers.Precompiled(spec["charsmap"]))
    if spec["remove_extra_whitespaces"]:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec["add_dummy_prefix"]:
        steps.append(normalizers.Prepend(" "))
    if spec["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "\u2581"))
    return normalizers.Sequence(steps)


def spm_to_hf(sp_model_bytes: bytes, source: str):
    """A `tokenizers.Tokenizer` equivalent to a SentencePiece unigram model (no special tokens yet)."""
    from tokenizers import Tokenizer, decoders, models

    spec = read_spm_model(sp_model_bytes)
    if spec["model_type"] != 1:
        raise ValueError(f"{source}: only unigram SentencePiece models can be exported to tokenizer.json "
                         f"(model_type={spec['model_type']}); train one with tools/train_tokenizer.py")
    if spec["whitespace_suffix"]:
        raise ValueError(f"{source}: treat_whitespace_as_suffix models are not supported by the exporter")
    matchable = (_TYPE_NORMAL, _TYPE_USER_DEFINED, _TYPE_UNKNOWN)
    vocab = [(p, s if t in matchable else _NEVER_MATCH_SCORE) for p, s, t in spec["pieces"]]
    unk_id = next(i for i, (_, _, t) in enumerate(spec["pieces"]) if t == _TYPE_UNKNOWN)
    tok = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=spec["byte_fallback"]))
    tok.normalizer = _spm_normalizer(spec)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec["add_dummy_prefix"]:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    user_defined = [p for p, _, t in spec["pieces"] if t == _TYPE_USER_DEFINED]
    if user_defined:
        # SentencePiece matches user-defined symbols before segmenting; added tokens do the same.
        tok.add_tokens(user_defined)
    return tok


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table used by `tokenizers`' ByteLevel steps."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_hf(special_tokens: list[str], byte_offset: int):
    """A merge-free byte-level BPE: special tokens at ids 0.., byte b at id byte_offset + b."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    vocab.update({ch: byte_offset + b for b, ch in bytes_to_unicode().items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def finish_hf(tok, specials: dict[str, tuple[str, int]]):
    """Register the special tokens and a BERT-style `[CLS] A [SEP] (B [SEP])` post-processor."""
    from tokenizers import AddedToken, processors

    tok.add_special_tokens([AddedToken(text, special=True, normalized=False)
                            for text, _ in specials.values()])
    (cls, cls_id), (sep, sep_id) = specials["cls"], specials["sep"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, cls_id), (sep, sep_id)])
    return tok


def write_folder(tok, specials: dict[str, tuple[str, int]], out_dir: str) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    names = {f"{key}_token": text for key, (text, _) in specials.items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"], **names}
    for name, payload in (("tokenizer_config.json", config), ("special_tokens_map.json", names)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(payload, f, ensure_ascii=False, indent=2)
            f.write("\n")
