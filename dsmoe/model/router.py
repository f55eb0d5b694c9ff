"""The router of a DS-MoE layer (and of MoA attention experts): fp32 scores over all experts and their softmax.

Its own module because both the layer (dsmoe/model/moe.py) and the sparse inference kernels
(dsmoe/model/sparse.py, which moe.py imports) compute router scores the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """Linear scores over all experts and their softmax, computed in fp32 at least (papers/dsmoe.md).

    With bf16/fp16 inputs on CUDA the scores come from one low-precision GEMM that accumulates and writes
    fp32 (`fused`; the products of bf16 values are exact in fp32, so this is the fp32 GEMM of the
    upcast inputs up to summation order) instead of an fp32 copy of the (T, D) activations and an fp32 GEMM;
    its backward rounds the fp32 score gradient to the input dtype for the two GEMMs, as autocast does.
    """

    fused = True
    """Class switch: False forces the plain upcast path everywhere (benchmarks/bench_layers.py compares them)."""

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.logit_bias: torch.Tensor | None = None  # MSG growth: log c on new experts (dsmoe/growth.py)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits = router_scores(x_TD, self.weight)
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return F.softmax(logits, dim=-1)  # (T, N)


def router_scores(x_TD: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 (T, N) scores x W^T of a router weight (N, D): one low-precision GEMM writing fp32 where it runs
    (Router.fused), else an fp32 GEMM of the upcast inputs. The Router and the inference Engine use it."""
    if Router.fused and fp32_scores_available(x_TD, weight):
        return Fp32Scores.apply(x_TD, weight)
    dtype = torch.promote_types(x_TD.dtype, torch.float32)
    return F.linear(x_TD.to(dtype), weight.to(dtype))


def fp32_scores_available(x_TD: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch.mm(..., out_dtype=float32) runs for bf16/fp16 operands on CUDA only."""
    return (
        x_TD.is_cuda
        and x_TD.dim() == 2
        and x_TD.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x_TD.dtype
    )


class Fp32Scores(torch.autograd.Function):
    """x (T, D) @ w (N, D)^T in the inputs' low precision with fp32 accumulation and an fp32 (T, N) result."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, w_ND: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TD, w_ND)
        return torch.mm(x_TD, w_ND.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_TN: torch.Tensor):
        x_TD, w_ND = ctx.saved_tensors
        grad_low = grad_TN.to(x_TD.dtype)
        grad_x = grad_low @ w_ND if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.mm(grad_low.t(), x_TD, out_dtype=torch.float32).to(w_ND.dtype)
            if ctx.needs_input_grad[1]
            else None
        )
        return grad_x, grad_w
