"""Tokenizers behind one interface: SentencePiece models, Hugging Face folders, raw UTF-8 bytes.

Every tokenizer exposes `vocab_size`, the ids `cls_id sep_id mask_id pad_id unk_id eod_id`,
`special_ids` (never masked, never drawn as random replacements), `encode(text)` -> int32 ids and
`encode_with_offsets(text)` -> (ids, starts, ends) with *character* offsets into `text`, which is
what word-boundary alignment needs. Byte-level pieces of one character all map to that character.

`build_tokenizer(type, model)` is the factory used by training and preprocessing;
`save_hf_tokenizer(tokenizer_or_path, out_dir)` writes a folder that loads with
`transformers.AutoTokenizer` and gives the same ids (used by tools/convert_to_hf.py).
EOD is the tokenizer's end-of-document token where it has one, otherwise SEP.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from megatron_jp.data import hf_export
from megatron_jp.files import move_into, output_dir, scratch_dir

try:  # built by setup.py from csrc/helpers/*.cpp; absent in a plain source checkout
    from megatron_jp import _helpers
except ImportError:  # pragma: no cover - depends on the build
    _helpers = None

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "ByteTokenizer")
# Names tried, in order, for each special token of a model we did not train ourselves.
CANDIDATES = {
    "cls": ("[CLS]", "<cls>", "<s>"),
    "sep": ("[SEP]", "<sep>", "</s>"),
    "mask": ("[MASK]", "<mask>"),
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "eod": ("<eod>", "[EOD]", "<|endoftext|>", "</s>"),
}


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or lacks a required special token; names the path."""


class Tokenizer:
    """Common interface; subclasses set `self.specials` (key -> (text, id)) and implement encoding."""

    type_name = ""

    def __init__(self, path: str, vocab_size: int, specials: dict[str, tuple[str, int]]):
        self.path, self.vocab_size, self.specials = path, vocab_size, specials
        for key in ("cls", "sep", "mask", "pad", "unk", "eod"):
            setattr(self, f"{key}_id", specials[key][1])
        self.special_ids = np.unique(np.array([i for _, i in specials.values()] + self._extra_special_ids(),
                                              dtype=np.int64))

    def _extra_special_ids(self) -> list[int]:
        return []

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.type_name}({self.path!r}, vocab_size={self.vocab_size})"


