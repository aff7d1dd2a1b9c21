"""Evaluation inputs: every JGLUE format is read, bad input is refused with FILE:LINE and what was
expected, and the metric helpers agree with scipy / scikit-learn (no model involved)."""

import json

import numpy as np
import pytest
import torch

from eval_files import FILES, task_records, write_jsonl, write_task
from megatron_jp.eval import embed, squad
from megatron_jp.eval.intrinsic import alignment_uniformity, read_probes
from megatron_jp.eval.records import EvalInputError
from megatron_jp.eval.tasks import TASKS, read_examples, task_spec


@pytest.mark.parametrize("task", list(FILES))
def test_each_task_file_in_its_jglue_format_is_read_whole(task, tmp_path):
    examples = read_examples(task_spec(task), str(write_task(tmp_path, task)))
    assert len(examples) == 16
    first = examples[0]
    if task == "jsquad":
        text, start = first.answers[0]
        assert first.context[start:start + len(text)] == text and first.id == "q0"
    elif task == "jcommonsenseqa":
        assert len(first.texts) == 6 and first.label == 0 and first.id == "0"
    else:
        assert first.label in TASKS[task].labels or task == "jsts"


def _refusal(tmp_path, task, records, raw=None):
    path = tmp_path / FILES[task]
    if raw is not None:
        path.write_text(raw, encoding="utf-8")
    else:
        write_jsonl(path, records)
    with pytest.raises(EvalInputError) as err:
        read_examples(task_spec(task), str(path))
    return str(path), str(err.value)


def _with(task, line, **changes):
    records = task_records(task, 4)
    records[line - 1] = {k: v for k, v in {**records[line - 1], **changes}.items() if v is not None}
    return records


@pytest.mark.parametrize("task, line, changes, expected", [
    ("marc_ja", 2, {"sentence": None}, "missing field 'sentence'"),
    ("marc_ja", 3, {"label": "neutral"}, "expected one of positive / negative"),
    ("jnli", 1, {"label": "entails"}, "expected one of entailment / contradiction / neutral"),
    ("jsts", 4, {"label": 5.5}, "expected a number in [0, 5]"),
    ("jsts", 2, {"label": "high"}, "expected a number in [0, 5]"),
    ("jcola", 2, {"label": 2}, "expected one of 0 / 1"),
    ("jcola", 3, {"label": True}, "expected one of 0 / 1"),
    ("jcommonsenseqa", 1, {"choice4": None}, "missing field 'choice4'"),
    ("jcommonsenseqa", 2, {"label": 5}, "expected one of 0 / 1 / 2 / 3 / 4"),
    ("jsts", 3, {"sentence2": "  "}, "field 'sentence2' is empty"),
])
def test_a_bad_example_is_refused_with_its_file_line_and_what_was_expected(tmp_path, task, line, changes, expected):
    path, message = _refusal(tmp_path, task, _with(task, line, **changes))
    assert f"{path}:{line}:" in message and expected in message


def test_an_empty_file_and_a_broken_json_line_are_refused(tmp_path):
    path, message = _refusal(tmp_path, "jnli", None, raw="\n\n")
    assert path in message and "empty" in message
    path, message = _refusal(tmp_path, "jnli", None, raw=json.dumps(task_records("jnli", 1)[0]) + "\n{oops\n")
    assert f"{path}:2:" in message and "not valid JSON" in message


def test_a_repeated_id_names_both_lines(tmp_path):
    records = task_records("marc_ja", 3)
    records[2]["review_id"] = records[0]["review_id"]
    path, message = _refusal(tmp_path, "marc_ja", records)
    assert f"{path}:3:" in message and f"{path}:1" in message


def test_a_jsquad_answer_that_is_not_in_its_context_is_refused_with_its_json_path(tmp_path):
    data = task_records("jsquad", 4)
    data["data"][0]["paragraphs"][0]["qas"][2]["answers"][0]["answer_start"] += 1
    path = tmp_path / "jsquad.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(EvalInputError, match=r"data\[0\]\.paragraphs\[0\]\.qas\[2\]\.answers\[0\]: answer '北海道と小笠原諸島' "
                                             r"is not in the context at answer_start"):
        read_examples(task_spec("jsquad"), str(path))
    path.write_text('{"version": "v1.0", "data": []}', encoding="utf-8")
    with pytest.raises(EvalInputError, match="no question found"):
        read_examples(task_spec("jsquad"), str(path))


