"""Index cache: built once, mapped after; stale, truncated or damaged entries rebuilt; one builder at a time;
streamed packing equal to one-shot packing; the per-epoch bijection; blends of many shards."""

import json
import multiprocessing
import os
import time

import numpy as np
import pytest
import torch

from megatron_jp.data import index_cache, packing, sources
from megatron_jp.data.datasets import BlendIndex
from megatron_jp.data.index_cache import CacheError, IndexCache
from megatron_jp.data.indexed import IndexedDataset
from megatron_jp.data.loader import build_data_loaders
from megatron_jp.data.permutation import FeistelPermutation
from megatron_jp.data.tokenizers import ByteTokenizer
from test_data_helpers import loader_config, write_shard

TOK = ByteTokenizer()


def shard(folder, n=300, seed=0, name="s"):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(5, 261, size=int(k)) for k in rng.geometric(1 / 40, size=n)]
    return write_shard(str(folder / name), docs)




def first_batches(cfg, n=3):
    train, _ = build_data_loaders(cfg, TOK, micro_batch_size=4, dp_rank=0, dp_size=1, seed=3)
    return train, [next(train) for _ in range(n)]


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def rows_entries(cache_dir):
    return sorted(p for p in os.listdir(cache_dir) if p.startswith("rows-") and "." not in p)


def test_second_start_maps_the_cache_without_building(tmp_path):
    cfg = loader_config(shard(tmp_path), tmp_path / "cache")
    first, want = first_batches(cfg)
    second, got = first_batches(cfg)
    assert first.mlm.cache.built == 2 and second.mlm.cache.built == 0 and second.mlm.cache.mapped == 2
    assert same(want, got)


def test_cache_is_rebuilt_when_a_shard_changes(tmp_path):
    cfg = loader_config(shard(tmp_path), tmp_path / "cache")
    _, before = first_batches(cfg)
    time.sleep(0.01)
    shard(tmp_path, seed=1)  # same prefix, other documents
    train, after = first_batches(cfg)
    assert train.mlm.cache.built == 2 and len(rows_entries(tmp_path / "cache")) == 4
    assert not same(before, after)


@pytest.mark.parametrize("damage", ["truncate", "overwrite_end", "bad_manifest", "missing_array"])
def test_damaged_entry_is_detected_and_rebuilt_never_used(tmp_path, damage, capsys):
    cfg = loader_config(shard(tmp_path), tmp_path / "cache")
    _, want = first_batches(cfg)
    entry = tmp_path / "cache" / rows_entries(tmp_path / "cache")[0]
    offsets = entry / "offset.bin"
    if damage == "truncate":
        os.truncate(offsets, os.path.getsize(offsets) - 8)
    elif damage == "overwrite_end":
        with open(offsets, "r+b") as f:
            f.seek(-8, 2)
            f.write(b"\xff" * 8)
    elif damage == "bad_manifest":
        (entry / "manifest.json").write_text("{not json")
    else:
        os.unlink(offsets)
    train, got = first_batches(cfg)
    assert train.mlm.cache.built == 1 and "unusable" in capsys.readouterr().err
    assert same(want, got)


def test_full_verify_finds_a_byte_flipped_in_the_middle(tmp_path):
    cfg = loader_config(shard(tmp_path, n=3000), tmp_path / "cache", seq_length=32)
    first_batches(cfg, n=1)
    entry = str(tmp_path / "cache" / rows_entries(tmp_path / "cache")[0])
    assert index_cache.verify(entry) == []
    path = os.path.join(entry, "offset.bin")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    assert index_cache.verify(entry) == ["offset"]


def _slow_build(root, marker):
    def build(writer):
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        writer.array("x", np.int64).append(np.arange(10))
        return {"n": 10}

    entry = IndexCache(root, log=lambda msg: None).get_or_build("test", {"k": 1}, build)
    assert np.asarray(entry.arrays["x"]).tolist() == list(range(10))


