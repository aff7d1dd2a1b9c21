"""Where each query may attend, for every attention kernel the encoder runs.

A batch row may pack several documents: `segment_ids` numbers them (0 = padding, which attends only
to padding) and each id forms one contiguous run of its row (the loader's layout, and that of
right-padded Hugging Face batches). Attention never crosses a document; local layers also see only
+-window/2 tokens. The layout is turned into what the kernel takes, once per micro-batch and shared
by every layer (and every pipeline chunk) through an AttentionContext:

  sdpa    a dense (B, 1, S, S) bool mask. The CPU path and the test oracle; refused on CUDA, where it
          rules out FlashAttention and, with GQA, falls back to the math kernel and an S x S matrix.
  flex    a BlockMask of 128 x 128 tiles built from the documents' block ranges in O(B * S)
          (create_block_mask would evaluate the mask on all S x S pairs); empty tiles are skipped.
  varlen  no mask at all: FlashAttention over the concatenated documents (torch's varlen_attn),
          given their cumulative lengths (cu_seqlens) and the window.

"auto" picks sdpa on CPU, and on CUDA varlen where the installed torch has it, else flex.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

try:  # torch >= 2.10 on CUDA: FlashAttention for packed sequences
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # older torch: flex_attention covers packed documents
    varlen_attn = None

FLEX_BLOCK = 128  # flex_attention's tile


@functools.cache
def compiled_flex_attention():
    """flex_attention is fast only compiled; eager runs (CPU, tests) use its reference path."""
    if not torch.cuda.is_available():
        return flex_attention
    return torch.compile(flex_attention, dynamic=True)


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its document: 0 at every change of segment id."""
    S = segment_ids.shape[1]
    index = torch.arange(S, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


def document_index(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) int64: 0, 1, 2, ... numbering the runs of equal segment ids of each row (non-decreasing)."""
    change = torch.ones_like(segment_ids, dtype=torch.bool)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return change.cumsum(dim=1) - 1


# ----------------------------------------------------------------------------- layouts per kernel


def dense_mask(segment_ids: torch.Tensor | None, S: int, window: int, device) -> torch.Tensor:
    """(B or 1, 1, S, S) bool: same document, and within +-window/2 when window > 0."""
    allowed = torch.ones(1, 1, S, S, dtype=torch.bool, device=device)
    if segment_ids is not None:
        seg = segment_ids
        allowed = seg[:, None, :, None] == seg[:, None, None, :]
    if window:
        idx = torch.arange(S, device=device)
        allowed = allowed & ((idx[:, None] - idx[None, :]).abs() <= window // 2)
    return allowed


def block_mask(segment_ids: torch.Tensor | None, S: int, window: int, device) -> BlockMask:
    """The BlockMask of dense_mask's pattern, from block-level document ranges.

    Document indices are non-decreasing along a row, so a tile of rows [a_i, b_i] and columns
    [a_j, b_j] holds an allowed pair iff (i = j) or the last document of the earlier tile is the first
    of the later one and the tiles' nearest tokens are within the window; it is full iff both tiles lie
    in one document, inside the sequence, and their farthest tokens are within the window. Equal, tile
    for tile, to create_block_mask on the same mask (tests/unit/test_attention_masks.py).
    """
    B = segment_ids.shape[0] if segment_ids is not None else 1
    doc = document_index(segment_ids) if segment_ids is not None else torch.zeros(1, S, dtype=torch.long,
                                                                                   device=device)
    n = -(-S // FLEX_BLOCK)
    first = torch.arange(n, device=device) * FLEX_BLOCK  # a_j
    last = torch.clamp(first + FLEX_BLOCK, max=S) - 1  # b_j, the last token inside the sequence
    lo, hi = doc[:, first], doc[:, last]  # (B, n): documents at both ends of each tile
    reach = window // 2 if window else S  # global layers: every distance is within reach
    q, k = torch.arange(n, device=device)[:, None], torch.arange(n, device=device)[None, :]
    earlier_hi = torch.where(q < k, hi[:, :, None], hi[:, None, :])  # (B, n, n): last doc of the earlier tile
    later_lo = torch.where(q < k, lo[:, None, :], lo[:, :, None])
    nearest = torch.where(q == k, 0, torch.where(q < k, first[None, :] - last[:, None], first[:, None] - last[None, :]))
    farthest = torch.maximum(last[None, :] - first[:, None], last[:, None] - first[None, :])
    some = (q == k) | ((earlier_hi == later_lo) & (nearest <= reach))
    one_doc = (lo == hi)[:, :, None] & (lo == hi)[:, None, :] & (lo[:, :, None] == lo[:, None, :])
    inside = (last - first == FLEX_BLOCK - 1)
    full = one_doc & inside[None, :, None] & inside[None, None, :] & (farthest <= reach)
    partial = some & ~full

    def counts_and_indices(tiles):
        # stable sort puts each row's chosen tiles first, in column order; the rest is padding
        order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True)
        return tiles.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    def allowed(b, h, q_idx, kv_idx):
        same = doc[b, q_idx] == doc[b, kv_idx]
        return same & ((q_idx - kv_idx).abs() <= reach) if window else same

    return BlockMask.from_kv_blocks(*counts_and_indices(partial), *counts_and_indices(full), FLEX_BLOCK,
                                    mask_mod=allowed, seq_lengths=(S, S))


@dataclass(frozen=True)
class VarlenLayout:
    """The documents of a micro-batch as one concatenated sequence, for varlen_attn: boundaries in
    the flattened (B * S) token order; `window` > 0 on local layers. `max_seqlen` is the row length,
    an upper bound of every document: FlashAttention only sizes its grid by it (tiles past a
    document's end exit at once), and a value fixed per shape keeps compiled code from specialising
    on the data."""

    cu_seqlens: torch.Tensor  # (documents + 1,) int32
    max_seqlen: int
    window: int = 0


def varlen_boundaries(segment_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens (int32) of a (B, S) layout, every run of a row one sequence. Runs on the host
    before the batch is copied (the loader's CPU tensors): no device synchronisation."""
    B, S = segment_ids.shape
    seg = segment_ids.cpu()
    change = torch.ones(B, S, dtype=torch.bool)
    change[:, 1:] = seg[:, 1:] != seg[:, :-1]
    starts = torch.nonzero(change.reshape(-1)).reshape(-1)
    return torch.cat([starts, torch.tensor([B * S])]).to(torch.int32)


# ----------------------------------------------------------------------------- the context


@dataclass
class AttentionContext:
    """What every layer needs about the batch layout, built once per micro-batch."""

    positions: torch.Tensor  # (B, S) position of each token inside its document
    masks: dict = field(default_factory=dict)  # window -> what core attention takes (see module doc)

    def mask(self, window: int):
        return self.masks[window]

    @classmethod
    def build(cls, input_shape, device, segment_ids=None, position_ids=None, backend: str = "auto",
              windows=(0,), cu_seqlens: torch.Tensor | None = None) -> "AttentionContext":
        """`cu_seqlens` comes computed on the host (varlen_boundaries); without it, the varlen
        boundaries are computed here at the cost of one device synchronisation."""
        B, S = input_shape
        device = torch.device(device)
        if position_ids is None:
            position_ids = (positions_from_segments(segment_ids) if segment_ids is not None
                            else torch.arange(S, device=device).expand(B, S))
        backend = resolve_backend(backend, device)
        masks = {}
        for window in windows:
            if segment_ids is None and window == 0:
                masks[window] = None  # one unpadded document per row: every kernel's fastest path
            elif backend == "varlen":
                cu = cu_seqlens if cu_seqlens is not None else varlen_boundaries(segment_ids)
                masks[window] = VarlenLayout(cu.to(device, non_blocking=True), S, window)
            elif backend == "flex":
                masks[window] = block_mask(segment_ids, S, window, device)
            else:
                masks[window] = _checked_dense_mask(segment_ids, S, window, device)
        return cls(positions=position_ids, masks=masks)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "sdpa"
    return "varlen" if varlen_attn is not None else "flex"


def _checked_dense_mask(segment_ids, S: int, window: int, device: torch.device):
    if device.type == "cuda":
        raise ValueError("model.attention_backend sdpa on CUDA with packed documents or windows would build a "
                         "dense (B, 1, S, S) mask, which rules out FlashAttention (and with GQA falls back to "
                         "the math kernel, an S x S matrix per head): use auto, varlen or flex")
    return dense_mask(segment_ids, S, window, device)


# ----------------------------------------------------------------------------- the kernels


def token_major(mask) -> bool:
    """Whether the kernel `mask` calls for takes q, k, v token-major, (B, S, H, D): varlen_attn reads
    them as (B * S, H, D), a free view of that layout (ops/qkv_rope.py writes it), where the
    head-major (B, H, S, D) of SDPA and flex would cost a transpose copy of each."""
    return isinstance(mask, VarlenLayout)


def attend(q, k, v, mask, dropout: float = 0.0, token_major: bool = False) -> torch.Tensor:
    """q (B, Hq, S, D), k and v (B, Hk, S, D), or with `token_major` (B, S, H, D) each -> (B, S, Hq, D),
    with the kernel `mask` calls for. GQA: every kernel broadcasts the shared K/V heads instead of
    materialising repeats."""
    if isinstance(mask, VarlenLayout):
        return _varlen(q, k, v, mask, token_major)
    if token_major:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    gqa = k.shape[1] != q.shape[1]
    if isinstance(mask, BlockMask):
        return compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=gqa).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)
    return out.transpose(1, 2)


def _varlen(q, k, v, mask: VarlenLayout, token_major: bool) -> torch.Tensor:
    if not token_major:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, S, H, D): the reshape below copies
    B, S, H, D = q.shape
    tokens = [t.reshape(B * S, t.shape[2], D) for t in (q, k, v)]  # (B * S, H, D)
    half = mask.window // 2 if mask.window else -1
    out = varlen_attn(*tokens, mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen,
                      window_size=(half, half), enable_gqa=k.shape[2] != H)
    return out.view(B, S, H, D)
