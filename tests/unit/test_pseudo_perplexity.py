"""Pseudo-perplexity: the definition, and agreement between a model and its Hugging Face export."""

import math

import pytest
import torch
from transformers import AutoModelForMaskedLM

from megatron_jp.models.config import preset
from megatron_jp.models.encoder import build_encoder
from megatron_jp.models.hf import export_hf
from megatron_jp.eval.pseudo_perplexity import (SpecialIds, document_ids, encoder_scorer, hf_scorer,
                                                    pseudo_perplexity)

SPECIAL = SpecialIds(cls=1, sep=2, mask=3)


def test_a_uniform_model_has_pseudo_perplexity_equal_to_its_vocabulary():
    vocab = 50

    def uniform(batch, positions):
        return torch.full((len(batch), vocab), -math.log(vocab))

    result = pseudo_perplexity([[5, 6, 7], [8, 9]], SPECIAL, uniform, max_length=16)
    assert result["pppl"] == pytest.approx(vocab) and result["tokens"] == 5


def test_each_scored_copy_masks_exactly_one_token():
    seen = []

    def record(batch, positions):
        seen.extend((row == SPECIAL.mask).nonzero().flatten().tolist() == [p] for row, p in zip(batch, positions.tolist()))
        return torch.zeros(len(batch), 20)

    pseudo_perplexity([[4, 5, 6, 7, 8]], SPECIAL, record, max_length=5, batch_size=2)
    assert seen == [True] * 3  # truncated to 5 = CLS + 3 tokens + SEP


def test_truncation_keeps_cls_and_sep():
    assert document_ids(list(range(10, 20)), SPECIAL, 6) == [1, 10, 11, 12, 13, 2]


def test_checkpoint_and_hf_export_agree(tmp_path):
    """Same weights, two implementations: relative difference <= 1e-4 (fp32 reordering is ~1e-6)."""
    cfg = preset("tiny-modernbert", vocab_size=64, sliding_window=8)
    model = build_encoder(cfg, seed=2).eval()
    export_hf(model.state_dict(), cfg, tmp_path)
    hf = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(4, 64, (n,), generator=gen).tolist() for n in (5, 30, 17)]
    ours = pseudo_perplexity(docs, SPECIAL, encoder_scorer(model), max_length=24)
    theirs = pseudo_perplexity(docs, SPECIAL, hf_scorer(hf), max_length=24)
    assert ours["tokens"] == theirs["tokens"] == 5 + 22 + 17
    assert ours["pppl"] == pytest.approx(theirs["pppl"], rel=1e-4)
