"""Sentence embeddings without fine-tuning: zero-shot STS and brute-force retrieval.

An embedding is the mean of the last hidden states over the tokens the attention mask keeps (CLS and
SEP included) or the first token's state (`cls`), exactly what the exported sentence-transformers
folder computes (export-sentence-transformers), so JMTEB/mteb scores of that folder and these agree.
Retrieval ranks the corpus by cosine similarity, query batch by corpus chunk, on the model's device.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megatron_jp.eval.records import EvalInputError, check_unique, read_jsonl, record_id, text_field

POOLINGS = ("mean", "cls")
CORPUS_CHUNK = 16384


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


@torch.no_grad()
def embed_texts(backbone, tokenizer, texts: list[str], device, pooling: str = "mean", max_length: int = 512,
                batch_size: int = 64) -> torch.Tensor:
    """(N, H) float32 embeddings (not normalised), in input order; texts sorted by length for batching."""
    backbone.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    pieces = []
    for start in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[start:start + batch_size]]
        enc = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt",
                        return_token_type_ids=True)
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = backbone(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
        pieces.append(pool(hidden.float(), enc["attention_mask"], pooling).cpu())
    out = torch.cat(pieces)
    result = torch.empty_like(out)
    result[torch.tensor(order, dtype=torch.long)] = out
    return result


# ----------------------------------------------------------------------------- STS


def read_sts(path: str) -> list[dict]:
    """JSTS-format pairs: {sentence_pair_id, sentence1, sentence2, label: 0-5}."""
    from megatron_jp.eval.tasks import STS_RANGE
    from megatron_jp.eval.records import number_field

    pairs = []
    for where, record in read_jsonl(path):
        pairs.append({"id": record_id(record, where, ("sentence_pair_id", "id")),
                      "sentence1": text_field(record, "sentence1", where),
                      "sentence2": text_field(record, "sentence2", where),
                      "label": number_field(record, "label", where, *STS_RANGE), "where": where})
    check_unique(((p["id"], p["where"]) for p in pairs), "sentence pair")
    return pairs


def sts(backbone, tokenizer, pairs: list[dict], device, pooling: str, max_length: int) -> tuple[dict, list]:
    """Spearman (and Pearson) of cosine(sentence1, sentence2) against the gold score."""
    from megatron_jp.eval.tasks import correlation_metrics

    a = embed_texts(backbone, tokenizer, [p["sentence1"] for p in pairs], device, pooling, max_length)
    b = embed_texts(backbone, tokenizer, [p["sentence2"] for p in pairs], device, pooling, max_length)
    cosine = F.cosine_similarity(a, b, dim=-1).tolist()
    rows = [{"id": p["id"], "prediction": c, "gold": p["label"]} for p, c in zip(pairs, cosine)]
    return correlation_metrics(cosine, [p["label"] for p in pairs]), rows


# ----------------------------------------------------------------------------- retrieval


ID_KEYS = ("_id", "id", "query_id", "docid", "doc_id")


def read_texts(path: str, what: str) -> tuple[list[str], list[str]]:
    """(ids, texts) of a queries or corpus JSONL: {_id or id, text[, title]}; a title is prepended."""
    ids, texts, seen = [], [], []
    for where, record in read_jsonl(path):
        ident = next((str(record[k]) for k in ID_KEYS if k in record), None)
        if ident is None:
            raise EvalInputError(f"{where}: missing field '_id' or 'id' (the {what} id the qrels name)")
        text = text_field(record, "text", where)
        title = record.get("title")
        ids.append(ident)
        texts.append(f"{title} {text}" if isinstance(title, str) and title.strip() else text)
        seen.append((ident, where))
    check_unique(seen, what)
    return ids, texts


def read_qrels(path: str, query_ids: set, corpus_ids: set) -> dict[str, dict[str, float]]:
    """{query id: {corpus id: relevance > 0}} from BEIR TSV (query-id, corpus-id, score; header
    optional) or TREC qrels (query-id, iteration, corpus-id, relevance)."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: no such file")
    qrels: dict[str, dict[str, float]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        parts = line.split("\t") if "\t" in line else line.split()
        if not parts or not line.strip():
            continue
        where = f"{path}:{number}"
        if len(parts) not in (3, 4):
            raise EvalInputError(f"{where}: expected 3 tab-separated columns (query-id, corpus-id, score) "
                                 f"or 4 (TREC: query-id, 0, corpus-id, relevance), got {len(parts)}")
        q, d, score = (parts[0], parts[1], parts[2]) if len(parts) == 3 else (parts[0], parts[2], parts[3])
        try:
            rel = float(score)
        except ValueError:
            if number == 1:
                continue  # a header line (query-id corpus-id score)
            raise EvalInputError(f"{where}: relevance {score!r} is not a number") from None
        if q not in query_ids:
            raise EvalInputError(f"{where}: query id {q!r} is not in the queries file")
        if d not in corpus_ids:
            raise EvalInputError(f"{where}: corpus id {d!r} is not in the corpus file")
        if rel > 0:
            qrels.setdefault(q, {})[d] = rel
    if not qrels:
        raise EvalInputError(f"{path}: no relevant (score > 0) query-document pair; expected "
                             f"query-id<TAB>corpus-id<TAB>score lines")
    return qrels


@torch.no_grad()
def rank(queries: torch.Tensor, corpus: torch.Tensor, top: int, device, batch_size: int = 256):
    """(scores, indices) (Q, top) of the most cosine-similar corpus rows, best first."""
    q = F.normalize(queries.float(), dim=-1)
    c = F.normalize(corpus.float(), dim=-1)
    top = min(top, len(c))
    all_scores, all_index = [], []
    for qs in q.split(batch_size):
        qs = qs.to(device)
        best_s = torch.full((len(qs), 0), -math.inf, device=device)
        best_i = torch.zeros((len(qs), 0), dtype=torch.long, device=device)
        for start in range(0, len(c), CORPUS_CHUNK):
            s = qs @ c[start:start + CORPUS_CHUNK].to(device).T
            merged_s = torch.cat([best_s, s], dim=1)
            merged_i = torch.cat([best_i, torch.arange(start, start + s.shape[1], device=device).expand_as(s)], dim=1)
            best_s, pick = merged_s.topk(min(top, merged_s.shape[1]), dim=1)
            best_i = merged_i.gather(1, pick)
        all_scores.append(best_s.cpu())
        all_index.append(best_i.cpu())
    return torch.cat(all_scores), torch.cat(all_index)


def retrieval_metrics(ranked: dict[str, list[str]], qrels: dict[str, dict[str, float]], ks: list[int]) -> dict:
    """Recall@k, MRR@10 and nDCG@10 (linear gain, log2 discount), averaged over queries with qrels."""
    recall = {k: [] for k in ks}
    mrr, ndcg = [], []
    for q, relevant in qrels.items():
        docs = ranked[q]
        for k in ks:
            recall[k].append(len(set(docs[:k]) & set(relevant)) / len(relevant))
        first = next((i for i, d in enumerate(docs[:10]) if d in relevant), None)
        mrr.append(0.0 if first is None else 1.0 / (first + 1))
        dcg = sum(relevant.get(d, 0.0) / math.log2(i + 2) for i, d in enumerate(docs[:10]))
        ideal = sum(r / math.log2(i + 2) for i, r in enumerate(sorted(relevant.values(), reverse=True)[:10]))
        ndcg.append(dcg / ideal)
    metrics = {f"recall@{k}": float(np.mean(v)) for k, v in recall.items()}
    metrics.update({"mrr@10": float(np.mean(mrr)), "ndcg@10": float(np.mean(ndcg)), "queries": len(qrels)})
    return metrics


def retrieval(backbone, tokenizer, device, queries: tuple, corpus: tuple, qrels: dict, ks: list[int],
              pooling: str, max_length: int, query_prefix: str = "", passage_prefix: str = ""):
    q_ids, q_texts = queries
    c_ids, c_texts = corpus
    asked = [i for i, q in enumerate(q_ids) if q in qrels]
    q_emb = embed_texts(backbone, tokenizer, [query_prefix + q_texts[i] for i in asked], device, pooling, max_length)
    c_emb = embed_texts(backbone, tokenizer, [passage_prefix + t for t in c_texts], device, pooling, max_length)
    scores, index = rank(q_emb, c_emb, max(max(ks), 10), device)
    ranked = {q_ids[i]: [c_ids[j] for j in row] for i, row in zip(asked, index.tolist())}
    rows = [{"id": q_ids[i], "prediction": ranked[q_ids[i]], "scores": [round(s, 6) for s in srow],
             "gold": qrels[q_ids[i]]} for i, srow in zip(asked, scores.tolist())]
    return retrieval_metrics(ranked, qrels, ks), rows
