"""The watchdog's diagnosis (who is stuck, from two readings of every heartbeat), its store calls that
give up instead of hanging, the environment summary rank 0 prints, and the timeout keys' checks."""

import socket
import threading
import time

import pytest

from megatron_jp.config import ConfigError, load_config
from megatron_jp.training.runtime.environment import format_summary, summarize
from megatron_jp.training.runtime.watchdog import Beat, TimedStore, Watchdog, diagnose

STORE = "node1:29500"


def beats(*items):
    return {r: None if b is None else Beat(*b) for r, b in enumerate(items)}


def test_a_rank_whose_heartbeat_stopped_is_named_with_its_step():
    before = beats((5, 17, "training"), (9, 17, "training"), (4, 18, "training"))
    after = beats((8, 17, "training"), (9, 17, "training"), (7, 18, "training"))
    assert diagnose(before, after, STORE) == ("rank 1 stopped responding (frozen or dead): last seen rank 1 at "
                                              "step 17 (training)")


def test_a_lost_host_is_named_with_the_rank_that_stopped_there():
    before = beats((5, 17, "training", "node1"), (9, 17, "checkpoint save", "node2"))
    after = beats((8, 17, "training", "node1"), (9, 17, "checkpoint save", "node2"))
    assert diagnose(before, after, STORE).endswith("last seen rank 1 at step 17 (checkpoint save) on node2")
    assert Beat.decode(after[1].encode()) == after[1]


def test_ranks_that_never_wrote_a_heartbeat_never_joined():
    assert diagnose(beats((1, 0, "start-up"), None, None), beats((2, 0, "start-up"), None, None), STORE,
                    startup=True) == "ranks 1, 2 never joined (no heartbeat in the rendezvous store)"


def test_live_ranks_behind_the_others_are_named_and_else_the_collective_is_blamed():
    before = beats((1, 3, "training"), (1, 2, "checkpoint save"))
    after = beats((2, 3, "training"), (2, 2, "checkpoint save"))
    assert diagnose(before, after, STORE) == "rank 1 alive but still at step 2 (checkpoint save)"
    same = beats((2, 3, "training"), (2, 3, "training"))
    assert diagnose(beats((1, 3, "training"), (1, 3, "training")), same, STORE).startswith(
        "every rank is alive at step 3 (training): a collective inside it never completed")


@pytest.mark.parametrize("agent_store, host", [(False, "rank 0"), (True, "the torchrun agent of the first node")])
def test_an_unanswering_store_blames_its_host(agent_store, host):
    assert diagnose(None, None, STORE, agent_store).startswith(f"{host} stopped responding (frozen or dead): it "
                                                               f"hosts the rendezvous store at {STORE}")
    assert "cannot be reached" in diagnose(None, None, STORE, agent_store, startup=True)


def test_beats_survive_the_store_as_text():
    assert Beat.decode(Beat(3, 12, "checkpoint save").encode()) == Beat(3, 12, "checkpoint save")


def test_a_store_call_that_hangs_is_given_up_and_later_calls_fail_at_once():
    release = threading.Event()
    store = TimedStore(connect=lambda: "client", timeout_s=0.2)
    assert store.call(lambda client: client + "!") == "client!"
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        store.call(lambda client: release.wait(10))
    with pytest.raises(TimeoutError, match="previous store call"):
        store.call(lambda client: "never runs")
    assert time.monotonic() - began < 2
    release.set()


def test_a_rank_has_a_heartbeat_in_the_store_as_soon_as_its_start_up_is_over():
    """Frozen in its first steps, before its thread's first beat, it must read as frozen, not as never joined."""
    stored = {}

    class Store:
        def set(self, key, value):
            stored[key] = value

    dog = Watchdog(rank=3, world=4, timeout_s=600, startup_s=300, host="h", port=1)
    dog._store = TimedStore(connect=Store, timeout_s=1.0)  # the thread is never started
    dog.started()
    assert Beat.decode(stored["beat/3"]) == Beat(1, 0, "start-up done", socket.gethostname())


def test_the_heartbeat_interval_follows_the_shorter_limit():
    dog = Watchdog(rank=0, world=2, timeout_s=600, startup_s=300, host="h", port=1)
    assert dog.interval == 10.0 and dog.window == 30.0 and dog.backstop_s == 660
    assert Watchdog(rank=0, world=2, timeout_s=12, startup_s=30, host="h", port=1).interval == pytest.approx(0.6)


def view(host, gpus, **variables):
    return {"host": host, "gpus": gpus, "gpu_name": "NVIDIA H100" if gpus else None, "torch": "2.11.0",
            "cuda": "12.8", "nccl": "2.26.2", "infiniband": ["mlx5_0", "mlx5_1"], "variables": variables}


def test_the_environment_summary_shows_nodes_gpus_and_variables_that_differ():
    views = [view("n1", 4, NCCL_IB_HCA="mlx5_0", MASTER_ADDR="n1")] * 4 + [view("n2", 4, MASTER_ADDR="n1")] * 4
    text = format_summary(summarize(views, "nccl"))
    assert text.splitlines()[0] == ("environment: 2 node(s) (n1, n2), 8 ranks (4 per node), GPUs per node 4 "
                                    "(NVIDIA H100)")
    assert "backend nccl, torch 2.11.0, CUDA 12.8, NCCL 2.26.2; InfiniBand devices mlx5_0, mlx5_1" in text
    assert "  MASTER_ADDR=n1" in text
    assert "  NCCL_IB_HCA differs across ranks: mlx5_0 on n1; (unset) on n2" in text


@pytest.mark.parametrize("key", ["timeout_minutes", "startup_timeout_minutes"])
def test_timeouts_must_be_positive_and_may_be_fractions(key):
    assert getattr(load_config(None, [f"--parallel.{key}", "0.5"]).parallel, key) == 0.5
    with pytest.raises(ConfigError, match=f"parallel.{key} = 0.0 is out of range: it must be > 0"):
        load_config(None, [f"--parallel.{key}", "0"])


def test_an_unanswering_store_host_is_named_with_the_last_step_every_rank_completed():
    # issue 19, item 17: a stopped rank 0 leaves no heartbeat to read, but every rank finished the step before
    message = diagnose(None, None, STORE, step=1234)
    assert message.startswith("rank 0 stopped responding") and "every rank had completed step 1233" in message
