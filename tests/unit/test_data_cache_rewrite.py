"""Issue 19, items 10 and 16 (index cache): a shard rewritten at the same size with its mtime put back
is never read through the stale rows of the cache; a full disk while building names the folder and
data.cache_dir; the cached start stays cheap."""

import errno
import os
import time

import numpy as np
import pytest

from megatron_jp.data.index_cache import CacheError, IndexCache
from megatron_jp.data.indexed import bin_path, idx_path
from test_data_helpers import loader_config, write_shard
from test_data_index_cache import first_batches, same


def docs(seed: int):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 261, size=int(k)) for k in rng.geometric(1 / 40, size=300)]


def keep_times(prefix: str):
    return {path: os.stat(path) for path in (idx_path(prefix), bin_path(prefix))}


def restore_times(times: dict):
    for path, st in times.items():
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def same_lengths_other_tokens(seed: int):
    return [np.random.default_rng(seed).integers(5, 261, size=len(d)) for d in docs(0)]


def test_a_shard_rewritten_in_place_with_its_mtime_restored_gets_new_rows(tmp_path):
    prefix = write_shard(str(tmp_path / "s"), docs(0))
    cfg = loader_config(prefix, tmp_path / "cache")
    _, before = first_batches(cfg)
    times = keep_times(prefix)
    other = write_shard(str(tmp_path / "other"), same_lengths_other_tokens(1))
    with open(bin_path(prefix), "r+b") as f:  # same size, same offsets: only the tokens differ
        f.write(open(bin_path(other), "rb").read())
    restore_times(times)
    assert os.path.getsize(bin_path(prefix)) == times[bin_path(prefix)].st_size
    train, after = first_batches(cfg)
    assert train.mlm.cache.built >= 1 and not same(before, after)


def test_a_shard_replaced_by_rename_with_size_and_mtime_restored_gets_new_rows(tmp_path):
    prefix = write_shard(str(tmp_path / "s"), docs(0))
    cfg = loader_config(prefix, tmp_path / "cache")
    _, before = first_batches(cfg)
    times = keep_times(prefix)
    other = write_shard(str(tmp_path / "other"), [d[::-1] for d in docs(0)][::-1])  # other order, same sizes
    os.replace(idx_path(other), idx_path(prefix))
    os.replace(bin_path(other), bin_path(prefix))
    restore_times(times)
    train, after = first_batches(cfg)
    assert train.mlm.cache.built >= 1 and not same(before, after)


def test_the_cached_start_maps_without_building_and_stays_under_two_seconds(tmp_path):
    cfg = loader_config(write_shard(str(tmp_path / "s"), docs(0)), tmp_path / "cache")
    first_batches(cfg, n=1)
    begin = time.perf_counter()
    train, _ = first_batches(cfg, n=1)
    # a bound, not a benchmark: the identity adds one stat per file; 2 s is the limit on a loaded CI machine
    assert train.mlm.cache.built == 0 and time.perf_counter() - begin < 2.0


def test_a_full_disk_while_building_names_the_folder_and_data_cache_dir(tmp_path):
    def build(writer):
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = IndexCache(str(tmp_path / "cache"))
    with pytest.raises(CacheError, match=rf"index cache folder {tmp_path / 'cache'}: No space left.*data.cache_dir"):
        cache.get_or_build("rows", {"k": 1}, build)
    assert [p for p in os.listdir(tmp_path / "cache") if ".tmp-" in p] == []  # nothing half-built left
