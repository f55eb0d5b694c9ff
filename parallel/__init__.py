"""Everything that knows about ranks: groups, tensor and expert parallelism, the DeepSpeed engine."""

from __future__ import annotations


def apply(model, dims, expert_dispatch: str = "tokens") -> None:
    """Apply this run's parallel layout to the plain model (in place); nothing to do on one rank.

    Every rank builds the same plain model from the same seed and keeps its own pieces, so any layout
    starts from exactly the single-process model's weights. `expert_dispatch`: 'tokens' or 'weights'
    (parallel.expert.choose_dispatch picks one for a config).
    """
    from parallel import expert, tensor

    if dims.world_size == 1:
        return
    tensor.apply(model, dims)
    expert.apply(model, dims, expert_dispatch)