def test_qrels_naming_an_unknown_document_is_refused_with_its_line(tmp_path):
    path = tmp_path / "qrels.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n", encoding="utf-8")
    with pytest.raises(EvalInputError, match=rf"{path}:3: corpus id 'd9' is not in the corpus file"):
        embed.read_qrels(str(path), {"q1"}, {"d1"})
    path.write_text("q1 0 d1 2\n", encoding="utf-8")  # TREC qrels
    assert embed.read_qrels(str(path), {"q1"}, {"d1"}) == {"q1": {"d1": 2.0}}


def test_a_probe_needs_exactly_one_mask(tmp_path):
    path = write_jsonl(tmp_path / "probes.jsonl", [{"text": "東京[MASK]。"}, {"text": "[MASK]と[MASK]"}])
    with pytest.raises(EvalInputError, match=rf"{path}:2: 'text' must hold exactly one \[MASK\] \(found 2\)"):
        read_probes(str(path))


# ----------------------------------------------------------------------------- metrics


def test_retrieval_metrics_match_scikit_learn_ndcg_and_the_definitions():
    from sklearn.metrics import ndcg_score

    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(12)]
    ranked, qrels, expected = {}, {}, []
    for q in range(6):
        scores = rng.random(len(docs))
        ranked[q] = [docs[i] for i in np.argsort(-scores)]
        qrels[q] = {docs[i]: float(rng.integers(1, 3)) for i in rng.choice(12, size=3, replace=False)}
        true = np.array([[qrels[q].get(d, 0.0) for d in docs]])
        expected.append(ndcg_score(true, scores[None], k=10))
    metrics = embed.retrieval_metrics(ranked, qrels, [1, 5])
    assert metrics["ndcg@10"] == pytest.approx(np.mean(expected), abs=1e-12)
    first = [next((1 / (i + 1) for i, d in enumerate(ranked[q][:10]) if d in qrels[q]), 0.0) for q in qrels]
    assert metrics["mrr@10"] == pytest.approx(np.mean(first), abs=1e-12)
    assert metrics["recall@5"] == pytest.approx(np.mean([len(set(ranked[q][:5]) & set(qrels[q])) / 3 for q in qrels]))


def test_brute_force_ranking_in_chunks_equals_a_full_sort(monkeypatch):
    monkeypatch.setattr(embed, "CORPUS_CHUNK", 7)  # several chunks, merged top-k
    gen = torch.Generator().manual_seed(1)
    q, c = torch.randn(5, 16, generator=gen), torch.randn(30, 16, generator=gen)
    scores, index = embed.rank(q, c, top=10, device="cpu", batch_size=2)
    full = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(c, dim=-1).T
    assert torch.equal(index, full.topk(10, dim=1).indices)
    torch.testing.assert_close(scores, full.topk(10, dim=1).values)


def test_alignment_and_uniformity_follow_simcse_definitions():
    from scipy.spatial.distance import pdist

    x = torch.randn(9, 8, generator=torch.Generator().manual_seed(2))
    pairs = [(0, 1), (2, 5), (7, 8)]
    metrics = alignment_uniformity(x, pairs)
    unit = x.double().numpy()
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    assert metrics["uniformity"] == pytest.approx(np.log(np.mean(np.exp(-2 * pdist(unit, "sqeuclidean")))), abs=1e-9)
    alignment = np.mean([np.sum((unit[a] - unit[b]) ** 2) for a, b in pairs])
    assert metrics["alignment"] == pytest.approx(alignment, abs=1e-9)


def test_jsquad_scores_are_character_level_and_ignore_spaces_and_ascii_punctuation():
    golds = [["５月から７月"], ["北海道", "北海道と小笠原諸島"]]
    metrics = squad.squad_metrics(["５月から７月", "北海道と 小笠原"], golds)
    assert metrics["exact_match"] == pytest.approx(0.5)
    # second: best over the golds; "北海道と小笠原" vs "北海道と小笠原諸島": 7 common, P = 1, R = 7/9
    assert metrics["f1"] == pytest.approx((1.0 + 2 * (7 / 9) / (1 + 7 / 9)) / 2)
