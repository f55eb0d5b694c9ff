"""A routed layer's MI loss and routing statistics when its batch is split over ranks.

Shared by the DS-MoE layers (parallel.expert) and the MoA attention layers (parallel.tensor): the MI loss
takes the whole batch's marginal, all-reduced over the data group (the ranks that split the batch), so it
equals the single-process value on the same global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsmoe.model.moe import MoEAux, routing_aux
from parallel.groups import ParallelDims


def routing_aux_over(probs_TE: torch.Tensor, active: torch.Tensor, dims: ParallelDims) -> MoEAux:
    """routing_aux with the marginal over the whole batch (every rank of the data group).

    Value: the global marginal. Gradient: that of this rank's own marginal, unscaled, because DeepSpeed
    averages gradients over the data group: the average of the ranks' gradients is then the gradient of
    the single-process loss.
    """
    local_E = probs_TE.to(torch.promote_types(probs_TE.dtype, torch.float32)).mean(0)
    if dims.batch_ranks == 1:
        return routing_aux(probs_TE, active)
    total_E = local_E.detach().clone()
    dist.all_reduce(total_E, group=dims.data_group)
    marginal_E = local_E + (total_E / dims.batch_ranks - local_E.detach())
    return routing_aux(probs_TE, active, marginal_E)
