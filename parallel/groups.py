"""Process groups: start torch.distributed (through DeepSpeed) and build the dp x ep x tp layout.

Works under `deepspeed`, `torchrun`, or plain `python` (then a single-process group is started here).
Backend: NCCL when CUDA is present, gloo otherwise. The groups come from megatron-core's parallel_state,
in its rank order tp-ep-dp (tensor-parallel ranks adjacent, then expert-parallel, then data-parallel):

  tensor group        ranks that split one layer's weights; they see the same tokens
  expert group        ranks that split the experts of a layer; they see different tokens
  data group          ranks that see different tokens and hold the same non-expert weights (dp x ep)
  expert-data group   ranks that hold the same experts (dp)

The batch is split over the data group: `batch_rank` of `batch_ranks`.
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
    """The layout of this run, where this process sits in it, and its process groups."""

    world_size: int
    rank: int
    local_rank: int
    dp: int
    ep: int
    tp: int
    device: torch.device
    tp_group: object = None
    ep_group: object = None
    data_group: object = None
    expert_data_group: object = None
    model_group: object = None
    """The tp x ep ranks of one data-parallel replica (gradient norms sum over it)."""

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def ep_rank(self) -> int:
        return (self.rank // self.tp) % self.ep

    @property
    def dp_rank(self) -> int:
        """Index of this rank's expert-data replica."""
        return self.rank // (self.ep * self.tp)

    @property
    def batch_rank(self) -> int:
        """Which slice of the batch this rank trains on (tensor-parallel ranks share one)."""
        return self.rank // self.tp

    @property
    def batch_ranks(self) -> int:
        return self.dp * self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def layout(self) -> dict:
        return {"dp": self.dp, "ep": self.ep, "tp": self.tp}


def init(cfg: ParallelConfig, source: str = "config") -> ParallelDims:
    """Initialise torch.distributed if needed, validate `cfg` against the world size, build the groups."""
    import deepspeed  # deferred: importing deepspeed takes seconds

    # DeepSpeed's own switch to CPU also keeps us on gloo where GPUs exist (tests with more ranks than GPUs)
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    if not use_cuda:
        _skip_shared_memory_op()
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
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Ranks sharing a CPU machine split its cores instead of each taking all of them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return ParallelDims(
        world, rank, local_rank, dp, cfg.ep, cfg.tp, device, **_megatron_groups(cfg.tp, cfg.ep)
    )


def _skip_shared_memory_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce when its comm backend starts.

    Only DeepSpeed's inference_all_reduce uses that op (we reduce through gloo groups), yet building it
    costs a minute of C++ on a small machine, and a build killed midway leaves a lock file under
    ~/.cache/torch_extensions that makes every later start wait on it forever.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


# This process's groups for the layout megatron-core's parallel_state holds now: (world, tp, ep) -> the tp x ep
# block's group. Process groups live as long as the process (as parallel_state's own do); building them again
# for every run in one process (tests, notebooks) left ~50 gloo threads a run behind, thousands in the suite.
_model_group_of_layout: dict[tuple[int, int, int], object] = {}


def _megatron_groups(tp: int, ep: int) -> dict:
    """Build (or rebuild, for another layout) megatron-core's groups; its CUDA-only RNG seeding is skipped:
    every rank seeds torch itself and builds the same full model before it is split. A run in a process
    whose groups already have this layout reuses them."""
    from megatron.core import parallel_state as ps

    world, rank = dist.get_world_size(), dist.get_rank()
    layout = (world, tp, ep)
    same = (
        ps.model_parallel_is_initialized()
        and layout in _model_group_of_layout
        and ps.get_tensor_model_parallel_world_size() == tp
        and ps.get_expert_model_parallel_world_size() == ep
    )
    if not same:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        _model_group_of_layout.clear()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
        # The tp x ep block of this rank's data-parallel replica (rank order tp-ep-dp: contiguous).
        block = tp * ep
        for first in range(0, world, block):
            group = dist.new_group(list(range(first, first + block)))
            if first <= rank < first + block:
                _model_group_of_layout[layout] = group
    model_group = _model_group_of_layout[layout]
    return {
        "tp_group": ps.get_tensor_model_parallel_group(),
        "ep_group": ps.get_expert_model_parallel_group(),
        "data_group": ps.get_data_parallel_group(),
        "expert_data_group": ps.get_expert_data_parallel_group(),
        "model_group": model_group,
    }


class DeepSpeedMPU:
    """The `mpu` interface DeepSpeed asks of a model-parallel library, answered from our layout.

    DeepSpeed reduces non-expert gradients over the data group and, through its MoE parameter groups,
    expert gradients over the expert-data group; tensor-parallel shards are summed in gradient norms over
    the tensor group and checkpointed per tensor rank.
    """

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def get_model_parallel_group(self):
        return self.dims.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.dims.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_data_parallel_group(self):
        return self.dims.data_group

    def get_data_parallel_rank(self) -> int:
        return self.dims.batch_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.batch_ranks

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0
