"""Megatron indexed shards: our writer/reader, megatron-core compatibility, refusal of bad files."""

import os
import struct
import warnings

import numpy as np
import pytest

from megatron_jp.data import indexed
from megatron_jp.data.indexed import IndexedDataset, IndexedDatasetWriter, ShardFormatError
from test_data_helpers import write_shard

DOCS = [[5, 6, 7], [8], [9, 10, 11, 12, 60000], [13, 14]]


def _mcore():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def test_roundtrip_keeps_documents_and_dtype(tmp_path):
    ds = IndexedDataset(write_shard(str(tmp_path / "s"), DOCS))
    assert len(ds) == 4 and ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(4)] == DOCS
    assert ds.doc_lengths.tolist() == [3, 1, 5, 2]
    assert ds.get(2, offset=1, length=2).tolist() == [10, 11]


def test_optimal_dtype_is_uint16_below_65500_else_int32():
    assert indexed.optimal_dtype(65499) == np.uint16 and indexed.optimal_dtype(65500) == np.int32


def test_writer_refuses_ids_outside_the_dtype(tmp_path):
    w = IndexedDatasetWriter(str(tmp_path / "s"), np.uint16)
    with pytest.raises(ValueError, match="outside the range"):
        w.add_document(np.array([70000]))
    w.abort()


def test_unfinished_writer_leaves_no_complete_shard(tmp_path):
    prefix = str(tmp_path / "s")
    w = IndexedDatasetWriter(prefix, np.uint16)
    w.add_document(np.arange(10))
    w.finalize()
    assert not indexed.exists(prefix)  # finalized but not committed: temporary names only
    w.abort()
    assert os.listdir(tmp_path) == []


def test_megatron_core_reads_our_shards(tmp_path):
    mcore = _mcore()
    prefix = write_shard(str(tmp_path / "ours"), DOCS)
    theirs = mcore.IndexedDataset(prefix)
    assert len(theirs) == 4
    assert [theirs[i].tolist() for i in range(4)] == DOCS
    assert theirs.index.dtype == np.uint16
    assert theirs.document_indices.tolist() == [0, 1, 2, 3, 4]


def megatron_core_builder(mcore, prefix: str, dtype):
    """megatron-core's own writer, holding DOCS one document each (not yet finalized)."""
    import torch

    builder = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in DOCS:
        builder.add_item(torch.tensor(doc))
        builder.end_document()
    return builder


def test_we_read_shards_written_by_megatron_core(tmp_path):
    mcore = _mcore()
    import torch

    prefix = str(tmp_path / "theirs")
    builder = megatron_core_builder(mcore, prefix, np.int32)
    builder.add_item(torch.tensor([1, 2]))  # a two-sentence document, as with --split-sentences
    builder.add_item(torch.tensor([3]))
    builder.end_document()
    builder.finalize(prefix + ".idx")
    ours = IndexedDataset(prefix)
    assert ours.dtype == np.int32
    assert [ours[i].tolist() for i in range(len(ours))] == DOCS + [[1, 2, 3]]


def test_our_bytes_equal_megatron_core_bytes(tmp_path):
    mcore = _mcore()
    import torch

    prefix = str(tmp_path / "theirs")
    megatron_core_builder(mcore, prefix, np.uint16).finalize(prefix + ".idx")
    ours = write_shard(str(tmp_path / "ours"), DOCS)
    for ext in (".bin", ".idx"):
        assert open(ours + ext, "rb").read() == open(prefix + ext, "rb").read()


def _corrupt_header(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("offset, data, message", [
    (0, b"XXIDIDX\x00\x00", "bad magic"),
    (9, struct.pack("<Q", 2), "version 2"),
    (17, b"\x63", "unknown dtype code 99"),
])
def test_reader_refuses_bad_header_naming_the_file(tmp_path, offset, data, message):
    prefix = write_shard(str(tmp_path / "s"), DOCS)
    _corrupt_header(prefix + ".idx", offset, data)
    with pytest.raises(ShardFormatError, match=message) as err:
        IndexedDataset(prefix)
    assert prefix + ".idx" in str(err.value)


def test_reader_refuses_an_unexpected_dtype(tmp_path):
    prefix = write_shard(str(tmp_path / "s"), DOCS)
    with pytest.raises(ShardFormatError, match="expected uint8"):
        IndexedDataset(prefix, expect_dtype=np.uint8)


def test_reader_refuses_a_truncated_bin(tmp_path):
    prefix = write_shard(str(tmp_path / "s"), DOCS)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(6)
    with pytest.raises(ShardFormatError, match="truncated .bin") as err:
        IndexedDataset(prefix)
    assert prefix + ".bin" in str(err.value)


def test_reader_refuses_a_truncated_idx(tmp_path):
    prefix = write_shard(str(tmp_path / "s"), DOCS)
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(40)
    with pytest.raises(ShardFormatError, match="truncated or corrupt index"):
        IndexedDataset(prefix)


def test_word_shard_with_other_lengths_is_refused(tmp_path):
    prefix = write_shard(str(tmp_path / "s"), DOCS, words=[[1, 0, 1], [1], [1, 1, 0, 0, 1], [1]])
    with pytest.raises(ShardFormatError, match="sequence lengths differ") as err:
        indexed.open_words(prefix, IndexedDataset(prefix))
    assert "s_words.idx" in str(err.value)


def test_missing_word_shard_says_how_to_build_it(tmp_path):
    prefix = write_shard(str(tmp_path / "s"), DOCS)
    with pytest.raises(ShardFormatError, match="--word-boundaries"):
        indexed.open_words(prefix, IndexedDataset(prefix))


def test_merge_concatenates_documents_in_order(tmp_path):
    a = write_shard(str(tmp_path / "a"), DOCS[:2])
    b = write_shard(str(tmp_path / "b"), DOCS[2:])
    merged = indexed.merge([a, b], str(tmp_path / "m"))
    assert [merged[i].tolist() for i in range(len(merged))] == DOCS


def test_merge_refuses_mixed_dtypes(tmp_path):
    a = write_shard(str(tmp_path / "a"), DOCS, dtype=np.uint16)
    b = write_shard(str(tmp_path / "b"), DOCS, dtype=np.int32)
    with pytest.raises(ShardFormatError, match="different dtypes"):
        indexed.merge([a, b], str(tmp_path / "m"))
    assert not indexed.exists(str(tmp_path / "m"))


def test_merge_tool_merges_token_and_word_shards(tmp_path):
    from test_data_helpers import run_tool

    flags = [[1] * len(d) for d in DOCS]
    write_shard(str(tmp_path / "p0"), DOCS[:3], words=flags[:3])
    write_shard(str(tmp_path / "p1"), DOCS[3:], words=flags[3:])
    proc = run_tool("merge_datasets.py", "--input", tmp_path, "--output-prefix", tmp_path / "out" / "all")
    assert proc.returncode == 0, proc.stderr
    merged = IndexedDataset(str(tmp_path / "out" / "all"))
    assert [merged[i].tolist() for i in range(4)] == DOCS
    merged.check_words(IndexedDataset(str(tmp_path / "out" / "all_words")))


def test_pickled_reader_reopens_the_mmap(tmp_path):
    import pickle

    ds = IndexedDataset(write_shard(str(tmp_path / "s"), DOCS))
    blob = pickle.dumps(ds)
    assert len(blob) < 500
    assert pickle.loads(blob)[2].tolist() == DOCS[2]
