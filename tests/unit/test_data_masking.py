"""MLM masking: rates, 80/10/10, specials untouched, whole words, reproducibility per sample."""

import numpy as np
import pytest

from megatron_jp.data.masking import IGNORE_INDEX, Masker, row_randoms, select_units

VOCAB, MASK, CLS, SEP, PAD = 1000, 4, 2, 3, 0
SPECIALS = [0, 1, 2, 3, 4]


def batch(B=16, S=256, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, size=(B, S))
    ids[:, 0], ids[:, S // 2] = CLS, SEP
    ids[:, S // 2 + 1], ids[:, -20] = CLS, SEP
    ids[:, -19:] = PAD
    words = rng.random((B, S)) < 0.4
    return ids, words


def masker(**kw):
    return Masker(VOCAB, MASK, SPECIALS, **kw)


def test_specials_are_never_masked_nor_predicted():
    ids, words = batch()
    for whole_word in (False, True):
        out, labels = masker(whole_word=whole_word)(ids, words, row_randoms(1, 0, range(16), 256), 0.5)
        special = np.isin(ids, SPECIALS)
        assert (out[special] == ids[special]).all() and (labels[special] == IGNORE_INDEX).all()


@pytest.mark.parametrize("rate", [0.15, 0.3])
def test_selected_fraction_follows_the_mask_rate(rate):
    ids, words = batch(B=64)
    _, labels = masker()(ids, words, row_randoms(7, 0, range(64), 256), rate)
    candidates = (~np.isin(ids, SPECIALS)).sum()
    assert abs((labels != IGNORE_INDEX).sum() / candidates - rate) < 0.01


def test_80_10_10_split_and_random_tokens_are_regular():
    ids, words = batch(B=256)
    out, labels = masker()(ids, words, row_randoms(3, 0, range(256), 256), 0.15)
    sel = labels != IGNORE_INDEX
    masked, kept = (out[sel] == MASK).mean(), (out[sel] == ids[sel]).mean()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02
    replaced = sel & (out != MASK) & (out != ids)
    assert replaced.sum() > 0 and not np.isin(out[replaced], SPECIALS).any()
    assert (labels[sel] == ids[sel]).all()


def test_only_random_replacement_never_yields_a_special_token():
    ids, words = batch(B=64)
    out, labels = masker(mask_token_prob=0.0, random_token_prob=1.0)(ids, words, row_randoms(5, 0, range(64), 256), 0.5)
    assert not np.isin(out[labels != IGNORE_INDEX], SPECIALS).any()


def test_whole_word_masking_takes_whole_words():
    ids, words = batch(B=32)
    out, labels = masker(whole_word=True)(ids, words, row_randoms(2, 0, range(32), 256), 0.15)
    cand = ~np.isin(ids, SPECIALS)
    sel = labels != IGNORE_INDEX
    for b in range(32):
        unit_start = cand[b] & (words[b] | ~np.r_[False, cand[b][:-1]])
        unit = np.cumsum(unit_start) - 1
        for u in np.unique(unit[sel[b]]):
            members = cand[b] & (unit == u)
            assert sel[b][members].all()  # a word is predicted entirely or not at all


def test_each_row_predicts_at_least_one_token():
    ids = np.full((3, 8), PAD)
    ids[:, 0], ids[:, 1], ids[:, 2] = CLS, 77, SEP
    _, labels = masker()(ids, None, row_randoms(0, 0, range(3), 8), 0.15)
    assert ((labels != IGNORE_INDEX).sum(axis=1) == 1).all()


def test_masks_depend_only_on_seed_and_sample_index():
    ids, words = batch(B=8)
    m = masker(whole_word=True)
    full = m(ids, words, row_randoms(11, 0, range(100, 108), 256), 0.15)
    half = m(ids[4:], words[4:], row_randoms(11, 0, range(104, 108), 256), 0.15)
    assert (full[0][4:] == half[0]).all() and (full[1][4:] == half[1]).all()
    other = m(ids, words, row_randoms(12, 0, range(100, 108), 256), 0.15)
    assert not (other[1] == full[1]).all()


def test_whole_word_needs_word_flags():
    ids, _ = batch(B=2)
    with pytest.raises(ValueError, match="word-start flags"):
        masker(whole_word=True)(ids, None, row_randoms(0, 0, range(2), 256), 0.15)


def test_select_units_respects_the_budget():
    cand = np.ones((1, 100), dtype=bool)
    starts = np.zeros((1, 100), dtype=bool)
    starts[0, ::10] = True  # ten words of ten tokens
    sel = select_units(cand, starts, np.random.default_rng(0).random((1, 100)), 0.25)
    assert sel.sum() == 20  # two whole words fit a budget of 25
