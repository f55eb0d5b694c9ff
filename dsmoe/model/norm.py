"""RMSNorm that can keep aten's fused CUDA kernels whole under torch.compile (model.rms_norm: fused).

torch.compile decomposes nn.RMSNorm into primitives and fuses them with the residual add around it; on its own,
that forward + backward of (16384, 2048) bf16 took 0.80 ms on an H200 where aten's fused kernels (what eager
F.rms_norm runs) took 0.25 ms (benchmarks/liger_h200.md). As a custom op the norm is opaque to inductor, so the
fused kernels run inside compiled blocks. Same parameters, same function; CPU runs the module's own forward.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.library.custom_op("dsmoe::rms_norm", mutates_args=())
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
    return y, rstd


def _rstd_like(x: torch.Tensor) -> torch.Tensor:
    """The per-row 1/rms the fused kernel saves: fp32 (fp64 for fp64 inputs), shape (..., 1)."""
    return x.new_empty((*x.shape[:-1], 1), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


@_rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), _rstd_like(x)


@torch.library.custom_op("dsmoe::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = torch.ops.aten._fused_rms_norm_backward(grad_y, x, [x.shape[-1]], rstd, weight, [True, True])
    return dx, dw


@_rms_norm_bwd.register_fake
def _(grad_y, x, rstd, weight):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, grad_y, grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(grad_y.contiguous(), x, rstd, weight)
    return dx, dw, None


_rms_norm.register_autograd(_backward, setup_context=_setup)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and state dict); with `fused` set, CUDA inputs take aten's fused kernels as
    one opaque op each way (see the module docstring)."""

    def __init__(self, dim: int, eps: float, fused: bool = False):
        super().__init__(dim, eps=eps)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.is_cuda:
            return _rms_norm(x.contiguous(), self.weight, self.eps)[0]
        return super().forward(x)
