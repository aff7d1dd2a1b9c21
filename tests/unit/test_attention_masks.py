"""The attention layouts of models/attention.py against their definitions, on CPU.

The dense SDPA mask is the oracle: the O(B * S) BlockMask must equal create_block_mask's (which
evaluates the mask on all S x S pairs) tile for tile, and flex / varlen attention through our layouts
must give SDPA's outputs (same math, another reduction order: 1e-5 in fp32 on O(1) values).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from megatron_jp.models import attention
from megatron_jp.models.attention import (AttentionContext, VarlenLayout, attend, block_mask, dense_mask,
                                          document_index, varlen_boundaries)
from megatron_jp.parallel.testing import packed_segments


def tiles(bm):
    """{(b, q tile): (partial tiles, full tiles)} as sets of kv tile indices."""
    out = {}
    for b in range(bm.kv_num_blocks.shape[0]):
        for q in range(bm.kv_num_blocks.shape[2]):
            n, f = int(bm.kv_num_blocks[b, 0, q]), int(bm.full_kv_num_blocks[b, 0, q])
            out[b, q] = (set(bm.kv_indices[b, 0, q, :n].tolist()), set(bm.full_kv_indices[b, 0, q, :f].tolist()))
    return out


@pytest.mark.parametrize("S", [64, 128, 200, 384, 520])
@pytest.mark.parametrize("window", [0, 16, 128, 258, 510])  # 258, 510: tile distances 129, 255 at the edge
def test_block_mask_from_document_ranges_equals_create_block_mask(S, window):
    gen = torch.Generator().manual_seed(S * 7 + window)
    seg = packed_segments(gen, 3, S)
    seg[1] = 1  # one unpadded document
    allowed = dense_mask(seg, S, window, "cpu")[:, 0]

    def reference(b, h, q, k):
        return allowed[b, q, k]

    expected = create_block_mask(reference, 3, None, S, S, device="cpu")
    assert tiles(block_mask(seg, S, window, "cpu")) == tiles(expected)


def test_document_index_numbers_each_run_of_a_row():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0, 0], [5, 5, 5, 5, 5, 5, 5]])
    assert document_index(seg).tolist() == [[0, 0, 1, 1, 1, 2, 2], [0] * 7]


def qkv(gen, B, S, heads=4, kv_heads=2, D=16):
    q = torch.randn(B, heads, S, D, generator=gen)
    return q, torch.randn(B, kv_heads, S, D, generator=gen), torch.randn(B, kv_heads, S, D, generator=gen)


@pytest.mark.parametrize("window", [0, 24])
def test_flex_attention_through_our_block_mask_equals_masked_sdpa(window):
    gen = torch.Generator().manual_seed(1)
    seg = packed_segments(gen, 2, 200)
    q, k, v = qkv(gen, 2, 200)
    expected = attend(q, k, v, dense_mask(seg, 200, window, "cpu"))
    got = attend(q, k, v, block_mask(seg, 200, window, "cpu"))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_varlen_boundaries_are_the_documents_of_the_flattened_batch():
    seg = torch.tensor([[1, 1, 2, 0], [1, 1, 1, 1]])
    cu = varlen_boundaries(seg)
    assert cu.tolist() == [0, 2, 3, 4, 8] and cu.dtype == torch.int32


def varlen_by_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
    """varlen_attn's definition, one sequence at a time with SDPA (the real one is CUDA-only)."""
    out = torch.empty_like(q)
    left, right = window_size
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        idx = torch.arange(b - a)
        near = torch.ones(b - a, b - a, dtype=torch.bool)
        if left >= 0:
            near = (idx[None, :] >= idx[:, None] - left) & (idx[None, :] <= idx[:, None] + right)
        seq = [t[a:b].transpose(0, 1) for t in (q, k, v)]  # (H, n, D)
        out[a:b] = F.scaled_dot_product_attention(*seq, attn_mask=near, enable_gqa=enable_gqa).transpose(0, 1)
    return out


