"""The rank grid and its process groups: one object, built once, passed explicitly (docs/DESIGN.md §3, principle 2).

Ranks form one grid `np.arange(world).reshape(pp, dp, tp)`: tensor-parallel peers are adjacent ranks
(one node's NVLink domain), data-parallel replicas come next and pipeline stages are the slowest axis.
Every group below is a line or plane of that grid. Nothing is stored at module level: a ParallelDims
is created by the driver and handed to every function that communicates.

A ParallelDims without process groups (`ParallelDims.layout(...)`) only answers "which shard does rank
r hold"; the memory estimate uses it to build a rank's model on the meta device.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from megatron_jp.config import Config, ConfigError, data_parallel_size


@dataclass
class ParallelDims:
    """Sizes, this rank's coordinates and the groups it belongs to.

    Groups are None when the axis has size 1 or when no process group exists (layout-only objects);
    the collectives in parallel/ treat None as "nothing to communicate".
    """

    tp: int
    pp: int
    dp: int
    vpp: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None
    mp_group: object = None  # tp x pp ranks of one model replica: gradient norms without ZeRO
    embedding_group: object = None  # first and last stage: tied embedding gradients
    world_group: object = None  # every rank: gradient norms with ZeRO-1 (gradients sharded over dp)
    host_group: object = None  # every rank, gloo on CPU tensors: host decisions without touching the GPU
    pp_ranks: tuple[int, ...] = ()  # global ranks of this rank's pipeline, stage order

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def grid(self) -> np.ndarray:
        return rank_grid(self.pp, self.dp, self.tp)

    @functools.cached_property
    def coords(self) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of this rank."""
        p, d, t = np.argwhere(self.grid == self.rank)[0]
        return int(p), int(d), int(t)

    @property
    def pp_rank(self) -> int:
        return self.coords[0]

    @property
    def dp_rank(self) -> int:
        return self.coords[1]

    @property
    def tp_rank(self) -> int:
        return self.coords[2]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def distributed(self) -> bool:
        """Whether this object carries process groups (False: one process, or a layout-only object)."""
        return self.world_group is not None

    def dropout_seed(self, seed: int) -> int:
        """A torch seed for this rank's dropout: equal over tensor-parallel peers (they run replicated
        regions that must drop the same elements), distinct over data-parallel replicas and stages."""
        return seed + 1_000_003 * self.pp_rank + 7919 * self.dp_rank

    # ------------------------------------------------------------------------------------ builders

    @classmethod
    def layout(cls, tp: int, pp: int, dp: int, vpp: int = 1, rank: int = 0, device="cpu") -> "ParallelDims":
        """Coordinates without process groups: for counting, estimating and single-process runs."""
        return cls(tp=tp, pp=pp, dp=dp, vpp=vpp, rank=rank, device=torch.device(device))

    @classmethod
    def from_config(cls, cfg: Config, world_size: int, rank: int, device="cpu") -> "ParallelDims":
        """The layout of a validated `cfg` for `world_size` ranks, with every group created.

        Must be called by every rank in the same order (torch.distributed.new_group is collective).
        A world of one needs no initialised process group.
        """
        p = cfg.parallel
        dims = cls.layout(p.tensor, p.pipeline, data_parallel_size(cfg, world_size), p.virtual_pipeline,
                          rank, device)
        if world_size == 1:
            return dims
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError(f"a world of {world_size} ranks needs torch.distributed initialised first: "
                              f"call megatron_jp.parallel.init_process_group() (reads torchrun/SLURM variables)")
        if dist.get_world_size() != world_size:
            raise ConfigError(f"world_size {world_size} differs from the process group's "
                              f"{dist.get_world_size()}")
        dims._create_groups()
        return dims

    def _create_groups(self):
        grid, (p, d, t) = self.grid, self.coords
        self.tp_group = _new_groups([grid[i, j, :] for i in range(self.pp) for j in range(self.dp)], self.rank)
        self.dp_group = _new_groups([grid[i, :, k] for i in range(self.pp) for k in range(self.tp)], self.rank)
        self.pp_group = _new_groups([grid[:, j, k] for j in range(self.dp) for k in range(self.tp)], self.rank)
        self.mp_group = _new_groups([grid[:, j, :] for j in range(self.dp)], self.rank)
        if self.pp > 1:
            ends = [grid[[0, -1], j, k] for j in range(self.dp) for k in range(self.tp)]
            self.embedding_group = _new_groups(ends, self.rank)
            # NCCL creates a group's communicator at its first use, with every rank of the group; the
            # pipeline's first p2p batch involves only two stages, so one collective comes first
            dist.all_reduce(torch.zeros(1, device=self.device), group=self.pp_group)
        self.world_group = dist.group.WORLD
        self.host_group = dist.new_group(backend="gloo")
        self.pp_ranks = tuple(int(r) for r in grid[:, d, t])

    def __repr__(self) -> str:
        p, d, t = self.coords
        return (f"ParallelDims(rank={self.rank}, tp={self.tp}, pp={self.pp}, dp={self.dp}, vpp={self.vpp}, "
                f"coords(pp,dp,tp)=({p},{d},{t}), device={self.device})")


def rank_grid(pp: int, dp: int, tp: int) -> np.ndarray:
    """The one rank grid: rank = (pp_rank * dp + dp_rank) * tp + tp_rank."""
    return np.arange(pp * dp * tp).reshape(pp, dp, tp)


def _new_groups(rank_lists, rank: int):
    """Create one group per rank list (all ranks call this identically); return this rank's group.

    Groups of one rank are not created: a None group means "no communication" everywhere.
    """
    mine = None
    for ranks in rank_lists:
        ranks = [int(r) for r in np.asarray(ranks).reshape(-1)]
        if len(ranks) == 1:
            continue
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


# ----------------------------------------------------------------------------- launching

_ENV_SCHEMES = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))


def launch_env(environ=None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or SLURM's variables; (0, 1, 0) outside a launcher."""
    env = os.environ if environ is None else environ
    for rank_var, world_var, local_var in _ENV_SCHEMES:
        if rank_var in env and world_var in env:
            return int(env[rank_var]), int(env[world_var]), int(env.get(local_var, 0))
    return 0, 1, 0


def init_process_group(backend: str | None = None, timeout_s: float = 600.0):
    """Initialise torch.distributed from the launcher's variables; returns (rank, world_size, device).

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; under srun the SLURM_* variables are used and
    MASTER_ADDR/MASTER_PORT must be exported by the sbatch script. NCCL on GPUs (one device per local
    rank), gloo on CPU. A world of one initialises nothing.
    """
    import datetime

    rank, world, local_rank = launch_env()
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world == 1 or dist.is_initialized():
        return rank, world, device
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConfigError(f"{var} is not set: export it in the launch script (torchrun sets it itself)")
    dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), init_method="env://",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, device
