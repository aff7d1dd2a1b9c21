"""JSQuAD: SQuAD v1.1 JSON, answer spans mapped through character offsets, EM and character F1.

Spans are mapped through the fast tokenizer's *character* offsets, never through token strings: a
SentencePiece piece may cross an answer boundary, and the byte tokens of one character all carry
that character's offsets, so both land on the tokens that overlap the answer. A window of the
context that does not hold the whole answer is labelled with the CLS position, as in transformers'
run_qa. Predictions are context[start of first token : end of last token].

Scores are JGLUE's: exact match and F1 over characters, after lower-casing and removing whitespace
and ASCII punctuation (English articles are not removed: the text is Japanese).
"""

from __future__ import annotations

import collections
import string
from dataclasses import dataclass

import numpy as np

from megatron_jp.eval.records import EvalInputError, check_unique, read_json

MAX_ANSWER_CHARS = 100
N_BEST = 20


@dataclass
class QAExample:
    """One question on one context."""

    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]
    """(text, character start) of every gold answer; the first is the training target."""
    where: str = ""
    """FILE: data[i].paragraphs[j].qas[k], for messages."""

    @property
    def label(self) -> list[str]:
        return [text for text, _ in self.answers]


def read_squad(path: str) -> list[QAExample]:
    """Every question of a SQuAD v1.1 file, each answer checked against its context."""
    data = read_json(path, "SQuAD v1.1 JSON")
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise EvalInputError(f"{path}: expected SQuAD v1.1 JSON, an object with a 'data' list of articles")
    examples = []
    for i, article in enumerate(articles):
        for j, paragraph in enumerate(_items(article, "paragraphs", f"{path}: data[{i}]")):
            where = f"{path}: data[{i}].paragraphs[{j}]"
            context = _string(paragraph, "context", where)
            for k, qa in enumerate(_items(paragraph, "qas", where)):
                examples.append(_qa(qa, context, f"{where}.qas[{k}]"))
    if not examples:
        raise EvalInputError(f"{path}: no question found; expected data[].paragraphs[].qas[]")
    check_unique(((e.id, e.where) for e in examples), "question")
    return examples


def _items(parent, key: str, where: str) -> list:
    items = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(items, list):
        raise EvalInputError(f"{where}: missing list {key!r}")
    return items


def _string(parent, key: str, where: str) -> str:
    value = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise EvalInputError(f"{where}: missing or empty string {key!r}")
    return value


def _qa(qa, context: str, where: str) -> QAExample:
    question = _string(qa, "question", where)
    ident = str(qa["id"]) if isinstance(qa, dict) and "id" in qa else where
    answers = []
    for a, answer in enumerate(_items(qa, "answers", where)):
        text = _string(answer, "text", f"{where}.answers[{a}]")
        start = answer.get("answer_start")
        if not isinstance(start, int) or isinstance(start, bool):
            raise EvalInputError(f"{where}.answers[{a}]: answer_start must be an integer character offset")
        found = context[start:start + len(text)] if start >= 0 else ""
        if found != text:
            raise EvalInputError(f"{where}.answers[{a}]: answer {text!r} is not in the context at answer_start "
                                 f"{start} (the context has {found!r} there); fix answer_start or the text")
        answers.append((text, start))
    if not answers:
        raise EvalInputError(f"{where}: no answer; SQuAD v1.1 questions need at least one")
    return QAExample(ident, question, context, answers, where)


# ----------------------------------------------------------------------------- features


@dataclass
class QAFeature:
    """One window of a context with its question: what the model sees."""

    example: int
    """Index of the QAExample."""
    input_ids: list[int]
    token_type_ids: list[int]
    offsets: list[tuple[int, int] | None]
    """Character span in the context of each token; None for question and special tokens."""
    start: int = 0
    """Gold start token (training), 0 (the CLS position) when the window misses the answer."""
    end: int = 0


