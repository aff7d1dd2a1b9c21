"""Intrinsic metrics of a masked LM: masked-word accuracy, pseudo-perplexity, alignment and
uniformity of sentence embeddings, fill-mask probes.

Masked-word accuracy (byBERT-JP's metric, Kudo et al. 2025): in each document, whole words (the same
unidic-lite word boundaries as preprocess_data --word-boundaries, mapped to tokens through character
offsets: megatron_jp.data.segment) are masked until 15% of its tokens are, with the selection rule of
training (megatron_jp.data.masking.select_units) and a fixed seed per document; every selected token
becomes [MASK] (no random or kept tokens: this measures prediction, not robustness). A word counts as
correct when the argmax at every one of its tokens is the original token; the token accuracy is
reported beside it.

Alignment and uniformity are SimCSE's (Gao et al. 2021, after Wang & Isola 2020) on L2-normalised
embeddings: alignment = E ||f(x) - f(y)||^2 over positive pairs (gold score >= 4 of 5 in a JSTS-style
file), uniformity = log E exp(-2 ||f(x) - f(y)||^2) over all pairs of distinct sentences of the file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from megatron_jp.data.masking import select_units
from megatron_jp.data.segment import build_segmenter, word_start_flags
from megatron_jp.eval.records import EvalInputError, read_jsonl, record_id, text_field
from megatron_jp.eval.pseudo_perplexity import (SpecialIds, Ticker, document_ids, document_log_likelihood,
                                                    encoder_scorer, hf_scorer)

MASK_PROB = 0.15
POSITIVE_SCORE = 4.0
MASK_MARK = "[MASK]"


@dataclass
class Settings:
    """How `evaluate` scores a model."""

    max_length: int = 512
    """Tokens per document (CLS and SEP included) and per sentence."""
    word_boundaries: str = "unidic-lite"
    """Segmenter of the words masked (megatron_jp.data.segment); none: every token is a word."""
    seed: int = 0
    """Seeds which words are masked (with the document's position in the file)."""
    mask_prob: float = MASK_PROB
    """Fraction of each document's tokens masked, in whole words."""
    pppl_docs: int = 100
    """Documents scored for pseudo-perplexity (one forward pass per token); 0 skips it."""
    positive_score: float = POSITIVE_SCORE
    """Pairs scoring at least this are the positives of alignment."""
    top_k: int = 3
    """Fill-mask predictions kept per probe."""
    pooling: str = "mean"
    """Sentence embedding of alignment and uniformity: mean or cls."""


def evaluate(model, docs, pairs, probes, settings: Settings, output: str) -> tuple[dict, list]:
    """Every intrinsic metric the inputs allow: masked-word accuracy and pseudo-perplexity on `docs`,
    fill-mask on `probes`, alignment and uniformity on `pairs` (their embeddings go to
    OUTPUT/embeddings.npz). Returns (metrics, predictions.jsonl rows)."""
    from megatron_jp.eval.embed import embed_texts

    s, metrics, rows = settings, {}, []
    mlm = model.masked_lm()
    parts = [masked_word_accuracy(mlm, model.tokenizer, docs, model.device, s.max_length, s.word_boundaries,
                                  s.seed, s.mask_prob)]
    if s.pppl_docs:
        parts.append(pseudo_perplexity(mlm, model.tokenizer, docs[:s.pppl_docs], model.device, s.max_length))
    if probes:
        parts.append(fill_mask(mlm, model.tokenizer, probes, model.device, s.top_k))
    del mlm
    for m, r in parts:
        metrics.update(m)
        rows.extend(r)
    if pairs:
        sentences, positives = sentence_pairs(pairs, s.positive_score)
        emb = embed_texts(model.backbone(), model.tokenizer, sentences, model.device, s.pooling, s.max_length)
        metrics.update(alignment_uniformity(emb, positives))
        os.makedirs(output, exist_ok=True)
        np.savez(os.path.join(output, "embeddings.npz"), embeddings=emb.numpy(),
                 positives=np.asarray(positives, dtype=np.int64).reshape(-1, 2))
    return metrics, rows


def read_documents(path: str, key: str, limit: int) -> list[tuple[str, str]]:
    """(id, text) of the first `limit` documents of a JSONL file; the id is the record's "id" or its
    position in the file (0, 1, ...)."""
    docs = []
    for where, record in read_jsonl(path):
        if len(docs) >= limit:
            break
        docs.append((str(record.get("id", len(docs))), text_field(record, key, where)))
    return docs


def special_ids(tokenizer) -> SpecialIds:
    return SpecialIds(tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id)


# ----------------------------------------------------------------------------- masked-word accuracy


def masked_document(tokenizer, segmenter, text: str, max_length: int, seed: int, index: int, mask_prob: float):
    """(ids with CLS/SEP, original ids, selected (bool), unit of each selected token, char spans)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"][:max_length - 2], dtype=np.int64)
    spans = np.asarray(enc["offset_mapping"][:max_length - 2], dtype=np.int64).reshape(-1, 2)
    if segmenter is None:
        flags = np.ones(len(ids), dtype=bool)
    else:
        m_starts, m_ends = segmenter.spans(text)
        flags = word_start_flags(spans[:, 0], spans[:, 1], m_starts, m_ends, len(text)).astype(bool)
    cand = ~np.isin(ids, tokenizer.all_special_ids)
    prev = np.r_[False, cand[:-1]]
    starts = cand & (flags | ~prev)  # as the training masker: a unit also starts after a non-candidate
    keys = np.random.Generator(np.random.Philox(key=np.array([seed, index], dtype=np.uint64))).random(len(ids))
    selected = select_units(cand[None], starts[None], keys[None], mask_prob)[0] if cand.any() else cand
    unit = np.cumsum(starts | ~np.r_[False, selected[:-1]]) - 1
    masked = np.where(selected, tokenizer.mask_token_id, ids)
    full = np.r_[tokenizer.cls_token_id, masked, tokenizer.sep_token_id]
    return full, ids, selected, unit, spans


@torch.no_grad()
def masked_word_accuracy(mlm, tokenizer, docs: list[tuple[str, str]], device, max_length: int = 512,
                         word_boundaries: str = "unidic-lite", seed: int = 0, mask_prob: float = MASK_PROB,
                         batch_size: int = 16) -> tuple[dict, list]:
    segmenter = build_segmenter(word_boundaries)
    rows, tokens, tokens_right = [], 0, 0
    prepared = [(doc_id, text, masked_document(tokenizer, segmenter, text, max_length, seed, i, mask_prob))
                for i, (doc_id, text) in enumerate(docs)]
    for start in range(0, len(prepared), batch_size):
        chunk = prepared[start:start + batch_size]
        S = max(len(p[2][0]) for p in chunk)
        ids = torch.full((len(chunk), S), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (_, _, m) in enumerate(chunk):
            ids[r, :len(m[0])], mask[r, :len(m[0])] = torch.from_numpy(m[0]), 1
        predicted = mlm(ids.to(device), mask.to(device)).argmax(dim=-1).cpu().numpy()[:, 1:]  # drop CLS
        for r, (doc_id, text, (_, original, selected, unit, spans)) in enumerate(chunk):
            rows += word_rows(tokenizer, doc_id, text, original, predicted[r], selected, unit, spans)
            tokens += int(selected.sum())
            tokens_right += int((predicted[r][:len(original)][selected] == original[selected]).sum())
    words = len(rows)
    if words == 0:
        raise EvalInputError("no word to mask: every document is empty after tokenization")
    correct = sum(r["prediction"] == r["gold"] for r in rows)
    return {"masked_word_accuracy": correct / words, "masked_token_accuracy": tokens_right / tokens,
            "masked_words": words, "masked_tokens": tokens, "documents": len(docs)}, rows


def word_rows(tokenizer, doc_id, text, original, predicted, selected, unit, spans) -> list[dict]:
    rows = []
    positions = np.flatnonzero(selected)
    for u in np.unique(unit[positions]):
        where = positions[unit[positions] == u]
        gold, pred = original[where].tolist(), predicted[where].tolist()
        span = text[spans[where[0], 0]:spans[where[-1], 1]]
        rows.append({"id": f"{doc_id}:{int(where[0])}", "kind": "masked_word", "prediction": pred, "gold": gold,
                     "prediction_text": tokenizer.decode(pred), "gold_text": span})
    return rows


# ----------------------------------------------------------------------------- pseudo-perplexity


def scorer_for(mlm, device):
    """training.pseudo_perplexity's scorer for our Encoder or a transformers model, on the device."""
    from megatron_jp.eval.models import EncoderMaskedLM

    inner = encoder_scorer(mlm.encoder) if isinstance(mlm, EncoderMaskedLM) else hf_scorer(mlm.model)
    return lambda batch, positions: inner(batch.to(device), positions.to(device)).cpu()


def pseudo_perplexity(mlm, tokenizer, docs: list[tuple[str, str]], device, max_length: int,
                      batch_size: int = 32, every_s: float = 10.0) -> tuple[dict, list]:
    """PPPL as tools/pseudo_perplexity.py computes it, with one row per document (its log-likelihood)."""
    scorer, special = scorer_for(mlm, device), special_ids(tokenizer)
    rows, scored = [], 0
    tick = Ticker("intrinsic: pseudo-perplexity", len(docs), every_s)
    for done, (doc_id, text) in enumerate(docs, 1):
        ids = document_ids(tokenizer(text, add_special_tokens=False)["input_ids"], special, max_length)
        if len(ids) > 2:
            ll, n = document_log_likelihood(ids, special, scorer, batch_size)
            rows.append({"id": f"pppl:{doc_id}", "kind": "pppl", "log_likelihood": ll, "tokens": n})
            scored += n
            tick(done, scored)
    tokens = sum(r["tokens"] for r in rows)
    if tokens == 0:
        raise EvalInputError("no token to score for pseudo-perplexity: every document was empty")
    ll = sum(r["log_likelihood"] for r in rows)
    return {"pppl": math.exp(-ll / tokens), "pppl_tokens": tokens, "pppl_documents": len(rows)}, rows


# ----------------------------------------------------------------------------- alignment and uniformity


def alignment_uniformity(embeddings: torch.Tensor, positives: list[tuple[int, int]]) -> dict:
    """SimCSE's alignment (alpha 2) over positive pairs and uniformity (t 2) over all distinct pairs."""
    x = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    metrics = {"uniformity": torch.pdist(x, p=2).pow(2).mul(-2).exp().mean().log().item(),
               "sentences": len(x), "positive_pairs": len(positives)}
    if positives:
        a, b = (torch.tensor(side) for side in zip(*positives))
        metrics["alignment"] = (x[a] - x[b]).norm(dim=1).pow(2).mean().item()
    return metrics


def sentence_pairs(pairs: list[dict], threshold: float = POSITIVE_SCORE):
    """(unique sentences, positive pairs as index pairs into them)."""
    index: dict[str, int] = {}
    for p in pairs:
        for key in ("sentence1", "sentence2"):
            index.setdefault(p[key], len(index))
    positives = [(index[p["sentence1"]], index[p["sentence2"]]) for p in pairs if p["label"] >= threshold]
    return list(index), positives


# ----------------------------------------------------------------------------- fill-mask probes


def read_probes(path: str) -> list[dict]:
    """{text with one [MASK], answer (optional)} per line."""
    probes = []
    for where, record in read_jsonl(path):
        text = text_field(record, "text", where)
        if text.count(MASK_MARK) != 1:
            raise EvalInputError(f"{where}: 'text' must hold exactly one {MASK_MARK} (found {text.count(MASK_MARK)})")
        answer = record.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise EvalInputError(f"{where}: 'answer' must be a string")
        probes.append({"id": record_id(record, where, ("id",)), "text": text, "answer": answer})
    return probes


@torch.no_grad()
def fill_mask(mlm, tokenizer, probes: list[dict], device, top_k: int = 3) -> tuple[dict, list]:
    rows = []
    for p in probes:
        left, right = p["text"].split(MASK_MARK)
        body = tokenizer(left, add_special_tokens=False)["input_ids"]
        position = len(body) + 1
        ids = [tokenizer.cls_token_id, *body, tokenizer.mask_token_id,
               *tokenizer(right, add_special_tokens=False)["input_ids"], tokenizer.sep_token_id]
        batch = torch.tensor([ids], device=device)
        logits = mlm(batch, torch.ones_like(batch))[0, position]
        top = logits.float().softmax(-1).topk(top_k)
        words = [tokenizer.decode([i]).strip() for i in top.indices.tolist()]
        rows.append({"id": f"probe:{p['id']}", "kind": "fill_mask", "text": p["text"], "prediction": words,
                     "probabilities": top.values.tolist(), "gold": p["answer"]})
    scored = [r for r in rows if r["gold"] is not None]
    metrics = {"fill_mask_probes": len(rows)}
    if scored:
        metrics[f"fill_mask_top{top_k}"] = sum(r["gold"] in r["prediction"] for r in scored) / len(scored)
    return metrics, rows
