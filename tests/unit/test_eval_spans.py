"""JSQuAD answer spans go through character offsets: right for SentencePiece pieces (which may cross
an answer boundary and normalise full-width characters) and for byte tokens (several per character)."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from eval_files import CONTEXT, QUESTIONS
from megatron_jp.data.tokenizers import save_hf_tokenizer
from megatron_jp.eval import squad
from test_data_helpers import train_spm


@pytest.fixture(scope="module", params=["sentencepiece", "bytes"])
def tokenizer(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    source = train_spm(folder) if request.param == "sentencepiece" else "ByteTokenizer"
    save_hf_tokenizer(source, str(folder / "hf"))
    return request.param, AutoTokenizer.from_pretrained(str(folder / "hf"))


def examples():
    return [squad.QAExample(f"q{i}", q, CONTEXT, [(a, CONTEXT.index(a))]) for i, (q, a) in enumerate(QUESTIONS)]


# A short window still fits the longest answer (9 characters: 27 byte tokens) beside a cut question.
SHORT = {"sentencepiece": 40, "bytes": 100}


@pytest.mark.parametrize("short", [False, True], ids=["one-window", "several-windows"])
def test_gold_tokens_cover_the_answer_and_nothing_beyond_their_own_characters(tokenizer, short):
    name, tok = tokenizer
    exs = examples()
    max_length = SHORT[name] if short else 384
    features = squad.qa_features(exs, tok, max_length)
    assert len(features) > len(exs) if short else len(features) == len(exs)
    assert all(len(f.input_ids) <= max_length for f in features)
    for i, ex in enumerate(exs):
        text, start = ex.answers[0]
        end = start + len(text)
        mine = [f for f in features if f.example == i]
        labelled = [f for f in mine if f.start > 0]
        assert labelled, f"{name}: no window of {len(mine)} holds {text!r}"
        for f in labelled:
            a, b = f.offsets[f.start][0], f.offsets[f.end][1]
            assert a <= start and b >= end  # the whole answer is covered
            assert f.offsets[f.start][1] > start and f.offsets[f.end][0] < end  # by tokens that overlap it
            if name == "bytes":  # a byte token carries exactly its character: no excess
                assert CONTEXT[a:b] == text
        for f in mine:
            if f.start == 0:  # a window without the whole answer points at CLS
                inside = [o for o in f.offsets if o is not None]
                assert (inside[0][0] > start or inside[-1][1] < end) and f.end == 0


def test_full_width_answers_map_to_the_original_characters_under_nfkc(tokenizer):
    name, tok = tokenizer
    ex = examples()[1]  # ＡＢＣ地方で梅雨はいつ続く？ -> ５月から７月 (NFKC would make them ASCII)
    (f,) = [f for f in squad.qa_features([ex], tok, 384)]
    covered = CONTEXT[f.offsets[f.start][0]:f.offsets[f.end][1]]
    assert "５月から７月" in covered and len(covered) <= len("５月から７月") + 2


def test_logits_peaked_at_the_gold_tokens_predict_the_gold_span(tokenizer):
    name, tok = tokenizer
    exs = examples()
    features = squad.qa_features(exs, tok, SHORT[name])
    starts, ends = [], []
    for f in features:
        s, e = np.full(len(f.input_ids), -5.0), np.full(len(f.input_ids), -5.0)
        if f.start > 0:
            s[f.start], e[f.end] = 5.0, 5.0
        starts.append(s), ends.append(e)
    predicted = squad.predict_answers(exs, features, starts, ends)
    for ex, p in zip(exs, predicted):
        gold = ex.answers[0][0]
        assert p == gold if name == "bytes" else gold in p
    assert squad.squad_metrics(predicted, [ex.label for ex in exs])["f1"] > (0.999 if name == "bytes" else 0.8)
