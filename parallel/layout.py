"""Where each parameter of the plain model lives under tensor and expert parallelism.

One table, used both ways: `shard` cuts a rank's piece out of the plain model's tensor when parallelism is
applied, `unshard` puts the pieces of every (tp rank, ep rank) back together when a checkpoint is
consolidated. A parallel model keeps the plain model's parameter names, so a name finds its placement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    tp_dim: int | None = None
    """Dimension split over the tensor group (None: replicated across it)."""
    glu: bool = False
    """The tp dimension stacks [gate; up] (SwiGLU): each rank takes its slice of both halves."""
    ep_dim: int | None = None
    """Dimension split over the expert group (the expert index of stacked expert weights)."""


REPLICATED = Placement()

_RULES: list[tuple[str, Placement]] = [
    (r"embed\.weight|lm_head\.weight", Placement(tp_dim=0)),  # vocabulary rows
    (r".*\.attn\.[qkv]_proj\.weight", Placement(tp_dim=0)),  # heads (column-parallel)
    (r".*\.attn\.o_proj\.weight", Placement(tp_dim=1)),  # heads (row-parallel)
    (r".*\.mlp\.w_in", Placement(tp_dim=1, ep_dim=0)),  # DS-MoE (N, F_in, D): experts, then hidden width
    (r".*\.mlp\.w_out", Placement(tp_dim=1, ep_dim=0)),  # DS-MoE (N, F, D)
    (r".*\.mlp\.w_in\.weight", Placement(tp_dim=0)),  # dense MLP (F_in, D)
    (r".*\.mlp\.w_out\.weight", Placement(tp_dim=1)),  # dense MLP (D, F)
]


def placement(name: str, activation: str) -> Placement:
    for pattern, rule in _RULES:
        if re.fullmatch(pattern, name):
            if name.endswith(("mlp.w_in", "mlp.w_in.weight")) and activation == "swiglu":
                return Placement(rule.tp_dim, True, rule.ep_dim)
            return rule
    return REPLICATED


def _split(t: torch.Tensor, dim: int, parts: int, index: int, glu: bool) -> torch.Tensor:
    if glu:
        return torch.cat([half.chunk(parts, dim)[index] for half in t.chunk(2, dim)], dim)
    return t.chunk(parts, dim)[index]


def _join(pieces: list[torch.Tensor], dim: int, glu: bool) -> torch.Tensor:
    if glu:
        halves = [p.chunk(2, dim) for p in pieces]
        return torch.cat(
            [torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)], dim
        )
    return torch.cat(pieces, dim)


def shard(t: torch.Tensor, where: Placement, tp_rank: int, tp: int, ep_rank: int, ep: int) -> torch.Tensor:
    """This rank's piece of the full tensor `t` (a copy, contiguous)."""
    if where.ep_dim is not None and ep > 1:
        t = _split(t, where.ep_dim, ep, ep_rank, glu=False)
    if where.tp_dim is not None and tp > 1:
        t = _split(t, where.tp_dim, tp, tp_rank, where.glu)
    return t.clone().contiguous()


def unshard(pieces: dict[tuple[int, int], torch.Tensor], where: Placement, tp: int, ep: int) -> torch.Tensor:
    """The full tensor from the pieces of every (tp_rank, ep_rank)."""

    def over_tp(ep_rank: int) -> torch.Tensor:
        if where.tp_dim is None or tp == 1:
            return pieces[(0, ep_rank)]
        return _join([pieces[(r, ep_rank)] for r in range(tp)], where.tp_dim, where.glu)

    if where.ep_dim is None or ep == 1:
        return over_tp(0)
    return torch.cat([over_tp(e) for e in range(ep)], where.ep_dim)
