"""Packing: none / concat / best_fit layouts, and the C++ helper agreeing with the Python fallback."""

import numpy as np
import pytest

from megatron_jp.data import packing
from megatron_jp.data.packing import build_packed_index, split_documents

S = 32


def lengths_for(seed=0, n=400, mean=20):
    return np.random.default_rng(seed).geometric(1 / mean, size=n).astype(np.int64)


def row_costs(index):
    return np.add.reduceat(index.length + 2, index.row_ptr[:-1]) if index.num_rows else np.zeros(0)


def covered_tokens(index):
    """Multiset of (doc, token position) covered by the pieces."""
    return sorted((int(d), int(s) + k) for d, s, n in zip(index.doc, index.start, index.length) for k in range(n))


@pytest.mark.parametrize("method", packing.PACKING_METHODS)
def test_every_row_fits_the_sequence_length(method):
    index = build_packed_index(method, np.arange(400), lengths_for(), S)
    assert (row_costs(index) <= S).all() and (index.length > 0).all()


@pytest.mark.parametrize("method", ["concat", "best_fit"])
def test_every_token_lands_exactly_once(method):
    lengths = lengths_for()
    index = build_packed_index(method, np.arange(400), lengths, S)
    assert covered_tokens(index) == [(d, t) for d in range(400) for t in range(lengths[d])]


def test_none_puts_one_truncated_document_per_row():
    lengths = np.array([5, 0, 100, 30])
    index = build_packed_index("none", np.array([7, 8, 9, 10]), lengths, S)
    assert index.doc.tolist() == [7, 9, 10] and index.length.tolist() == [5, S - 2, 30]
    assert index.row_ptr.tolist() == [0, 1, 2, 3]


def test_concat_fills_rows_back_to_back_in_order():
    index = build_packed_index("concat", np.array([0, 1, 2]), np.array([10, 30, 4]), S)
    pieces = list(zip(index.doc.tolist(), index.start.tolist(), index.length.tolist()))
    # row 0: [CLS] 10 [SEP] + [CLS] 18 of doc 1 [SEP] = 32; row 1: the other 12 of doc 1, then doc 2
    assert pieces == [(0, 0, 10), (1, 0, 18), (1, 18, 12), (2, 0, 4)]
    assert index.row_ptr.tolist() == [0, 2, 4]


def test_best_fit_splits_only_documents_longer_than_a_row():
    lengths = lengths_for(n=300)
    index = build_packed_index("best_fit", np.arange(300), lengths, S)
    pieces_per_doc = np.bincount(index.doc, minlength=300)
    assert (pieces_per_doc[lengths <= S - 2] == 1).all()
    assert (pieces_per_doc[lengths > S - 2] == -(-lengths[lengths > S - 2] // (S - 2))).all()


def test_best_fit_pads_less_than_concat_splits_and_none_pads():
    lengths = lengths_for(n=2000, mean=12)
    none = build_packed_index("none", np.arange(2000), lengths, S)
    best = build_packed_index("best_fit", np.arange(2000), lengths, S)
    assert best.padding_fraction() < 0.05 < none.padding_fraction()


def test_best_fit_never_crosses_row_boundary():
    index = build_packed_index("best_fit", np.arange(500), lengths_for(n=500), S)
    pieces, rows = index.rows(np.arange(index.num_rows))
    assert (np.bincount(rows) == np.diff(index.row_ptr)).all() and (pieces == np.arange(len(pieces))).all()
    assert row_costs(index).max() <= S


def test_split_documents_cuts_into_max_len_pieces():
    doc, start, length = split_documents(np.array([3, 4]), np.array([7, 2]), 3)
    assert list(zip(doc, start, length)) == [(3, 0, 3), (3, 3, 3), (3, 6, 1), (4, 0, 2)]


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="zigzag"):
        build_packed_index("zigzag", np.arange(2), np.array([1, 2]), S)


@pytest.mark.skipif(packing._helpers is None, reason="megatron_jp._helpers not built (pip install -e .)")
def test_cpp_helper_matches_python_fallback():
    lengths = lengths_for(seed=3, n=5000, mean=50)
    for seq in (8, 64, 1024):
        sizes = split_documents(np.arange(5000), lengths, seq - 2)[2]
        for cpp, py in zip(packing._helpers.pack_best_fit(sizes, seq, 700), packing._best_fit_python(sizes, seq, 700)):
            assert np.array_equal(cpp, py)
        for room, keep in ((seq, False), (2, True)):
            with_empty = np.where(np.arange(5000) % 7 == 0, 0, lengths)
            cpp = packing._helpers.pack_concat(with_empty, seq, room, keep)
            py = packing._concat_python(with_empty, seq, room, keep)
            assert all(np.array_equal(a, b) for a, b in zip(cpp, py))
