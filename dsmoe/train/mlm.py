"""The encoder's token-weighted MLM loss, as a training feature (dsmoe/train/feature.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsmoe.data.mlm import IGNORE_INDEX
from dsmoe.train.feature import Feature


class MLMTokenWeights(Feature):
    """Rows of mixed lengths give every micro-batch and rank its own number of predicted tokens, while
    DeepSpeed averages micro-batches and ranks equally. Micro-batch m's MLM loss is weighted by
    n_m x micro-batches x ranks / N (N: the step's predicted tokens over all ranks), so the step trains on, and
    logs, the token-weighted mean over the whole batch, as one process taking it at once does."""

    def micro_weights(self, trainer, batches: list) -> list[float] | torch.Tensor:
        dims = trainer.dims
        counts = torch.tensor([float((b[2] != IGNORE_INDEX).sum()) for b in batches])  # labels on the host
        if dims.world_size == 1:  # all on the host: floats
            return (counts * len(batches) / counts.sum().clamp_min(1.0)).tolist()
        # Over ranks the total is a collective on the device; the weights stay there (0-dim tensors the loss
        # is scaled by) instead of being read back, which would make the host wait for the GPU.
        counts = counts.to(dims.device)
        total = counts.sum()
        dist.all_reduce(total)  # the encoder runs data parallel only: the world is the data-parallel group
        return counts * (len(batches) * dims.world_size) / total.clamp_min(1.0)
