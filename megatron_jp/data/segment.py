"""Word boundaries for whole word masking: morpheme spans, and per-token word-start flags.

A segmenter returns the character spans (starts, ends) of the words of a text; whitespace between
words belongs to no word. `word_start_flags` maps tokens to those spans through the tokens'
character offsets: morphemes that share a token are merged into one unit (a SentencePiece piece
may cross a morpheme boundary), and a token starts a word when its first morpheme differs from the
previous token's last one. Byte tokens of one character carry that character's span, so they stay
in one unit. Tokens covering only whitespace form a unit of their own.

Segmenters: `unidic-lite` (MeCab through fugashi, the default) and `sudachi` (SudachiPy, split
mode C, optional). `segmenter_flags(segmenter, text, starts, ends)` is what preprocessing calls:
for MeCab it hands the text and MeCab's -Owakati output to the C++ helper
(csrc/helpers/words.cpp), which computes the same flags as spans + `word_start_flags` in one pass. Text is fed line by line in pieces of at most MAX_CHUNK_CHARS, since MeCab slows
down on very long inputs and Sudachi refuses inputs over ~49 kB.
"""

from __future__ import annotations

import numpy as np

try:  # built by setup.py from csrc/helpers/*.cpp; absent in a plain source checkout
    from megatron_jp import _helpers
except ImportError:  # pragma: no cover - depends on the build
    _helpers = None

SEGMENTERS = ("none", "unidic-lite", "sudachi")
MAX_CHUNK_CHARS = 4096
# Characters MeCab skips between morphemes (its SPACE category); anything else is in a morpheme.
_MECAB_SKIPPED = " \t\n\x0b"
_CUT_AFTER = "。．！？!?、，,;；"


def text_chunks(text: str, max_chars: int = MAX_CHUNK_CHARS):
    """Yield (offset, chunk): the lines of `text`, long lines cut after punctuation or a space."""
    start, n = 0, len(text)
    while start < n:
        newline = text.find("\n", start, start + max_chars)
        if newline >= 0:
            end = newline + 1
        elif start + max_chars >= n:
            end = n
        else:
            end = _cut_point(text, start, start + max_chars)
        yield start, text[start:end]
        start = end


def _cut_point(text: str, start: int, limit: int) -> int:
    """A position in (start + limit/2, limit] after punctuation or whitespace, else `limit`."""
    floor = start + (limit - start) // 2
    for marks in (_CUT_AFTER, " \t\u3000"):
        best = max(text.rfind(m, floor, limit) for m in marks)
        if best >= 0:
            return best + 1
    return limit