@pytest.mark.parametrize("window", [0, 24])
def test_varlen_path_equals_masked_sdpa(monkeypatch, window):
    """The glue around varlen_attn (token-major reshape, cu_seqlens, the window as (w/2, w/2), GQA)."""
    monkeypatch.setattr(attention, "varlen_attn", varlen_by_sdpa)
    gen = torch.Generator().manual_seed(2)
    seg = packed_segments(gen, 3, 96)
    q, k, v = qkv(gen, 3, 96)
    got = attend(q, k, v, VarlenLayout(varlen_boundaries(seg), 96, window))
    expected = attend(q, k, v, dense_mask(seg, 96, window, "cpu"))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # padding too: it attends to padding



def test_varlen_path_reads_token_major_q_k_v_without_a_copy(monkeypatch):
    """token_major(mask) asks for (B, S, H, D): varlen_attn then gets views of those very tensors."""
    seen = []

    def spy(q, k, v, *args, **kwargs):
        seen.extend(t.untyped_storage().data_ptr() for t in (q, k, v))
        return varlen_by_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention, "varlen_attn", spy)
    gen = torch.Generator().manual_seed(4)
    seg = packed_segments(gen, 2, 48)
    q, k, v = qkv(gen, 2, 48)  # (B, H, S, D)
    mask = VarlenLayout(varlen_boundaries(seg), 48, 0)
    assert attention.token_major(mask) and not attention.token_major(dense_mask(seg, 48, 0, "cpu"))
    q_t, k_t, v_t = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # what qkv_rope writes for varlen
    got = attend(q_t, k_t, v_t, mask, token_major=True)
    assert seen == [t.untyped_storage().data_ptr() for t in (q_t, k_t, v_t)]
    torch.testing.assert_close(got, attend(q, k, v, mask), rtol=0, atol=0)  # the same call after a copy


@pytest.mark.parametrize("preset_name", ["tiny", "tiny-modernbert"])
def test_encoder_with_varlen_attention_matches_sdpa_through_the_token_major_layout(monkeypatch, preset_name):
    """The encoder picks token-major q, k, v for varlen layers (global and windowed) and head-major for
    SDPA; loss and every gradient agree (same math, another reduction order: 1e-5 in fp32)."""
    from megatron_jp.models.config import preset
    from megatron_jp.models.encoder import build_encoder, masked_lm_loss
    from megatron_jp.ops import qkv_rope as qkv_module

    monkeypatch.setattr(attention, "varlen_attn", varlen_by_sdpa)
    layouts = []
    real = qkv_module.qkv_rope_reference
    monkeypatch.setattr(qkv_module, "qkv_rope_reference", lambda *a: layouts.append(a[-1]) or real(*a))
    gen = torch.Generator().manual_seed(5)
    seg = packed_segments(gen, 2, 40)
    seg[seg == 0] = 99  # no padding: padding rows attend differently under the two layouts' glue
    ids = torch.randint(5, 96, (2, 40), generator=gen)
    labels = torch.where(torch.rand(2, 40, generator=gen) < 0.3, ids, -100)
    results = []
    for backend in ("sdpa", "varlen"):
        cfg = preset(preset_name, vocab_size=96, attention_backend=backend)
        model = build_encoder(cfg, seed=2)
        loss = masked_lm_loss(model(ids, labels, segment_ids=seg))
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    assert layouts and any(layouts) and not all(layouts)  # sdpa head-major, varlen token-major
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-5)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

def test_the_context_builds_one_layout_per_window_and_none_for_unmasked_rows():
    seg = torch.tensor([[1, 1, 2, 2]])
    ctx = AttentionContext.build((1, 4), "cpu", seg, windows={0, 2}, backend="flex")
    assert set(ctx.masks) == {0, 2} and all(m is not None for m in ctx.masks.values())
    assert AttentionContext.build((1, 4), "cpu", None, windows={0}).mask(0) is None


def test_dense_masks_are_refused_on_cuda_naming_the_fix():
    with pytest.raises(ValueError, match="use auto, varlen or flex"):
        attention._checked_dense_mask(torch.ones(1, 4, dtype=torch.long), 4, 0, torch.device("cuda"))