def _require(found: dict, path: str, keys=("cls", "sep", "mask", "pad", "unk")) -> None:
    missing = [k for k in keys if found.get(k) is None]
    if missing:
        wanted = ", ".join(f"{k} (tried {'/'.join(CANDIDATES[k])})" for k in missing)
        raise TokenizerError(f"{path}: no special token for {wanted}; retrain with tools/train_tokenizer.py "
                             "or add them to the model")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file; offsets come from SentencePiece's own offset mapping."""

    type_name = "SentencePieceTokenizer"

    def __init__(self, path: str):
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise TokenizerError(f"SentencePiece model {path!r} does not exist (data.tokenizer_model)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"{path}: not a SentencePiece model ({err})") from err
        super().__init__(path, self.sp.get_piece_size(), self._find_specials(path))

    def _piece_id(self, piece: str):
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def _find_specials(self, path: str) -> dict:
        found = {key: next(((p, i) for p in names if (i := self._piece_id(p)) is not None), None)
                 for key, names in CANDIDATES.items()}
        found["unk"] = (self.sp.id_to_piece(self.sp.unk_id()), self.sp.unk_id())
        if self.sp.pad_id() >= 0:
            found["pad"] = (self.sp.id_to_piece(self.sp.pad_id()), self.sp.pad_id())
        self._fuzzy_specials(found)
        _require(found, path)
        found["eod"] = found["eod"] or found["sep"]
        return found

    def _fuzzy_specials(self, found: dict) -> None:
        # Models such as llm-jp's name them "<CLS|LLM-jp>": take a control piece containing the name.
        controls = [i for i in range(self.sp.get_piece_size()) if self.sp.is_control(i)]
        for key in ("cls", "sep", "mask", "pad"):
            if found[key] is None:
                hit = next((i for i in controls if key.upper() in self.sp.id_to_piece(i).upper()), None)
                found[key] = None if hit is None else (self.sp.id_to_piece(hit), hit)

    def _extra_special_ids(self) -> list[int]:
        return [i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unused(i)]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self.sp.encode(texts)]

    def encode_with_offsets(self, text: str):
        ids = np.asarray(self.sp.encode(text, out_type="numpy"), dtype=np.int32)
        spans = self._offsets_from_pieces(text, ids)
        if spans is not None:
            return ids, spans[0], spans[1]
        out = self.sp.encode_as_offset_mapping(text)
        spans = np.asarray(out["offsets"], dtype=np.int64).reshape(-1, 2)
        return np.asarray(out["ids"], dtype=np.int32), spans[:, 0].copy(), spans[:, 1].copy()

    def _piece_bytes(self) -> np.ndarray:
        """UTF-8 length of each piece in the normalized text (byte pieces 1; -1 for unknown/control)."""
        if not hasattr(self, "_piece_bytes_table"):
            sp = self.sp
            self._piece_bytes_table = np.array(
                [1 if sp.is_byte(i) else -1 if sp.is_unknown(i) or sp.is_control(i)
                 else len(sp.id_to_piece(i).encode("utf-8")) for i in range(self.vocab_size)], dtype=np.int64)
        return self._piece_bytes_table

    def _piece_blob(self):
        """(concatenated UTF-8 of the pieces, byte pieces as their byte; start of each; known mask)."""
        if not hasattr(self, "_piece_blob_table"):
            sp, parts = self.sp, []
            for i in range(self.vocab_size):
                piece = sp.id_to_piece(i)
                parts.append(bytes([int(piece[3:5], 16)]) if sp.is_byte(i) else piece.encode("utf-8"))
            start = np.zeros(self.vocab_size + 1, dtype=np.int64)
            np.cumsum([len(p) for p in parts], out=start[1:])
            blob = np.frombuffer(b"".join(parts), dtype=np.uint8)
            self._piece_blob_table = (blob, start, self._piece_bytes() >= 0)
        return self._piece_blob_table

    def _offsets_from_pieces(self, text: str, ids: np.ndarray):
        """The character spans SentencePiece's offset mapping gives, from the pieces themselves (6x
        cheaper than encode_as_offset_mapping, which builds Python objects per piece); None where
        it cannot tell (an unknown piece, a length mismatch): then the caller asks SentencePiece.
        Where the pieces spell the text out (the normalizer changed nothing) the spans come from
        matching them against it; else from their lengths in the normalized text, mapped back by
        the normalizer's offsets. A span inside a character (byte-fallback pieces) starts and ends
        at that character; tests compare with SentencePiece on awkward text."""
        if _helpers is not None:
            spans = _helpers.text_piece_spans(text.encode("utf-8"), ids, *self._piece_blob())
            if spans is not None:
                return spans
            norm, to_text = self.sp.normalize(text, with_offsets=True)
            spans = _helpers.piece_spans(norm.encode("utf-8"), ids, self._piece_bytes())
            if spans is None:
                return None
            to_text = np.asarray(to_text, dtype=np.int64)
            return to_text[spans[0]], to_text[spans[1]]
        norm = self.sp.normalize(text)
        raw = norm.encode("utf-8")
        lengths = self._piece_bytes()[ids]
        if len(lengths) and (lengths.min() < 0 or int(lengths.sum()) != len(raw)):
            return None
        bounds = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=bounds[1:])
        # normalized character of each byte position (a position inside a character: that character)
        lead = (np.frombuffer(raw, dtype=np.uint8) & 0xC0) != 0x80
        char_of = np.append(np.cumsum(lead) - 1, len(norm))
        starts, ends = char_of[bounds[:-1]], char_of[bounds[1:]]
        if norm != text.replace(" ", "\u2581"):  # the normalizer changed characters: map back
            to_text = np.asarray(self.sp.normalize(text, with_offsets=True)[1], dtype=np.int64)
            starts, ends = to_text[starts], to_text[ends]
        return starts, ends

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def _hf_special_names(folder: str) -> dict[str, str]:
    names = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(folder, fname)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for key, value in json.load(f).items():
                    if key.endswith("_token") and value:
                        names[key[:-6]] = value["content"] if isinstance(value, dict) else value
    return names