def test_one_process_builds_while_the_others_wait_then_map_it(tmp_path):
    ctx = multiprocessing.get_context("fork")
    marker = str(tmp_path / "builders")
    procs = [ctx.Process(target=_slow_build, args=(str(tmp_path / "cache"), marker)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(open(marker).read().split()) == 1


def test_racing_builders_without_a_lock_leave_one_complete_entry(tmp_path):
    cache = IndexCache(str(tmp_path), log=lambda msg: None)

    def build(writer):
        writer.array("x", np.int64).append(np.arange(5))
        return {}

    cache._build("test", {"k": 2}, build)
    cache._build("test", {"k": 2}, build)  # the second rename finds the entry in place: keeps it
    assert np.asarray(cache.load("test", {"k": 2}).arrays["x"]).tolist() == list(range(5))
    assert [p for p in os.listdir(tmp_path) if ".tmp" in p] == []


def test_the_next_builder_removes_what_a_killed_builder_left(tmp_path):
    cache = IndexCache(str(tmp_path), log=lambda msg: None)
    leftover = cache.path_of("test", {"k": 3}) + ".tmp-otherhost-123"
    os.makedirs(leftover)
    open(os.path.join(leftover, "x.bin"), "wb").write(b"partial")

    def build(writer):
        writer.array("x", np.int64).append(np.arange(3))
        return {}

    assert np.asarray(cache.get_or_build("test", {"k": 3}, build).arrays["x"]).tolist() == [0, 1, 2]
    assert not os.path.exists(leftover)


def test_unwritable_cache_dir_is_named_with_the_key_to_set(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = loader_config(shard(tmp_path), blocker / "cache")
    with pytest.raises(CacheError, match="data.cache_dir"):
        first_batches(cfg)


def test_cache_defaults_to_a_folder_next_to_the_first_shard(tmp_path):
    cfg = loader_config(shard(tmp_path), "")
    first_batches(cfg, n=1)
    assert len(rows_entries(tmp_path / "index-cache")) == 2


@pytest.mark.parametrize("method", packing.PACKING_METHODS)
@pytest.mark.parametrize("keep_empty", [False, True])
def test_streamed_packing_equals_one_shot_packing(method, keep_empty):
    rng = np.random.default_rng(5)
    lengths = np.where(rng.random(3000) < 0.05, 0, rng.geometric(1 / 30, size=3000))
    offsets = np.cumsum(lengths) - lengths
    whole = packing.build_packed_index(method, np.arange(3000), lengths, 64, keep_empty)
    packer, chunks = packing.StreamPacker(method, 64, keep_empty, window=100), []
    cuts = np.sort(rng.choice(3000, size=12, replace=False)).tolist()
    for lo, hi in zip([0] + cuts, cuts + [3000]):
        chunks.append(packer.add(offsets[lo:hi], lengths[lo:hi]))
    chunks.append(packer.finish())
    if method == "best_fit":  # the one-shot reference with the same window
        whole = packing.pack_best_fit(np.arange(3000), lengths, 64, window=100, keep_empty=keep_empty)
    got_offsets = np.concatenate([c.offset for c in chunks])
    assert np.array_equal(got_offsets, offsets[whole.doc] + whole.start)
    assert np.array_equal(np.concatenate([c.length for c in chunks]), whole.length)
    assert np.array_equal(np.concatenate([[0]] + [c.row_ends for c in chunks]), whole.row_ptr)


def test_cached_rows_are_the_packing_of_the_block_shuffled_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DOC_BLOCK", 64)  # several blocks in a small shard
    ds = IndexedDataset(shard(tmp_path, n=500))
    src = sources.PackedSource(ds.prefix, (10, 490), "concat", 3, 7, False, IndexCache(str(tmp_path / "c")))
    rows = src.index(64)
    order = 10 + sources.document_order(480, 3, 7)
    assert sorted(order.tolist()) == list(range(10, 490)) and not np.array_equal(order, np.sort(order))
    whole = packing.build_packed_index("concat", order, ds.doc_lengths[order], 64)
    assert np.array_equal(rows.offset, ds.doc_offsets[whole.doc] + whole.start)
    assert np.array_equal(rows.row_ptr, whole.row_ptr)
    assert rows.summary["documents"] == 480 and rows.summary["tokens"] == int(ds.doc_lengths[10:490].sum())


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_epoch_permutation_is_a_bijection_of_any_size(n):
    assert sorted(FeistelPermutation(n, [1, 2])(np.arange(n)).tolist()) == list(range(n))


def test_epoch_permutations_differ_and_look_uniform():
    n = 20000
    a, b = FeistelPermutation(n, [1, 2])(np.arange(n)), FeistelPermutation(n, [1, 3])(np.arange(n))
    assert (a == b).mean() < 0.01
    # rank correlation with the identity ~ N(0, 1/n): |r| < 5 sigma; each decile of positions lands evenly
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 5 / np.sqrt(n)
    counts = np.bincount(a[: n // 10] * 10 // n, minlength=10)
    assert counts.min() > 0.8 * n / 100 and counts.max() < 1.2 * n / 100


def test_blend_of_hundreds_of_shards_keeps_every_weight_within_one_percent(tmp_path):
    weights = np.arange(1, 301, dtype=np.float64)
    weights /= weights.sum()  # from 2.2e-5 to 6.6e-3
    in_memory = BlendIndex(weights)
    assert in_memory.period > 1 << 16
    assert np.all(np.abs(in_memory.realized_weights - weights) <= 0.01 * weights)
    cached = BlendIndex(weights, cache=IndexCache(str(tmp_path)))
    assert isinstance(cached.dataset, np.memmap)
    idx = np.arange(0, 10 * cached.period, 997)
    assert all(np.array_equal(x, y) for x, y in zip(cached(idx), in_memory(idx)))


def test_summary_counts_documents_tokens_rows_and_epochs_per_source(tmp_path):
    a, b = shard(tmp_path, n=200, name="a"), shard(tmp_path, n=100, seed=1, name="b")
    cfg = loader_config(f"3 {a} 1 {b}", tmp_path / "cache", split="100,0")
    train, _ = build_data_loaders(cfg, TOK, micro_batch_size=4, dp_rank=0, dp_size=1, seed=3, global_batch_size=8)
    table = train.summary(100)
    line = next(row for row in table.splitlines() if row.endswith(a))
    rows = train.mlm.sources[0].index(64).num_rows
    epochs = 100 * 8 * 0.75 / rows
    assert f"{epochs:.2f}" in line and " 200 " in line
    assert f"{int(IndexedDataset(a).doc_lengths.sum()):,}" in line and f"{rows:,}" in line


def test_manifest_repeats_the_key_and_counts(tmp_path):
    cfg = loader_config(shard(tmp_path), tmp_path / "cache")
    first_batches(cfg, n=1)
    entry = tmp_path / "cache" / rows_entries(tmp_path / "cache")[0]
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["key"]["seq_length"] == 64 and manifest["key"]["shard"]["prefix"].endswith("/s")
    assert set(manifest["summary"]) >= {"documents", "empty_documents", "tokens", "rows", "pieces"}


def test_build_index_tool_builds_what_training_then_maps(tmp_path, tool):
    from megatron_jp.config import load_config
    from megatron_jp.training.schedules import Curricula

    prefix = shard(tmp_path)
    overrides = ["--model.preset", "tiny", "--data.paths", prefix, "--data.tokenizer_type", "ByteTokenizer",
                 "--data.seq_length", "64", "--data.seq_length_stages", "0:32,10:64", "--train.steps", "20",
                 "--data.num_workers", "0"]
    assert tool("build_index")(overrides + ["--verify"]) == 0
    cfg = load_config(None, overrides)
    curricula = Curricula.from_config(cfg)
    train, _ = build_data_loaders(cfg.data, TOK, micro_batch_size=cfg.train.micro_batch_size, dp_rank=0, dp_size=1,
                                  seed=cfg.train.seed, global_batch_size=cfg.train.global_batch_size,
                                  seq_length_at=curricula.seq_length, step_of=curricula.batch.step_of)
    next(train)
    assert train.mlm.cache.built == 0 and train.mlm.cache.mapped == 3
