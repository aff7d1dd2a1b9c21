"""Tokenizers: the factory, byte offsets, and the Hugging Face export matching SentencePiece ids."""

import os

import numpy as np
import pytest

from megatron_jp.data.tokenizers import (ByteTokenizer, HuggingFaceTokenizer, SentencePieceTokenizer, TokenizerError,
                                         build_tokenizer, save_hf_tokenizer)
from test_data_helpers import sample_lines, train_spm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIED = [
    "吾輩は猫である。名前はまだ無い。", "東京都千代田区丸の内1丁目9番2号", "BERT は Google が 2018 年に発表した。",
    "  leading and trailing  ", "a\u3000b\tc\n\nd", "１２３４５ 67890 ｶﾀｶﾅ ㍿ ① é e\u0301",
    "未知の文字: 鬱蒼 龘 🤖🤖 𠮷", "Hello,World!!  100% test@example.com", "", " ", "\n", "3.14159265358979",
    "改行\r\nと\tタブと\u00a0ノーブレーク", "ＡＢＣabcＡＢＣ　全角スペース", "😀" * 5 + "x" * 40,
]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm"))


def test_train_tokenizer_writes_model_and_hf_folder_with_special_ids(spm_model):
    tok = SentencePieceTokenizer(spm_model)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    hf_dir = spm_model[:-len(".model")] + "-hf"
    assert sorted(os.listdir(hf_dir)) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


def test_sentencepiece_splits_digits_and_keeps_whitespace(spm_model):
    tok = SentencePieceTokenizer(spm_model)
    pieces = [tok.sp.id_to_piece(int(i)) for i in tok.encode("2024年  x")]
    assert pieces[:4] == ["2", "0", "2", "4"]
    assert tok.decode(tok.encode("a  b\tc")) == "a  b\tc"


def test_hf_export_gives_the_same_ids_as_sentencepiece(spm_model):
    from transformers import AutoTokenizer

    sp = SentencePieceTokenizer(spm_model)
    hf = AutoTokenizer.from_pretrained(spm_model[:-len(".model")] + "-hf")
    for text in VARIED + sample_lines():
        assert hf(text, add_special_tokens=False)["input_ids"] == sp.encode(text).tolist(), text
    assert hf("猫")["input_ids"] == [sp.cls_id, *sp.encode("猫").tolist(), sp.sep_id]
    assert (hf.cls_token, hf.sep_token, hf.mask_token, hf.pad_token, hf.unk_token) == (
        "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]")


def test_hf_export_config_names_pretrained_tokenizer_fast(spm_model):
    import json

    with open(os.path.join(spm_model[:-len(".model")] + "-hf", "tokenizer_config.json")) as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_byte_tokenizer_hf_export_matches_and_roundtrips(tmp_path):
    from transformers import AutoTokenizer

    tok = ByteTokenizer()
    save_hf_tokenizer(tok, str(tmp_path / "byte"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "byte"))
    for text in VARIED:
        ids = tok.encode(text).tolist()
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == text == tok.decode(ids)


def test_byte_offsets_map_each_byte_to_its_character():
    ids, starts, ends = ByteTokenizer().encode_with_offsets("猫a😀")
    assert len(ids) == 3 + 1 + 4
    assert starts.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert (ends - starts).tolist() == [1] * 8


def test_sentencepiece_offsets_are_character_offsets(spm_model):
    tok = SentencePieceTokenizer(spm_model)
    text = "東京で𠮷野家と😀"
    ids, starts, ends = tok.encode_with_offsets(text)
    assert len(ids) == len(tok.encode(text))
    assert ends.max() == len(text) and (np.diff(ends) >= 0).all()


def test_hugging_face_folder_loads_with_specials_and_offsets(spm_model):
    tok = build_tokenizer("HuggingFaceTokenizer", spm_model[:-len(".model")] + "-hf")
    assert isinstance(tok, HuggingFaceTokenizer)
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id) == (2, 3, 4, 0)
    ids, starts, ends = tok.encode_with_offsets("猫が好き")
    assert ids.tolist() == SentencePieceTokenizer(spm_model).encode("猫が好き").tolist()
    assert starts[0] == 0 and ends[-1] == 4


def test_save_hf_tokenizer_accepts_a_model_path(spm_model, tmp_path):
    out = save_hf_tokenizer(spm_model, str(tmp_path / "export"))
    assert build_tokenizer("HuggingFaceTokenizer", out).encode("日本語").tolist() == \
        SentencePieceTokenizer(spm_model).encode("日本語").tolist()


def test_special_ids_cover_cls_sep_mask_pad():
    tok = ByteTokenizer()
    assert {tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id} <= set(tok.special_ids.tolist())
    assert tok.vocab_size == 261


@pytest.mark.parametrize("kind, model, needle", [
    ("WordPieceTokenizer", "x", "WordPieceTokenizer"),
    ("SentencePieceTokenizer", "/nonexistent/spm.model", "/nonexistent/spm.model"),
    ("HuggingFaceTokenizer", "/nonexistent/folder", "/nonexistent/folder"),
    ("SentencePieceTokenizer", "", "needs a model path"),
])
def test_build_tokenizer_names_the_bad_type_or_path(kind, model, needle):
    with pytest.raises(TokenizerError, match=needle):
        build_tokenizer(kind, model)


def test_build_tokenizer_rejects_a_file_that_is_not_a_model(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="bad.model"):
        build_tokenizer("SentencePieceTokenizer", str(bad))


@pytest.mark.parametrize("helper", ["cpp", "numpy"])
def test_fast_offsets_equal_sentencepiece_offset_mapping(spm_model, helper, monkeypatch):
    from megatron_jp.data import tokenizers

    if helper == "numpy":
        monkeypatch.setattr(tokenizers, "_helpers", None)
    elif tokenizers._helpers is None:
        pytest.skip("megatron_jp._helpers not built")
    tok = SentencePieceTokenizer(spm_model)
    for text in VARIED + ["㍻ｶﾞ漢字 ﾊﾟﾊﾟ", "x\u2581y  z", "鬱" * 30] + sample_lines()[:50]:
        want = tok.sp.encode_as_offset_mapping(text)
        ids, starts, ends = tok.encode_with_offsets(text)
        assert ids.tolist() == want["ids"]
        assert list(zip(starts.tolist(), ends.tolist())) == [tuple(o) for o in want["offsets"]], text
