"""Pseudo-perplexity of a masked LM (Salazar et al., 2020), for our checkpoints and HF folders alike.

PPPL = exp(-mean over every non-special token of log p(token | the document with only that token
replaced by the mask token)). Documents are [CLS] tokens [SEP], truncated to `max_length` tokens.
One forward pass scores one masked copy; copies are batched.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

# (input_ids (N, S), positions (N,)) -> log-probabilities (N, V) at each row's masked position
Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SpecialIds:
    cls: int
    sep: int
    mask: int


class Ticker:
    """One line on stderr at most every `every_s` seconds (and none for inputs done sooner): scoring
    one forward pass per token takes minutes on long inputs, which must show that they move."""

    def __init__(self, what: str, total: int, every_s: float = 10.0):
        self.what, self.total, self.every_s = what, total, every_s
        self.last = time.monotonic()

    def __call__(self, done: int, tokens: int):
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            print(f"{self.what}: {done}/{self.total} documents, {tokens:,} tokens scored", file=sys.stderr, flush=True)


def document_ids(tokens: list[int], special: SpecialIds, max_length: int) -> list[int]:
    """[CLS] + tokens + [SEP], the body truncated so the whole fits in max_length."""
    return [special.cls, *tokens[: max_length - 2], special.sep]


@torch.no_grad()
def document_log_likelihood(ids: list[int], special: SpecialIds, scorer: Scorer, batch_size: int = 32):
    """(sum of log p over the document's non-special tokens, their count)."""
    row = torch.tensor(ids)
    positions = torch.arange(1, len(ids) - 1)  # every token but CLS and SEP
    total = 0.0
    for chunk in positions.split(batch_size):
        batch = row.repeat(len(chunk), 1)
        batch[torch.arange(len(chunk)), chunk] = special.mask
        logp = scorer(batch, chunk)  # (n, V)
        total += logp.gather(1, row[chunk, None]).sum().item()
    return total, len(positions)


def pseudo_perplexity(documents: list[list[int]], special: SpecialIds, scorer: Scorer, max_length: int,
                      batch_size: int = 32, every_s: float = 10.0) -> dict:
    log_likelihood, tokens = 0.0, 0
    tick = Ticker("pseudo-perplexity", len(documents), every_s)
    for done, doc in enumerate(documents, 1):
        ids = document_ids(doc, special, max_length)
        if len(ids) <= 2:
            continue  # an empty document has no token to score
        ll, n = document_log_likelihood(ids, special, scorer, batch_size)
        log_likelihood, tokens = log_likelihood + ll, tokens + n
        tick(done, tokens)
    if tokens == 0:
        raise ValueError("no token to score: every document was empty")
    mean_nll = -log_likelihood / tokens
    pppl = float("inf") if mean_nll > 709.0 else math.exp(mean_nll)  # NaN stays NaN; exp overflows past 709.78
    return {"pppl": pppl, "tokens": tokens, "documents": len(documents)}


def encoder_scorer(model) -> Scorer:
    """Our Encoder: sparse prediction returns logits only at the masked position of each row."""

    def score(batch, positions):
        labels = torch.full_like(batch, -100)
        labels[torch.arange(len(batch)), positions] = 0  # any id: only the position matters
        return torch.log_softmax(model(batch, labels=labels).logits.float(), dim=-1)

    return score


def hf_scorer(model) -> Scorer:
    """A transformers masked LM: full logits, then the masked position of each row."""

    def score(batch, positions):
        logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits
        return torch.log_softmax(logits[torch.arange(len(batch)), positions].float(), dim=-1)

    return score
