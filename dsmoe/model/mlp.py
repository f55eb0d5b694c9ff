"""Dense MLP (GeLU, SwiGLU or GeGLU): the comparison baseline of the same total width as a DS-MoE layer,
and the encoder's GeGLU FFN (MosaicBERT, papers/mosaicbert.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATED = ("swiglu", "geglu")
"""Activations whose input projection holds [gate; value] (twice the hidden width)."""


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """GeLU on h, or a gated unit on h = [gate, value] split along the last dimension: SwiGLU
    silu(gate) * value, GeGLU gelu(gate) * value (exact GELU, as MosaicBERT)."""
    if activation == "gelu":
        return F.gelu(h)
    gate, value = h.chunk(2, dim=-1)
    return (F.silu(gate) if activation == "swiglu" else F.gelu(gate)) * value


class DenseMLP(nn.Module):
    """y = W_out act(W_in x); for gated units W_in holds [gate; value] stacked on its output dimension.

    GeGLU (MosaicBERT): W_in D -> 2I, GELU(gate) * value, W_out I -> D. `bias` adds BERT's output bias
    (MosaicBERT's gated projection has none)."""

    def __init__(self, d_model: int, hidden: int, activation: str, bias: bool = False):
        super().__init__()
        self.activation = activation
        width_in = 2 * hidden if activation in GATED else hidden
        self.w_in = nn.Linear(d_model, width_in, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=bias)
        self.unit_mask: torch.Tensor | None = None  # MSG growth: (hidden,), c on new units (dsmoe/growth.py)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        h = activate(self.w_in(x), self.activation)
        return self.w_out(h if self.unit_mask is None else h * self.unit_mask.to(h.dtype)), None