class HuggingFaceTokenizer(Tokenizer):
    """A folder with tokenizer.json (or the file itself), read with the `tokenizers` library."""

    type_name = "HuggingFaceTokenizer"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        folder = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise TokenizerError(f"Hugging Face tokenizer {path!r}: {file} does not exist (data.tokenizer_model)")
        try:
            self.hf = HFTokenizer.from_file(file)
        except OSError as err:  # unreadable (permissions, I/O): say so, not "not a tokenizer"
            raise TokenizerError(f"{file}: cannot be read ({err})") from err
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{file}: not a tokenizer.json ({str(err).splitlines()[0][:300]})") from err
        super().__init__(path, self.hf.get_vocab_size(with_added_tokens=True), self._find_specials(folder, path))

    def _find_specials(self, folder: str, path: str) -> dict:
        named = _hf_special_names(folder)
        found = {}
        for key, names in CANDIDATES.items():
            tried = ([named[key]] if key in named else []) + list(names)
            found[key] = next(((t, i) for t in tried if (i := self.hf.token_to_id(t)) is not None), None)
        if found["eod"] is None and "eos" in named and self.hf.token_to_id(named["eos"]) is not None:
            found["eod"] = (named["eos"], self.hf.token_to_id(named["eos"]))
        _require(found, path)
        found["eod"] = found["eod"] or found["sep"]
        return found

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.hf.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text: str):
        enc = self.hf.encode(text, add_special_tokens=False)
        spans = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        return np.asarray(enc.ids, dtype=np.int32), spans[:, 0].copy(), spans[:, 1].copy()

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: specials [PAD] [UNK] [CLS] [SEP] [MASK] at ids 0-4, byte b at id 5 + b (261 ids)."""

    type_name = "ByteTokenizer"
    SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    OFFSET = len(SPECIAL_TOKENS)

    def __init__(self, path: str = ""):
        ids = {t: i for i, t in enumerate(self.SPECIAL_TOKENS)}
        specials = {"pad": ("[PAD]", ids["[PAD]"]), "unk": ("[UNK]", ids["[UNK]"]), "cls": ("[CLS]", ids["[CLS]"]),
                    "sep": ("[SEP]", ids["[SEP]"]), "mask": ("[MASK]", ids["[MASK]"]), "eod": ("[SEP]", ids["[SEP]"])}
        super().__init__(path, self.OFFSET + 256, specials)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.OFFSET

    def encode_with_offsets(self, text: str):
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        # A byte starts a character unless it is a continuation byte 0b10xxxxxx.
        starts = np.cumsum((raw & 0xC0) != 0x80, dtype=np.int64) - 1
        return raw.astype(np.int32) + self.OFFSET, starts, starts + 1

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        return bytes((ids[ids >= self.OFFSET] - self.OFFSET).astype(np.uint8)).decode("utf-8", errors="replace")


def build_tokenizer(tokenizer_type: str, tokenizer_model: str = "") -> Tokenizer:
    """The tokenizer of `tokenizer_type` (one of TOKENIZER_TYPES) loaded from `tokenizer_model`."""
    if tokenizer_type == "ByteTokenizer":
        return ByteTokenizer(tokenizer_model or "")
    if tokenizer_type not in TOKENIZER_TYPES:
        raise TokenizerError(f"unknown tokenizer type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
    if not tokenizer_model:
        raise TokenizerError(f"{tokenizer_type} needs a model path (data.tokenizer_model / --tokenizer-model)")
    if not os.path.exists(tokenizer_model):
        raise TokenizerError(f"{tokenizer_type}: {tokenizer_model!r} does not exist")
    cls = SentencePieceTokenizer if tokenizer_type == "SentencePieceTokenizer" else HuggingFaceTokenizer
    return cls(tokenizer_model)


def _as_tokenizer(tokenizer_or_path) -> Tokenizer:
    if isinstance(tokenizer_or_path, Tokenizer):
        return tokenizer_or_path
    path = str(tokenizer_or_path)
    if path == "ByteTokenizer":
        return ByteTokenizer()
    if os.path.isdir(path) or path.endswith(".json"):
        return HuggingFaceTokenizer(path)
    return SentencePieceTokenizer(path)


def save_hf_tokenizer(tokenizer_or_path, out_dir: str, replace: bool = False) -> str:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json into out_dir (`replace`:
    an existing out_dir is swapped out whole, else its other files stay, e.g. a model's weights).

    Accepts a Tokenizer, a `.model` path, a tokenizer folder / tokenizer.json, or "ByteTokenizer".
    The folder loads with `AutoTokenizer.from_pretrained(out_dir)` and encodes as the source does.
    """
    tok = _as_tokenizer(tokenizer_or_path)
    specials = {k: tok.specials[k] for k in hf_export.SPECIAL_KEYS}
    if isinstance(tok, ByteTokenizer):
        hf = hf_export.byte_level_hf(list(ByteTokenizer.SPECIAL_TOKENS), ByteTokenizer.OFFSET)
    elif isinstance(tok, SentencePieceTokenizer):
        hf = hf_export.spm_to_hf(tok.sp.serialized_model_proto(), tok.path)
    else:
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_str(tok.hf.to_str())
    with (output_dir(out_dir) if replace else scratch_dir(out_dir)) as tmp:  # a full disk: nothing half-written
        hf_export.write_folder(hf_export.finish_hf(hf, specials), specials, str(tmp))
        if not replace:
            move_into(tmp, Path(out_dir))
    return out_dir