def doc_stride(max_length: int, question_tokens: int) -> int:
    """Overlap of consecutive windows: run_qa's 128, at most half of what a window leaves the context."""
    room = max_length - question_tokens - 3  # [CLS] question [SEP] context [SEP]
    if room < 2:
        raise ValueError(f"max length {max_length} leaves no room for the context after the question")
    return min(128, room // 2)


def qa_features(examples: list[QAExample], tokenizer, max_length: int) -> list[QAFeature]:
    """Question + context windows of at most max_length tokens, the question cut to half of them."""
    features = []
    for index, ex in enumerate(examples):
        question, question_tokens = _cut_question(tokenizer, ex.question, max_length // 2)
        enc = tokenizer(question, ex.context, truncation="only_second", max_length=max_length,
                        stride=doc_stride(max_length, question_tokens), return_overflowing_tokens=True,
                        return_offsets_mapping=True, return_token_type_ids=True)
        for w in range(len(enc["input_ids"])):
            sequence = enc.sequence_ids(w)
            offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][w], sequence)]
            feature = QAFeature(index, enc["input_ids"][w], enc["token_type_ids"][w], offsets)
            text, char_start = ex.answers[0]
            feature.start, feature.end = answer_tokens(offsets, char_start, char_start + len(text))
            features.append(feature)
    return features


def _cut_question(tokenizer, question: str, max_tokens: int) -> tuple[str, int]:
    """The question cut at a character boundary to about max_tokens, and its token count."""
    offsets = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) > max_tokens:
        question = question[:offsets[max_tokens - 1][1]]
        offsets = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return question, len(offsets)


def answer_tokens(offsets: list, char_start: int, char_end: int) -> tuple[int, int]:
    """(first, last) token overlapping [char_start, char_end) when the window holds the whole answer,
    else (0, 0): the CLS position, as run_qa labels windows without the answer."""
    inside = [i for i, o in enumerate(offsets) if o is not None]
    if not inside or offsets[inside[0]][0] > char_start or offsets[inside[-1]][1] < char_end:
        return 0, 0
    first = next(i for i in inside if offsets[i][1] > char_start)
    last = next(i for i in reversed(inside) if offsets[i][0] < char_end)
    return first, last


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, offsets: list,
              max_chars: int = MAX_ANSWER_CHARS) -> tuple[float, tuple[int, int] | None]:
    """(score, (char start, char end)) of the best valid span of one window (None when it has none)."""
    best, span = -np.inf, None
    starts = np.argsort(start_logits)[::-1][:N_BEST]
    ends = np.argsort(end_logits)[::-1][:N_BEST]
    for s in starts:
        for e in ends:
            if offsets[s] is None or offsets[e] is None or e < s:
                continue
            a, b = offsets[s][0], offsets[e][1]
            score = float(start_logits[s] + end_logits[e])
            if b - a <= max_chars and score > best:
                best, span = score, (a, b)
    return best, span


def predict_answers(examples: list[QAExample], features: list[QAFeature], start_logits, end_logits) -> list[str]:
    """The best span over every window of each example ("" when no window has a valid span)."""
    best = [(-np.inf, "")] * len(examples)
    for f, s, e in zip(features, start_logits, end_logits):
        n = len(f.input_ids)
        score, span = best_span(np.asarray(s[:n]), np.asarray(e[:n]), f.offsets)
        if span is not None and score > best[f.example][0]:
            best[f.example] = (score, examples[f.example].context[span[0]:span[1]])
    return [text for _, text in best]


# ----------------------------------------------------------------------------- scores


def normalize_answer(text: str) -> str:
    text = text.lower()
    return "".join(c for c in text if not c.isspace() and c not in string.punctuation)


def char_f1(prediction: str, gold: str) -> float:
    p, g = list(normalize_answer(prediction)), list(normalize_answer(gold))
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: list[str], golds: list[list[str]]) -> dict:
    """Exact match and character F1 (fractions, as every metric here), each the best over the gold answers."""
    em = [max(float(normalize_answer(p) == normalize_answer(g)) for g in gs) for p, gs in zip(predictions, golds)]
    f1 = [max(char_f1(p, g) for g in gs) for p, gs in zip(predictions, golds)]
    return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1))}
