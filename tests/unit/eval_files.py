"""Shared helpers of the evaluation tests (no tests here): tiny task files in each JGLUE format, written
with Japanese text and full-width characters, and the recomputation of every metric from
predictions.jsonl with scipy / scikit-learn, independently of megatron_jp.eval."""

from __future__ import annotations

import collections
import json
import math
import string
from pathlib import Path

SENTENCES = ["猫が窓辺で眠っている。", "東京タワーは３３３ｍです。", "今日は雨が降りそうだ。", "ＡＩの研究が進んでいる。",
             "子どもたちが公園で遊ぶ。", "駅前に新しいパン屋ができた。", "彼は毎朝コーヒーを飲む。", "山の上から海が見える。"]
CONTEXT = ("梅雨 [SEP] 梅雨（つゆ、ばいう）は、北海道と小笠原諸島を除く日本で見られる雨季のことで、"
           "ＡＢＣ地方では５月から７月にかけて続く。")
QUESTIONS = [("梅雨はどこで見られる？", "日本"), ("ＡＢＣ地方で梅雨はいつ続く？", "５月から７月"),
             ("梅雨がないのはどこ？", "北海道と小笠原諸島"), ("梅雨の別の読み方は？", "ばいう")]
N = 16
FILES = {"marc_ja": "marc_ja.jsonl", "jsts": "jsts.jsonl", "jnli": "jnli.jsonl", "jcola": "jcola.jsonl",
         "jcommonsenseqa": "jcommonsenseqa.jsonl", "jsquad": "jsquad.json"}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def task_records(task: str, n: int = N) -> list[dict] | dict:
    s = SENTENCES
    if task == "marc_ja":
        return [{"review_id": f"R{i}", "sentence": s[i % 8] + ("とても良い商品でした！" if i % 2 else "二度と買わない。"),
                 "label": "positive" if i % 2 else "negative"} for i in range(n)]
    if task == "jsts":
        return [{"sentence_pair_id": str(i), "yjcaptions_id": f"{i}-{i}", "sentence1": s[i % 8],
                 "sentence2": s[(i * 3) % 8], "label": round((i * 0.37) % 5.0, 2)} for i in range(n)]
    if task == "jnli":
        return [{"sentence_pair_id": str(i), "yjcaptions_id": f"{i}", "sentence1": s[i % 8],
                 "sentence2": s[(i + 1) % 8], "label": ("entailment", "contradiction", "neutral")[i % 3]}
                for i in range(n)]
    if task == "jcola":
        return [{"uid": 100 + i, "source": "test", "label": i % 2, "diacritic": "g", "sentence": s[i % 8]}
                for i in range(n)]
    if task == "jcommonsenseqa":
        return [{"q_id": i, "question": s[i % 8] + "これは何？",
                 **{f"choice{c}": s[(i + c) % 8][:5] for c in range(5)}, "label": i % 5} for i in range(n)]
    if task == "jsquad":
        qas = [{"id": f"q{i}", "question": q, "is_impossible": False,
                "answers": [{"text": a, "answer_start": CONTEXT.index(a)}]}
               for i, (q, a) in enumerate(QUESTIONS * (n // len(QUESTIONS)))]
        return {"version": "v1.0", "data": [{"title": "梅雨", "paragraphs": [{"context": CONTEXT, "qas": qas}]}]}
    raise KeyError(task)


def write_task(folder: Path, task: str, n: int = N) -> Path:
    path = folder / FILES[task]
    records = task_records(task, n)
    if task == "jsquad":
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        return path
    return write_jsonl(path, records)


def write_retrieval(folder: Path) -> tuple[Path, Path, Path]:
    """10 documents (every rank is scored), 4 queries, graded qrels in BEIR TSV with a header."""
    docs = [{"_id": f"d{i}", "title": "", "text": SENTENCES[i % 8] + ("雨の日の話。" if i >= 8 else "")}
            for i in range(10)]
    queries = [{"_id": f"q{i}", "text": SENTENCES[i][:6]} for i in range(4)]
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(4)) + "q0\td8\t2\nq2\td9\t1\n"
    (folder / "qrels.tsv").write_text(qrels, encoding="utf-8")
    return write_jsonl(folder / "queries.jsonl", queries), write_jsonl(folder / "corpus.jsonl", docs), folder / "qrels.tsv"


def predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- independent metrics


def _norm(text: str) -> str:
    return "".join(c for c in text.lower() if not c.isspace() and c not in string.punctuation)


def _f1(p: str, g: str) -> float:
    common = sum((collections.Counter(_norm(p)) & collections.Counter(_norm(g))).values())
    if not common:
        return 0.0
    precision, recall = common / len(_norm(p)), common / len(_norm(g))
    return 2 * precision * recall / (precision + recall)


def recompute_task(task: str, rows: list[dict]) -> dict:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, matthews_corrcoef

    pred, gold = [r["prediction"] for r in rows], [r["gold"] for r in rows]
    if task == "jsts":
        return {"pearson": pearsonr(pred, gold)[0], "spearman": spearmanr(pred, gold)[0]}
    if task == "jsquad":
        return {"exact_match": sum(max(_norm(p) == _norm(g) for g in gs) for p, gs in zip(pred, gold)) / len(rows),
                "f1": sum(max(_f1(p, g) for g in gs) for p, gs in zip(pred, gold)) / len(rows)}
    out = {"accuracy": accuracy_score(gold, pred)}
    if task == "jcola":
        out["mcc"] = matthews_corrcoef(gold, pred)
    return out


def recompute_retrieval(rows: list[dict], ks: list[int]) -> dict:
    """Recall@k and MRR@10 by hand, nDCG@10 with scikit-learn on the full ranking (the corpus is 10 documents)."""
    import numpy as np
    from sklearn.metrics import ndcg_score

    out = {f"recall@{k}": np.mean([len(set(r["prediction"][:k]) & set(r["gold"])) / len(r["gold"]) for r in rows])
           for k in ks}
    out["mrr@10"] = np.mean([next((1 / (i + 1) for i, d in enumerate(r["prediction"][:10]) if d in r["gold"]), 0.0)
                             for r in rows])
    ndcg = []
    for r in rows:
        docs = sorted(r["prediction"])
        true = np.array([[r["gold"].get(d, 0.0) for d in docs]])
        score = np.array([[r["scores"][r["prediction"].index(d)] for d in docs]])
        ndcg.append(ndcg_score(true, score, k=10))
    out["ndcg@10"] = np.mean(ndcg)
    return out


def recompute_pppl(rows: list[dict]) -> float:
    rows = [r for r in rows if r.get("kind") == "pppl"]
    return math.exp(-sum(r["log_likelihood"] for r in rows) / sum(r["tokens"] for r in rows))
