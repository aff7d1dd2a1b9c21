"""Where each local parameter sits in the full, unsharded model.

A local tensor is made of pieces, each a contiguous block along one dimension of the full tensor:
one piece for an embedding or a row-parallel weight, two for a GLU fc1 ([gate part; up part]), three
for a fused qkv ([q part; k part; v part]). A replicated tensor is one piece covering everything.
`unique` marks the one rank (among tensor- and pipeline-parallel replicas) that counts a piece in
the gradient norm and writes it to a checkpoint.

The same description drives initialisation (full tensor from the seeded RNG, then `take`),
checkpoints (`ShardedPiece`: full name, global shape, offsets) and gathering a full state dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Piece:
    """Rows [local_start, local_start + length) of the local tensor along the sharded dimension are
    rows [full_start, full_start + length) of the full tensor."""

    local_start: int
    full_start: int
    length: int
    unique: bool = True


@dataclass(frozen=True)
class GradReduction:
    """A gradient sum that data parallelism does not do, applied after it (sums commute).

    kind: "tp" (whole tensor over the tensor-parallel group: sequence-parallel norms and biases, whose
    gradients each cover 1/tp of the sequence), "kv" (flat range [start, end) of a GQA key/value head
    replicated over tp / kv ranks; `slot` is that head, `slots` the number of KV heads) or "embedding"
    (a tied embedding held by the first and the last pipeline stage).
    """

    kind: str
    start: int = 0
    end: int = 0
    slot: int = 0
    slots: int = 1


@dataclass(frozen=True)
class ShardSpec:
    full_name: str
    full_shape: tuple[int, ...]
    dim: int | None  # None: the local tensor is the full tensor (replicated over tensor parallelism)
    pieces: tuple[Piece, ...]

    @classmethod
    def replicated(cls, name: str, shape, unique: bool) -> "ShardSpec":
        shape = tuple(shape)
        return cls(name, shape, None, (Piece(0, 0, shape[0] if shape else 1, unique),))

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        shape = list(self.full_shape)
        shape[self.dim] = sum(p.length for p in self.pieces)
        return tuple(shape)

    def blocks(self, piece: Piece):
        """(local index, full index): the slices of the local and the full tensor that `piece` maps."""
        ndim = len(self.full_shape)
        if self.dim is None:
            return (slice(None),) * ndim, (slice(None),) * ndim
        local = [slice(None)] * ndim
        full = [slice(None)] * ndim
        local[self.dim] = slice(piece.local_start, piece.local_start + piece.length)
        full[self.dim] = slice(piece.full_start, piece.full_start + piece.length)
        return tuple(local), tuple(full)

    def offsets(self, piece: Piece) -> tuple[int, ...]:
        return tuple(piece.full_start if d == self.dim else 0 for d in range(len(self.full_shape)))

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's local tensor cut out of the full one."""
        if self.dim is None:
            return full
        return torch.cat([full[self.blocks(p)[1]] for p in self.pieces], dim=self.dim)

    def flat_range(self, piece: Piece) -> tuple[int, int]:
        """[start, end) of `piece` in the flattened local tensor."""
        numel = math.prod(self.local_shape)
        if self.dim is None:
            return 0, numel
        if self.dim != 0:  # a column shard of a row-major tensor is not contiguous unless it is all
            if len(self.pieces) != 1:
                raise ValueError(f"{self.full_name}: several pieces along dim {self.dim} are not flat ranges")
            return 0, numel
        row = math.prod(self.full_shape[1:])
        return piece.local_start * row, (piece.local_start + piece.length) * row

    def unique_flat_ranges(self) -> list[tuple[int, int]]:
        return [self.flat_range(p) for p in self.pieces if p.unique]


@dataclass
class ParamInfo:
    """One local parameter: where it lives (chunk, local name), what it is (spec) and the extra
    gradient reductions it needs."""

    param: nn.Parameter
    chunk: int
    local_name: str
    spec: ShardSpec
    reductions: tuple[GradReduction, ...] = ()
    decay: bool = True
    main_grad: torch.Tensor | None = field(default=None, repr=False)  # fp32 view into a gradient bucket


@dataclass
class ShardedPiece:
    """Checkpoint view of one piece: `tensor` (a view of local memory; fill it in place to load)
    holds the block of the full tensor `name` of shape `global_shape` starting at `offsets`.
    Exactly one rank in the world has primary=True for each block: the one that should write it."""

    name: str
    tensor: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    primary: bool


def sharded_pieces(tensor: torch.Tensor, spec: ShardSpec, dp_rank: int, name: str | None = None):
    """The ShardedPieces of a local tensor laid out as `spec` (data-parallel rank 0 writes)."""
    out = []
    for piece in spec.pieces:
        local, _ = spec.blocks(piece)
        out.append(ShardedPiece(name or spec.full_name, tensor[local], spec.full_shape, spec.offsets(piece),
                                piece.unique and dp_rank == 0))
    return out


def local_from_pieces(pieces: list[ShardedPiece], spec: ShardSpec) -> torch.Tensor:
    """Reassemble a local tensor from its pieces (in spec order), e.g. after a checkpoint filled them."""
    if spec.dim is None:
        return pieces[0].tensor
    return torch.cat([p.tensor for p in pieces], dim=spec.dim)


def assemble_full(pieces: list[ShardedPiece]) -> torch.Tensor:
    """A full tensor from the pieces of every rank (only primaries are read; they tile it exactly)."""
    first = pieces[0]
    full = torch.zeros(first.global_shape, dtype=first.tensor.dtype)
    for p in pieces:
        if p.primary:
            index = tuple(slice(o, o + n) for o, n in zip(p.offsets, p.tensor.shape))
            full[index] = p.tensor.detach().cpu()
    return full
