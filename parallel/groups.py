"""Process groups: start torch.distributed (through DeepSpeed) and check the dp x ep x tp layout.

Works under `deepspeed`, `torchrun`, or plain `python` (then a single-process group is started here).
Backend: NCCL when CUDA is present, gloo otherwise.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsmoe.config import ConfigError, ParallelConfig

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ParallelDims:
    """The layout of this run and where this process sits in it."""

    world_size: int
    rank: int
    local_rank: int
    dp: int
    ep: int
    tp: int
    device: torch.device

    @property
    def dp_rank(self) -> int:
        # With ep = tp = 1 every rank is its own data-parallel replica.
        return self.rank // (self.ep * self.tp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(cfg: ParallelConfig, source: str = "config") -> ParallelDims:
    """Initialise torch.distributed if needed and validate `cfg` against the world size."""
    import deepspeed  # deferred: importing deepspeed takes seconds

    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if all(k in os.environ for k in LAUNCHER_ENV):  # started by deepspeed or torchrun
            deepspeed.init_distributed(dist_backend=backend)
        else:  # plain `python launchers/train.py`: a world of one, rendezvous through a file (no port to race for)
            os.environ.setdefault("LOCAL_RANK", "0")
            store = tempfile.NamedTemporaryFile(prefix="dsmoe-rendezvous-", delete=False).name
            os.unlink(store)
            deepspeed.init_distributed(
                dist_backend=backend,
                auto_mpi_discovery=False,
                init_method=f"file://{store}",
                rank=0,
                world_size=1,
            )
    world, rank = dist.get_world_size(), dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dp = cfg.dp or world // (cfg.ep * cfg.tp)
    if dp * cfg.ep * cfg.tp != world:
        raise ConfigError(
            f"{source}: parallel.dp x parallel.ep x parallel.tp = {dp} x {cfg.ep} x {cfg.tp} = "
            f"{dp * cfg.ep * cfg.tp}, but the world size is {world}"
        )
    if cfg.ep > 1 or cfg.tp > 1:
        raise ConfigError(
            f"{source}: parallel.ep={cfg.ep}, parallel.tp={cfg.tp}: expert and tensor parallelism are not "
            "available in this version; use data parallelism (parallel.dp) only"
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Ranks sharing a CPU machine split its cores instead of each taking all of them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return ParallelDims(world, rank, local_rank, dp, cfg.ep, cfg.tp, device)
