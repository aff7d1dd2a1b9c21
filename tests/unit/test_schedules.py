"""Learning-rate schedules, curricula and the FLOPs/MFU formula."""

import math

import pytest
import torch

from megatron_jp.config import ConfigError, OptimConfig, RampUp, Stages
from megatron_jp.models.config import preset
from megatron_jp.training.flops import effective_seq_length, flops_per_token, matmul_params, mfu
from megatron_jp.training.schedules import BatchSizeSchedule, StagedSchedule, global_batch_size, learning_rate


def lrs(schedule, steps=100, **kw):
    optim = OptimConfig(lr=1.0, min_lr=0.1, schedule=schedule, warmup_steps=10, **kw)
    return [learning_rate(s, optim, steps) for s in range(steps)]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant", "wsd"])
def test_every_schedule_warms_up_linearly_to_the_peak(schedule):
    values = lrs(schedule)
    assert values[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert values[10] == pytest.approx(1.0)


def test_linear_and_cosine_decay_to_min_lr_monotonically():
    for schedule in ("linear", "cosine"):
        values = lrs(schedule, steps=101)
        assert all(a >= b for a, b in zip(values[10:], values[11:]))
        assert values[-1] == pytest.approx(0.1 + 0.9 * (1 / 91 if schedule == "linear" else
                                                        0.5 * (1 + math.cos(math.pi * 90 / 91))))
    assert learning_rate(500, OptimConfig(lr=1.0, min_lr=0.1, schedule="cosine"), 100) == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_as_one_minus_sqrt():
    values = lrs("wsd", steps=100, decay_steps=20)
    assert values[10:80] == pytest.approx([1.0] * 70)
    assert values[85] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(5 / 20)))
    assert all(a > b for a, b in zip(values[80:], values[81:]))


def test_stages_give_the_value_of_the_last_begun_stage():
    stages = StagedSchedule.of(Stages.parse("0:128, 31000:256,250000:512", "data.seq_length_stages"), 999)
    assert [stages(s) for s in (0, 30999, 31000, 10**6)] == [128, 128, 256, 512]
    assert StagedSchedule.of(Stages(), 0.15)(5) == 0.15


def test_stages_are_parsed_once_into_typed_values_and_written_back_as_text():
    stages = Stages.parse("0:0.5, 200000:0.3", "data.mask_prob_stages")
    assert stages.points == ((0, 0.5), (200000, 0.3)) and str(stages) == "0:0.5,200000:0.3"
    assert Stages.parse("0:128,1000:256", "k").values() == [128, 256]
    assert all(isinstance(v, int) for v in Stages.parse("0:128,1000:256", "k").values())


@pytest.mark.parametrize("text", ["5:128", "0:128,0:256", "0-128", "0:abc"])
def test_malformed_stages_are_refused_naming_the_key(text):
    with pytest.raises(ConfigError, match="data.seq_length_stages"):
        Stages.parse(text, "data.seq_length_stages")


def test_batch_size_ramps_up_in_equal_stages():
    rampup = RampUp.parse("16 16 100", "train.rampup_batch_size")
    sizes = [global_batch_size(s, rampup, 64) for s in range(0, 120, 10)]
    assert sizes[0] == 16 and sizes[-1] == 64 and sorted(sizes) == sizes
    assert set(sizes) == {16, 32, 48, 64}
    assert global_batch_size(3, None, 64) == 64
    with pytest.raises(ConfigError, match="train.rampup_batch_size"):
        RampUp.parse("16 16", "train.rampup_batch_size")


def test_effective_sequence_length_of_packed_documents():
    seg = torch.tensor([[1, 1, 1, 2, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert effective_seq_length(seg) == pytest.approx((9 + 1 + 36) / 10)


def test_flops_per_token_follows_the_encoder_formula():
    m = preset("tohoku-bert-500m")
    blocks, head = matmul_params(m)
    assert blocks == 24 * (1024 * (16 + 16) * 64 + 1024 * 1024 + 3 * 1024 * 4096)
    full = flops_per_token(m, s_eff=4096, predicted_fraction=1.0)
    assert full == pytest.approx(6 * (blocks + head) + 12 * 24 * 1024 * 4096)
    assert flops_per_token(m, 4096, 0.15) < full  # sparse prediction skips most of the head
    local = preset("modernbert-ja-130m")
    assert flops_per_token(local, 8192, 1.0) < flops_per_token(local.__class__(**{**vars(local), "sliding_window": 0,
                                                                               "global_attn_every_n_layers": 1}), 8192, 1.0)
    assert mfu(312e3, 6 * 149e6) == pytest.approx(312e3 * 6 * 149e6 / 989.4e12)


def test_batch_size_schedule_maps_sample_positions_back_to_their_step():
    schedule = BatchSizeSchedule(RampUp(4, 4, 9), 16)
    assert [schedule(s) for s in range(11)] == [4, 4, 4, 8, 8, 8, 12, 12, 12, 16, 16]
    for step in range(14):
        first = schedule.consumed_at(step)
        assert schedule.step_of(first) == step and schedule.step_of(first + schedule(step) - 1) == step
    assert BatchSizeSchedule(None, 8).step_of(8 * 1000 + 7) == 1000
