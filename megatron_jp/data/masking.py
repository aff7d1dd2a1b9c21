"""Masked-language-model masking, vectorised over a micro-batch and reproducible per sample.

Selection works on *units*: single tokens, or whole words (a word-start token and the tokens that
follow it up to the next word start) for whole word masking. Each row gets a budget of
`max(1, round(mask_prob * candidates))` tokens; its units are visited in a random order and taken
while the running token count stays within the budget (the first unit is always taken), as in
Megatron/BERT. Selected tokens become [MASK] with probability `mask_token_prob`, a random regular
token with probability `random_token_prob` (never a special token), and stay unchanged otherwise;
`labels` hold the original id there and -100 elsewhere. Candidates exclude every special token
(CLS, SEP, PAD, MASK, UNK, EOD, control pieces), so they are never masked nor predicted.

All randomness of a row comes from `row_randoms(seed, stream, sample_index)`: a Philox generator
keyed by (seed, stream, global sample index), so a resumed run, another data-parallel layout or
another micro-batch size sees the same masks for the same sample.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100
_KEY_MASK = (1 << 64) - 1


def row_randoms(seed: int, stream: int, indices, width: int) -> np.ndarray:
    """(rows, 3, width) uniform draws: unit order keys, 80/10/10 choice, random-token choice."""
    out = np.empty((len(indices), 3, width), dtype=np.float64)
    hi = (int(seed) * 0x9E3779B97F4A7C15 + int(stream)) & _KEY_MASK
    for r, index in enumerate(indices):
        gen = np.random.Generator(np.random.Philox(key=np.array([hi, int(index)], dtype=np.uint64)))
        out[r] = gen.random((3, width))
    return out


class Masker:
    """MLM masking for a given vocabulary; `__call__` masks a (B, S) batch in place of copies."""

    def __init__(self, vocab_size: int, mask_id: int, special_ids, mask_token_prob: float = 0.8,
                 random_token_prob: float = 0.1, whole_word: bool = False):
        if mask_token_prob < 0 or random_token_prob < 0 or mask_token_prob + random_token_prob > 1:
            raise ValueError(f"mask_token_prob ({mask_token_prob}) + random_token_prob ({random_token_prob}) "
                             "must be within [0, 1]")
        self.mask_id, self.whole_word = mask_id, whole_word
        self.mask_token_prob, self.random_token_prob = mask_token_prob, random_token_prob
        self.is_special = np.zeros(vocab_size, dtype=bool)
        self.is_special[np.asarray(special_ids, dtype=np.int64)] = True
        self.replacements = np.flatnonzero(~self.is_special)

    def candidates(self, ids: np.ndarray) -> np.ndarray:
        return ~self.is_special[ids]

    def __call__(self, ids: np.ndarray, word_starts: np.ndarray | None, randoms: np.ndarray,
                 mask_prob: float) -> tuple[np.ndarray, np.ndarray]:
        """(masked input ids, labels) for `ids` (B, S); word_starts (B, S) bool for whole words."""
        cand = self.candidates(ids)
        starts = cand.copy()
        if self.whole_word:
            if word_starts is None:
                raise ValueError("whole word masking needs word-start flags (the _words shard)")
            prev_cand = np.zeros_like(cand)
            prev_cand[:, 1:] = cand[:, :-1]
            starts &= word_starts | ~prev_cand  # a unit also starts right after a non-candidate
        selected = select_units(cand, starts, randoms[:, 0], mask_prob)
        return self._replace(ids, selected, randoms[:, 1], randoms[:, 2])

    def _replace(self, ids, selected, choice, pick):
        labels = np.where(selected, ids, IGNORE_INDEX).astype(np.int64)
        out = ids.astype(np.int64, copy=True)
        to_mask = selected & (choice < self.mask_token_prob)
        to_random = selected & ~to_mask & (choice < self.mask_token_prob + self.random_token_prob)
        out[to_mask] = self.mask_id
        picks = (pick[to_random] * len(self.replacements)).astype(np.int64)
        out[to_random] = self.replacements[np.minimum(picks, len(self.replacements) - 1)]
        return out, labels


def select_units(cand: np.ndarray, starts: np.ndarray, keys: np.ndarray, mask_prob: float) -> np.ndarray:
    """(B, S) bool: whole units taken in `keys` order per row until the row's token budget is spent."""
    B, S = cand.shape
    flat_cand, flat_starts = cand.ravel(), (starts & cand).ravel()
    start_pos = np.flatnonzero(flat_starts)
    if len(start_pos) == 0:
        return np.zeros_like(cand)
    unit_of_token = np.cumsum(flat_starts) - 1
    unit_len = np.bincount(unit_of_token[flat_cand], minlength=len(start_pos))
    unit_row = start_pos // S
    order = np.lexsort((keys.ravel()[start_pos], unit_row))  # by row, then random key
    row_sorted, len_sorted = unit_row[order], unit_len[order]
    taken_after = np.cumsum(len_sorted)
    first = np.r_[True, row_sorted[1:] != row_sorted[:-1]]
    row_base = (taken_after - len_sorted)[np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))]
    budget = np.maximum(1, np.rint(mask_prob * cand.sum(axis=1))).astype(np.int64)
    chosen = np.empty(len(order), dtype=bool)
    chosen[order] = first | (taken_after - row_base <= budget[row_sorted])
    selected = np.zeros(B * S, dtype=bool)
    selected[flat_cand] = chosen[unit_of_token[flat_cand]]
    return selected.reshape(B, S)
