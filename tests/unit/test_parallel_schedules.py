"""Pipeline schedules run every forward and backward once, in dependency order, without stalling,
and their communication plan pairs every send with a receive in the same step."""

import itertools

import pytest

from megatron_jp.config import ConfigError
from megatron_jp.parallel.pipeline import interleaved_one_f_one_b, one_f_one_b, programs, schedule

SHAPES = [(pp, vpp, m) for pp, vpp, m in itertools.product([1, 2, 3, 4], [1, 2, 3], [1, 2, 3, 4, 6, 8])
          if (vpp == 1 or (pp > 1 and m % pp == 0))]


@pytest.mark.parametrize("pp, vpp, m", SHAPES)
def test_every_rank_runs_each_forward_and_backward_once_forward_first(pp, vpp, m):
    for rank in range(pp):
        order = schedule(pp, vpp, rank, m)
        expected = {(c, mb) for c in range(vpp) for mb in range(m)}
        forwards = [(a.chunk, a.microbatch) for a in order if a.kind == "F"]
        backwards = [(a.chunk, a.microbatch) for a in order if a.kind == "B"]
        assert sorted(forwards) == sorted(expected) and sorted(backwards) == sorted(expected)
        assert all(order.index(next(a for a in order if a.kind == "F" and (a.chunk, a.microbatch) == key))
                   < order.index(next(a for a in order if a.kind == "B" and (a.chunk, a.microbatch) == key))
                   for key in expected)


@pytest.mark.parametrize("pp, vpp, m", SHAPES)
@pytest.mark.parametrize("train", [True, False])
def test_communication_plan_completes_and_pairs_each_send_with_a_receive(pp, vpp, m, train):
    plan = programs(pp, vpp, m, train)  # raises if the lock-step simulation stalls
    sends = sorted((msg.kind, msg.chunk, msg.microbatch) for rank in plan for s in rank for msg in s.sends)
    recvs = sorted((msg.kind, msg.chunk, msg.microbatch) for rank in plan for s in rank for msg in s.recvs)
    assert sends == recvs
    hops = pp * vpp - 1  # chunk boundaries crossed by each micro-batch
    assert len(sends) == m * hops * (2 if train else 1)
    assert all(len(s.sends) <= 1 for rank in plan for s in rank)  # one output per action


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8), (4, 2)])
def test_one_f_one_b_keeps_at_most_pp_minus_rank_micro_batches_in_flight(pp, m):
    for rank in range(pp):
        in_flight = peak = 0
        for action in one_f_one_b(pp, rank, m):
            in_flight += 1 if action.kind == "F" else -1
            peak = max(peak, in_flight)
        assert peak <= pp - rank


def test_interleaved_schedule_refuses_micro_batches_not_a_multiple_of_pipeline_size():
    with pytest.raises(ConfigError, match="multiple of parallel.pipeline"):
        interleaved_one_f_one_b(pp=2, vpp=2, rank=0, microbatches=3)


def test_interleaved_schedule_has_fewer_bubble_steps_than_one_f_one_b_for_the_same_work():
    # same layers on 4 ranks: plain 1F1B (1 chunk of 8 layers per rank) vs 2 virtual chunks of 4 layers;
    # a virtual chunk costs half a plain one, so compare step counts weighted by chunk cost
    plain = max(len(r) for r in programs(4, 1, 8, True))
    interleaved = max(len(r) for r in programs(4, 2, 8, True))
    assert interleaved / 2 < plain
