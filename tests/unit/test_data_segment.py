"""Word boundaries: morpheme spans, and word-start flags for pieces and bytes."""

import importlib.util

import numpy as np
import pytest

from megatron_jp.data.segment import (MecabSegmenter, build_segmenter, text_chunks, token_word_flags,
                                      word_start_flags)
from megatron_jp.data.tokenizers import ByteTokenizer


def words_of(ids, flags, decode):
    cuts = np.flatnonzero(flags).tolist() + [len(ids)]
    return [decode(ids[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


@pytest.fixture(scope="module")
def mecab():
    return MecabSegmenter()


def test_mecab_spans_reproduce_the_words_and_skip_whitespace(mecab):
    text = "吾輩は猫である。\n東京  に Hello world"
    starts, ends = mecab.spans(text)
    assert [text[a:b] for a, b in zip(starts, ends)] == \
        ["吾輩", "は", "猫", "で", "ある", "。", "東京", "に", "Hello", "world"]


def test_mecab_spans_survive_long_lines_and_odd_whitespace(mecab):
    text = ("今日は晴れ。" * 1500) + "\r\n\x0b\u3000終わり"
    starts, ends = mecab.spans(text)
    assert (np.diff(starts) > 0).all() and ends[-1] == len(text)
    joined = "".join(text[a:b] for a, b in zip(starts, ends))
    assert joined == "".join(c for c in text if c not in "\r\n\x0b")  # \r at a line end is skipped too


def test_text_chunks_cover_the_text_in_order():
    text = "あ。" * 5000 + "\n" + "x" * 9000
    chunks = list(text_chunks(text, 4096))
    assert "".join(c for _, c in chunks) == text
    assert all(len(c) <= 4096 for _, c in chunks)
    assert all(text[o:o + len(c)] == c for o, c in chunks)


def test_token_crossing_morphemes_merges_them_into_one_unit():
    # morphemes: 東京 | 都 | に ; tokens: 東 | 京都 | に -> 東京都 is one unit (京都 spans both)
    flags = word_start_flags(np.array([0, 1, 3]), np.array([1, 3, 4]), np.array([0, 2, 3]), np.array([2, 3, 4]), 4)
    assert flags.tolist() == [1, 0, 1]


def test_whitespace_only_token_is_its_own_unit():
    # text "ab cd", morphemes ab, cd; tokens: a | b | ' ' | cd
    flags = word_start_flags(np.array([0, 1, 2, 3]), np.array([1, 2, 3, 5]), np.array([0, 3]), np.array([2, 5]), 5)
    assert flags.tolist() == [1, 0, 1, 1]


def test_empty_spans_of_byte_fallback_pieces_stay_with_their_character():
    # SentencePiece gives byte pieces of one character spans (0,0),(0,0),(0,1)
    flags = word_start_flags(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 2]), np.array([0, 1]), np.array([1, 2]), 2)
    assert flags.tolist() == [1, 0, 0, 1]


def test_byte_tokens_of_multibyte_characters_form_whole_words(mecab):
    tok = ByteTokenizer()
    ids, flags = token_word_flags(tok, mecab, "猫が東京へ行く😀")
    assert words_of(ids, flags, tok.decode) == ["猫", "が", "東京", "へ", "行く", "😀"]


def test_sentencepiece_tokens_get_word_flags(mecab, tmp_path):
    from megatron_jp.data.tokenizers import SentencePieceTokenizer
    from test_data_helpers import train_spm

    tok = SentencePieceTokenizer(train_spm(tmp_path))
    text = "自然言語処理は人間の言葉を扱う技術である。"
    ids, flags = token_word_flags(tok, mecab, text)
    words = words_of(ids, flags, tok.decode)
    assert "".join(words) == text and flags[0] == 1 and len(words) >= 8
    starts, ends = mecab.spans(text)
    morph_starts = set(starts.tolist())
    _, t_starts, _ = tok.encode_with_offsets(text)
    for i in np.flatnonzero(flags):  # every word start sits on a morpheme start
        assert int(t_starts[i]) in morph_starts


def test_build_segmenter_none_and_unknown():
    assert build_segmenter("none") is None
    with pytest.raises(ValueError, match="juman"):
        build_segmenter("juman")


@pytest.mark.skipif(importlib.util.find_spec("sudachipy") is None, reason="sudachipy not installed")
def test_sudachi_spans_use_long_units_and_drop_spaces():
    seg = build_segmenter("sudachi")
    text = "東京都千代田区の  空白"
    starts, ends = seg.spans(text)
    assert [text[a:b] for a, b in zip(starts, ends)] == ["東京都千代田区", "の", "空白"]


@pytest.mark.skipif(importlib.util.find_spec("megatron_jp._helpers") is None, reason="_helpers not built")
def test_cpp_word_flags_equal_the_numpy_reference(mecab):
    from test_data_helpers import sample_lines

    rng = np.random.default_rng(0)
    lines = sample_lines()
    texts = ["", " ", "a\n\n b", "猫\tが　東京 へ\n", "😀 x " * 3] + lines[:40]
    texts += ["".join(rng.choice(lines, 3)).replace("。", rng.choice([" ", "\n", "。 "])) for _ in range(20)]
    tok = ByteTokenizer()
    for text in texts:
        _, starts, ends = tok.encode_with_offsets(text)
        m_starts, m_ends = mecab.spans(text)
        want = word_start_flags(starts, ends, m_starts, m_ends, len(text))
        assert mecab.flags(text, starts, ends).tolist() == want.tolist(), text


def test_cpp_word_flags_hand_back_text_that_mecab_did_not_cover():
    _helpers = pytest.importorskip("megatron_jp._helpers")
    assert _helpers.wakati_word_flags("abc", "ab", np.arange(3), np.arange(1, 4)) is None
    assert _helpers.wakati_word_flags("a b", "a b", np.arange(3), np.arange(1, 4)).tolist() == [1, 1, 1]
