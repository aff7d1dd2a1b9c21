"""Seeded permutations computed on the fly: the row order of each epoch without an O(rows) table.

`FeistelPermutation(n, key)` is a bijection of [0, n): a balanced Feistel network over the
smallest even number of bits covering n (6 rounds, a splitmix64-style round function keyed by
64-bit round keys drawn from Philox(key)), restricted to [0, n) by cycle walking (values that land
outside are encrypted again until they fall inside; since the domain is < 4n, the expected number
of extra passes is below 3). Evaluating it costs a few dozen integer operations per index, so a
batch of B samples needs O(B) time and memory whatever the corpus size, and any epoch gets its own
permutation for free.

Why not a memory-mapped `np.random.permutation` per epoch (Megatron's shuffle_idx): that costs 8
bytes per row per epoch on disk and in the page cache, a build pass at start, and a fixed number of
epochs known in advance. The price of the bijection is that it is not numpy's permutation (runs
built before this format see another order; the cache format version changed with it) and that its
statistical quality rests on the round function; 6 rounds of a full-avalanche mixer are far beyond
the 4 that Luby-Rackoff needs for a pseudo-random permutation, and the tests check uniformity.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit (uint64, wrapping)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """perm(indices) -> the images of `indices` (int64 array) under a seeded bijection of [0, n)."""

    def __init__(self, n: int, key):
        if n < 0:
            raise ValueError(f"permutation size must be >= 0, got {n}")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits % 2
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        rng = np.random.Generator(np.random.Philox(key=np.asarray(key, dtype=np.uint64)))
        self.keys = rng.integers(0, np.iinfo(np.uint64).max, size=ROUNDS, dtype=np.uint64, endpoint=True)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, indices) -> np.ndarray:
        x = np.asarray(indices, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"permutation of {self.n}: index out of range")
        out = self._encrypt(x.astype(np.uint64))
        outside = np.flatnonzero(out >= np.uint64(self.n))
        while outside.size:  # cycle walking: follow the cycle until it re-enters [0, n)
            out[outside] = self._encrypt(out[outside])
            outside = outside[out[outside] >= np.uint64(self.n)]
        return out.astype(np.int64)
