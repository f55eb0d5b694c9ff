"""Dense MLP (GeLU or SwiGLU): the comparison baseline of the same total width as a DS-MoE layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """GeLU on h, or SwiGLU on h = [gate, up] split along the last dimension."""
    if activation == "gelu":
        return F.gelu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class DenseMLP(nn.Module):
    """y = W_out act(W_in x); for SwiGLU W_in holds [gate; up] stacked on its output dimension."""

    def __init__(self, d_model: int, hidden: int, activation: str):
        super().__init__()
        self.activation = activation
        width_in = 2 * hidden if activation == "swiglu" else hidden
        self.w_in = nn.Linear(d_model, width_in, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)
        self.unit_mask: torch.Tensor | None = None  # MSG growth: (hidden,), c on new units (dsmoe/growth.py)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        h = activate(self.w_in(x), self.activation)
        return self.w_out(h if self.unit_mask is None else h * self.unit_mask.to(h.dtype)), None