class MecabSegmenter:
    """Short-unit words from MeCab with the unidic-lite dictionary (fugashi)."""

    name = "unidic-lite"

    def __init__(self):
        import fugashi
        import unidic_lite

        # -Owakati prints surfaces separated by spaces: far cheaper than building a node per word.
        self.tagger = fugashi.GenericTagger(f'-d "{unidic_lite.DICDIR}" -r /dev/null -Owakati')
        self.skipped = np.zeros(0x110000, dtype=bool)
        self.skipped[[ord(c) for c in _MECAB_SKIPPED]] = True

    def parse(self, text: str) -> str:
        """MeCab's surfaces of the whole text, separated by spaces (line by line, long lines cut)."""
        return " ".join(self.tagger.parse(chunk.rstrip("\n")) for _, chunk in text_chunks(text)
                        if chunk.strip(_MECAB_SKIPPED))

    def spans(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        return self._align(text, [s for s in self.parse(text).split(" ") if s])

    def flags(self, text: str, tok_starts, tok_ends, parsed: str | None = None) -> np.ndarray:
        """Word-start flag per token (as word_start_flags over spans), in C++ where it is built;
        `parsed` is self.parse(text) when the caller has it already."""
        parsed = self.parse(text) if parsed is None else parsed
        if _helpers is not None:
            flags = _helpers.wakati_word_flags(text, parsed, tok_starts, tok_ends)
            if flags is not None:
                return flags
        m_starts, m_ends = self._align(text, [s for s in parsed.split(" ") if s])
        return word_start_flags(tok_starts, tok_ends, m_starts, m_ends, len(text))

    def _align(self, text: str, surfaces: list[str]):
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        kept = np.flatnonzero(~self.skipped[codepoints])
        lengths = np.fromiter(map(len, surfaces), dtype=np.int64, count=len(surfaces))
        ends = np.cumsum(lengths)
        if len(surfaces) == 0 or ends[-1] != len(kept):
            return _align_by_search(text, surfaces)
        return kept[ends - lengths], kept[ends - 1] + 1


def _align_by_search(text: str, surfaces: list[str]):
    """Slow path for text where MeCab skipped characters we did not expect: find each surface."""
    starts, pos = [], 0
    for s in surfaces:
        pos = text.find(s, pos)
        if pos < 0:
            raise ValueError(f"word {s!r} not found in the text; the segmenter changed the text")
        starts.append(pos)
        pos += len(s)
    starts = np.asarray(starts, dtype=np.int64)
    return starts, starts + np.fromiter(map(len, surfaces), dtype=np.int64, count=len(surfaces))


class SudachiSegmenter:
    """Words from SudachiPy (sudachidict_core, split mode C); whitespace morphemes are dropped."""

    name = "sudachi"

    def __init__(self, mode: str = "C"):
        try:
            from sudachipy import Dictionary, SplitMode
        except ImportError as err:
            raise ImportError("--word-boundaries sudachi needs `pip install sudachipy sudachidict-core`") from err
        self.tokenizer = Dictionary(dict="core").create(getattr(SplitMode, mode))

    def spans(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        starts, ends = [], []
        for offset, chunk in text_chunks(text):
            for m in self.tokenizer.tokenize(chunk):
                if not m.surface().isspace():
                    starts.append(offset + m.begin())
                    ends.append(offset + m.end())
        return np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)


def build_segmenter(name: str):
    """The segmenter called `name`, or None for "none"."""
    if name in ("none", "", None):
        return None
    if name == "unidic-lite":
        return MecabSegmenter()
    if name == "sudachi":
        return SudachiSegmenter()
    raise ValueError(f"unknown word segmenter {name!r}; choose one of {', '.join(SEGMENTERS)}")


def _morpheme_of_char(n_chars: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For each character, the index of the morpheme covering it, or -1."""
    owner = np.full(n_chars + 1, -1, dtype=np.int64)  # +1: a sentinel slot for empty tails
    lengths = ends - starts
    total = int(lengths.sum())
    if total:
        morph = np.repeat(np.arange(len(starts)), lengths)
        within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        owner[np.repeat(starts, lengths) + within] = morph
    return owner


def word_start_flags(tok_starts, tok_ends, morph_starts, morph_ends, n_chars: int) -> np.ndarray:
    """uint8 flag per token: 1 where the token starts a new word unit (see the module docstring)."""
    n_tok = len(tok_starts)
    if n_tok == 0:
        return np.zeros(0, dtype=np.uint8)
    owner = _morpheme_of_char(n_chars, np.asarray(morph_starts), np.asarray(morph_ends))
    s = np.minimum(np.asarray(tok_starts, dtype=np.int64), n_chars)
    # Empty spans (byte-fallback pieces before the one carrying the character) own the next character.
    e = np.maximum(np.asarray(tok_ends, dtype=np.int64), np.minimum(s + 1, n_chars))
    covered = owner[:n_chars] >= 0
    idx = np.arange(n_chars + 1)
    nxt = np.minimum.accumulate(np.where(np.append(covered, True), idx, n_chars)[::-1])[::-1]
    prv = np.maximum.accumulate(np.where(np.append(covered, False), idx, -1))
    first = np.where(nxt[s] < e, owner[nxt[s]], -1)
    last_pos = prv[np.maximum(e - 1, 0)]
    last = np.where((last_pos >= s) & (e > s), owner[np.maximum(last_pos, 0)], -1)
    flags = np.ones(n_tok, dtype=np.uint8)
    flags[1:] = (first[1:] < 0) | (first[1:] != last[:-1])
    return flags


def segmenter_flags(segmenter, text: str, tok_starts, tok_ends) -> np.ndarray:
    """Word-start flag per token of `text` (tokens given by their character spans)."""
    if hasattr(segmenter, "flags"):
        return segmenter.flags(text, tok_starts, tok_ends)
    m_starts, m_ends = segmenter.spans(text)
    return word_start_flags(tok_starts, tok_ends, m_starts, m_ends, len(text))


def segmenter_flags_all(segmenter, texts: list[str], spans: list) -> list[np.ndarray]:
    """segmenter_flags of each text, with the token spans [(starts, ends)] of each; MeCab parses
    every text first, then the flags are computed (one library at a time keeps its tables in cache)."""
    if isinstance(segmenter, MecabSegmenter):
        parsed = [segmenter.parse(t) for t in texts]
        return [segmenter.flags(t, s, e, p) for t, (s, e), p in zip(texts, spans, parsed)]
    return [segmenter_flags(segmenter, t, s, e) for t, (s, e) in zip(texts, spans)]


def token_word_flags(tokenizer, segmenter, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, word-start flags) of `text` with the given tokenizer and segmenter."""
    ids, starts, ends = tokenizer.encode_with_offsets(text)
    return ids, segmenter_flags(segmenter, text, starts, ends)
