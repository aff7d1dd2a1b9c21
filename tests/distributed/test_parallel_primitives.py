"""Every tensor-parallel primitive matches its unsharded module: outputs and every gradient.

One 2-rank gloo job (primitive_jobs.py) runs all checks; each test below asserts one claim on both
ranks' shards. Tolerance: the sharded computation reassociates fp32 sums (a matmul's inner sum split
into per-rank partial sums, then all-reduced; log-sum-exp over vocabulary halves), which moves
results by a few ulps, ~1e-7 relative. The error is held to 1e-5 of the largest expected value (a
scale-relative bound, so near-zero elements do not need an absolute floor): two orders of margin,
while a wrong shard, a missing reduction or a double count gives errors of order 1.
"""

import pytest
import torch

from megatron_jp.parallel.testing import spawn
from primitive_jobs import primitives_job

SCALE_RTOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("primitives")
    spawn(primitives_job, 2, (str(out),), timeout_s=180)
    return [torch.load(out / f"primitives_rank{r}.pt") for r in range(2)]


def assert_matches(results, claim):
    for rank, per_rank in enumerate(results):
        for label, got, want in per_rank[claim]:
            assert got.shape == want.shape and got.dtype == want.dtype, f"rank {rank} {label}"
            if not got.is_floating_point():
                assert torch.equal(got, want), f"rank {rank} {label}"
                continue
            error, scale = (got - want).abs().max().item(), want.abs().max().item()
            assert error <= SCALE_RTOL * scale, f"rank {rank} {label}: error {error:.3g} vs scale {scale:.3g}"


def test_column_parallel_linear_matches_unsharded(results):
    assert_matches(results, "column_parallel_linear")


def test_row_parallel_linear_matches_unsharded(results):
    assert_matches(results, "row_parallel_linear")


def test_vocab_parallel_embedding_matches_unsharded(results):
    assert_matches(results, "vocab_parallel_embedding")


def test_vocab_parallel_cross_entropy_and_argmax_match_unsharded(results):
    assert_matches(results, "vocab_parallel_cross_entropy")


def test_chunked_vocab_parallel_decoder_and_loss_match_unsharded(results):
    assert_matches(results, "vocab_parallel_linear_cross_entropy")


def test_attention_with_kv_heads_split_matches_unsharded(results):
    assert_matches(results, "attention_gqa_kv_split")


def test_attention_with_kv_heads_replicated_when_tp_exceeds_kv_heads_matches_unsharded(results):
    # 4 query heads, 1 KV head, tp=2: the KV head lives on both ranks; its gradient is summed
    assert_matches(results, "attention_gqa_kv_replicated")


def test_swiglu_mlp_sharded_by_halves_matches_unsharded(results):
    assert_matches(results, "swiglu_mlp")


def test_geglu_mlp_sharded_by_halves_matches_unsharded(results):
    assert_matches(results, "geglu_mlp")


def test_sequence_parallel_block_matches_unsharded(results):
    assert_matches(results, "sequence_parallel_block_rmsnorm")


def test_sequence_parallel_block_with_layernorm_and_local_window_matches_unsharded(results):
    assert_matches(results, "sequence_parallel_block_layernorm_window")


def test_dropout_masks_differ_on_tensor_parallel_peers_inside_tensor_parallel_regions_only(results):
    assert_matches(results, "dropout_rng")
