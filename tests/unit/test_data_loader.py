"""Datasets and loaders: the batch contract, blends and splits, data parallelism, resume, curricula."""

import types

import numpy as np
import pytest
import torch

from megatron_jp.config import RampUp
from megatron_jp.data import preprocess
from megatron_jp.data.datasets import BlendIndex, parse_blend, split_bounds
from megatron_jp.data.indexed import IndexedDataset
from megatron_jp.data.loader import build_data_loaders
from megatron_jp.data.tokenizers import ByteTokenizer
from megatron_jp.training.schedules import BatchSizeSchedule, LinearSchedule, StagedSchedule
from test_data_helpers import documents, write_jsonl

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two byte-level corpora with word flags: prefixes A (80 documents) and B (40, other texts)."""
    folder = tmp_path_factory.mktemp("shards")
    out = {}
    for name, docs in (("A", documents(80)), ("B", [{"text": "ＢＢＢ" + d["text"][::-1]} for d in documents(40)])):
        src = write_jsonl(folder / f"{name}.jsonl", docs)
        args = preprocess.parse_args(["--input", src, "--output-prefix", str(folder / name), "--quiet",
                                      "--tokenizer-type", "ByteTokenizer", "--word-boundaries", "unidic-lite"])
        preprocess.run(args)
        out[name] = str(folder / f"{name}_text_document")
    return out


def config(paths, **kw):
    base = dict(paths=paths, valid_paths="", split="90,10", tokenizer_type="ByteTokenizer", tokenizer_model="",
                seq_length=128, packing="best_fit", mask_prob=0.15, mask_token_prob=0.8, random_token_prob=0.1,
                whole_word_masking=True, num_workers=0)
    base.update(kw)
    return types.SimpleNamespace(**base)


def loaders(cfg, mbs=4, dp_rank=0, dp_size=1, seed=7, **kw):
    return build_data_loaders(cfg, TOK, micro_batch_size=mbs, dp_rank=dp_rank, dp_size=dp_size, seed=seed, **kw)


def unmasked(batch):
    return torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])


def pieces_of_row(batch, b):
    """[(segment id, original ids)] of row b."""
    seg, ids = batch["segment_ids"][b], unmasked(batch)[b]
    return [(int(s), ids[seg == s]) for s in torch.unique(seg) if s > 0]


@pytest.mark.parametrize("packing", ["none", "concat", "best_fit"])
def test_batches_follow_the_contract(shards, packing):
    train, _ = loaders(config(shards["A"], packing=packing))
    batch = next(train)
    assert set(batch) == {"input_ids", "labels", "segment_ids", "position_ids"}
    assert all(v.shape == (4, 128) and v.dtype == torch.int64 for v in batch.values())
    pad = batch["segment_ids"] == 0
    assert (batch["input_ids"][pad] == TOK.pad_id).all() and (batch["position_ids"][pad] == 0).all()
    special = torch.isin(unmasked(batch), torch.tensor([TOK.cls_id, TOK.sep_id, TOK.pad_id]))
    assert (batch["labels"][special] == -100).all() and (batch["labels"] != -100).any()
    for b in range(4):
        for s, ids in pieces_of_row(batch, b):
            assert ids[0] == TOK.cls_id and ids[-1] == TOK.sep_id and len(ids) >= 3
            pos = batch["position_ids"][b][batch["segment_ids"][b] == s]
            assert pos.tolist() == list(range(len(ids)))


def test_pieces_are_runs_of_real_documents(shards):
    train, _ = loaders(config(shards["A"], packing="best_fit", seq_length=64))
    corpus = IndexedDataset(shards["A"])
    texts = [bytes((corpus[i].astype(np.int64) - 5).astype(np.uint8).tolist()) for i in range(len(corpus))]
    for _ in range(3):
        batch = next(train)
        for b in range(4):
            for _, ids in pieces_of_row(batch, b):
                raw = bytes((ids[1:-1].numpy() - 5).astype(np.uint8).tolist())
                assert any(raw in t for t in texts)


def test_segments_count_documents_in_row_order(shards):
    batch = next(loaders(config(shards["A"], packing="concat", seq_length=256))[0])
    for b in range(4):
        seg = batch["segment_ids"][b]
        used = seg[seg > 0]
        assert (torch.diff(used) >= 0).all() and used[0] == 1
        assert torch.unique(used).tolist() == list(range(1, int(used.max()) + 1))


def test_data_parallel_ranks_split_one_global_stream(shards):
    cfg = config(shards["A"])
    whole = next(loaders(cfg, mbs=4)[0])
    parts = [next(loaders(cfg, mbs=2, dp_rank=r, dp_size=2)[0]) for r in range(2)]
    for key in whole:
        assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])


def test_resume_from_state_dict_gives_the_same_batches(shards):
    cfg = config(shards["A"])
    train, _ = loaders(cfg)
    for _ in range(3):
        next(train)
    state = train.state_dict()
    expected = [next(train) for _ in range(3)]
    resumed, _ = loaders(cfg)
    resumed.load_state_dict(state)
    assert state["consumed_samples"] == 12
    for want in expected:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_refuses_another_seed(shards):
    train, _ = loaders(config(shards["A"]), seed=1)
    with pytest.raises(ValueError, match="seed"):
        train.load_state_dict({"consumed_samples": 8, "seed": 2})


def test_worker_processes_give_the_same_batches(shards):
    a, _ = loaders(config(shards["A"], num_workers=0))
    b, _ = loaders(config(shards["A"], num_workers=1))
    for _ in range(3):
        x, y = next(a), next(b)
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_mask_rate_schedule_applies_per_step(shards):
    cfg = config(shards["A"], whole_word_masking=False, seq_length=256, packing="concat")
    schedule = LinearSchedule(0.3, 0.15, steps=4)
    train, _ = loaders(cfg, mbs=8, global_batch_size=16, mask_prob_at=schedule)
    rates = []
    for _ in range(10):
        batch = next(train)
        rates.append(train.last_spec.mask_prob)
        frac = (batch["labels"] != -100).sum() / (~torch.isin(unmasked(batch), torch.tensor(TOK.special_ids))).sum()
        assert abs(float(frac) - train.last_spec.mask_prob) < 0.03
    assert rates == [schedule(i // 2) for i in range(10)] and rates[0] == 0.3 and rates[-1] == 0.15


def test_seq_length_stages_change_the_batch_shape_and_resume(shards):
    cfg = config(shards["A"], num_workers=1)
    stages = StagedSchedule({0: 64, 2: 128})
    train, _ = loaders(cfg, mbs=2, seq_length_at=stages)
    shapes = [next(train)["input_ids"].shape[1] for _ in range(4)]
    assert shapes == [64, 64, 128, 128]
    state = train.state_dict()
    after = next(train)
    resumed, _ = loaders(cfg, mbs=2, seq_length_at=stages)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)["input_ids"], after["input_ids"])


def test_curricula_follow_the_step_while_the_batch_size_ramps_up(shards):
    ramp = BatchSizeSchedule(RampUp(2, 2, 2), 4)  # steps 0, 1: 2 samples; then 4
    train, _ = loaders(config(shards["A"]), mbs=2, global_batch_size=4, seq_length_at=StagedSchedule({0: 64, 2: 128}),
                       step_of=ramp.step_of)
    shapes = [next(train)["input_ids"].shape[1] for _ in range(4)]  # micro-steps of steps 0, 1, 2, 2
    assert shapes == [64, 64, 128, 128]


def test_setting_mask_rate_mid_run_drops_prefetched_batches(shards):
    train, _ = loaders(config(shards["A"], num_workers=1))
    next(train)
    train.set_mask_prob(0.4)
    next(train)
    assert train.last_spec.mask_prob == 0.4 and train.consumed_samples == 8


def test_split_keeps_train_and_valid_documents_apart(shards):
    (tr_lo, tr_hi), (va_lo, va_hi) = split_bounds(80, "90,10")
    assert (tr_lo, tr_hi, va_lo, va_hi) == (0, 72, 72, 80)
    train, valid = loaders(config(shards["A"]))
    assert set(train.mlm.sources[0].documents(128).tolist()) == set(range(72))
    assert set(valid.mlm.sources[0].documents(128).tolist()) == set(range(72, 80))


def test_valid_loader_repeats_the_same_batches(shards):
    _, valid = loaders(config(shards["A"], seq_length=64), mbs=2)
    first, second = list(valid), list(valid)
    assert len(first) == len(valid) >= 1
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))


def test_blend_draws_each_prefix_by_weight(shards):
    blend = BlendIndex([0.7, 0.3])
    d, k = blend(np.arange(10000))
    assert abs((d == 0).mean() - 0.7) < 0.001
    assert sorted(k[d == 1].tolist()) == list(range((d == 1).sum()))  # each dataset's samples in order, no gaps
    train, _ = loaders(config(f"0.7 {shards['A']} 0.3 {shards['B']}"))
    batch = next(train)
    assert batch["input_ids"].shape == (4, 128)


def test_blend_string_errors_name_the_problem():
    assert parse_blend("one/prefix") == [(1.0, "one/prefix")]
    assert parse_blend("3 a 1 b") == [(0.75, "a"), (0.25, "b")]
    with pytest.raises(ValueError, match="odd number"):
        parse_blend("0.5 a 0.5")
    with pytest.raises(ValueError, match="not a weight"):
        parse_blend("a b")


def test_whole_word_masking_without_word_shard_says_what_to_run(tmp_path):
    from test_data_helpers import write_shard

    prefix = write_shard(str(tmp_path / "plain"), [[10, 11, 12]] * 20)
    with pytest.raises(ValueError, match="--word-boundaries"):
        loaders(config(prefix))
