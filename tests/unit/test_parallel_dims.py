"""ParallelDims: one rank grid, coordinates from it; impossible layouts refused by validation, before
any group exists."""

import numpy as np
import pytest

from megatron_jp.config import Config, ConfigError, validate
from megatron_jp.models.config import preset
from megatron_jp.parallel.dims import ParallelDims, launch_env, rank_grid


def test_rank_grid_is_arange_reshaped_pipeline_data_tensor():
    grid = rank_grid(pp=2, dp=3, tp=4)
    assert np.array_equal(grid, np.arange(24).reshape(2, 3, 4))
    dims = ParallelDims.layout(tp=4, pp=2, dp=3, rank=17)  # 17 = (1 * 3 + 1) * 4 + 1
    assert dims.coords == (1, 1, 1) and dims.world_size == 24
    assert dims.is_last_stage and not dims.is_first_stage


def test_tensor_parallel_peers_are_adjacent_ranks():
    peers = [ParallelDims.layout(tp=2, pp=2, dp=2, rank=r).coords for r in (4, 5)]
    assert peers[0][:2] == peers[1][:2] and {peers[0][2], peers[1][2]} == {0, 1}


def _cfg(**parallel):
    cfg = Config()
    cfg.model = preset("tiny", vocab_size=128)
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 1
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


@pytest.mark.parametrize("parallel, world, match", [
    (dict(tensor=4), 6, "not divisible by parallel.tensor"),
    (dict(tensor=8), 8, "num_heads"),
    (dict(pipeline=3), 3, "num_layers"),
    (dict(pipeline=2, virtual_pipeline=4), 2, "num_layers"),
    (dict(tensor=2, data=3), 4, "parallel.data"),
])
def test_impossible_layouts_are_refused_before_any_process_group(parallel, world, match):
    # no process group is initialised in this process: the refusal comes from validation
    with pytest.raises(ConfigError, match=match):
        validate(_cfg(**parallel), world)


def test_a_multi_rank_world_without_torch_distributed_says_how_to_initialise():
    with pytest.raises(ConfigError, match="init_process_group"):
        ParallelDims.from_config(_cfg(tensor=2), 2, rank=0)


def test_a_world_of_one_needs_no_process_group():
    dims = ParallelDims.from_config(_cfg(), 1, rank=0)
    assert (dims.tp, dims.pp, dims.dp) == (1, 1, 1) and dims.tp_group is None and not dims.distributed


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (5, 8, 1)),
    ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, (9, 16, 1)),
    ({}, (0, 1, 0)),
])
def test_launch_environment_is_read_from_torchrun_or_slurm(env, expected):
    assert launch_env(env) == expected
