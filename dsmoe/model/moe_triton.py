"""The DS-MoE training layer's one elementwise stage as two Triton kernels (CUDA, GeLU experts).

Between its two wide GEMMs the dense DS-MoE layer computes s = gelu(h) * p, h the (T, N*F) hidden of all N
experts and p the (T, N) router probabilities, expert n's F columns scaled by p[:, n]. Its backward needs
grad_h = g * p * gelu'(h) and dp[:, n] = sum over expert n's columns of g * gelu(h), g the gradient of s.

One program owns a tile of rows and one expert's F columns, so the forward is one read of h and one write
of s, and the backward one read each of g and h and one write of grad_h, with dp reduced inside the tile
(no atomics, no second pass): the passes a dense MLP's GeLU needs, plus (T, N) floats. GeLU is the exact
(erf) form in fp32, as torch's, rounded to bf16 once at the end. `scaled_gelu` wraps both as torch.library
custom ops with fake (shape) functions and an autograd formula, so torch.compile keeps them as they are
inside a compiled block: an opaque kernel between the two GEMMs, which it could not fuse into anyway.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the portable path runs
    triton = None


def available(h: torch.Tensor, activation: str) -> bool:
    """The Triton kernels run for GeLU experts on CUDA in bf16/fp16."""
    return (
        triton is not None
        and activation == "gelu"
        and h.is_cuda
        and h.dtype in (torch.bfloat16, torch.float16)
    )


if triton is not None:

    @triton.jit
    def _scaled_gelu_fwd(h_ptr, p_ptr, s_ptr, T, N, F, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
        pid_t, n = tl.program_id(0), tl.program_id(1)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_F)
        row_ok = rows < T
        mask = row_ok[:, None] & (cols[None, :] < F)
        offs = rows[:, None].to(tl.int64) * (N * F) + n * F + cols[None, :]
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + rows.to(tl.int64) * N + n, mask=row_ok, other=0.0)
        act = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
        tl.store(s_ptr + offs, (act * p[:, None]).to(s_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scaled_gelu_bwd(
        g_ptr, h_ptr, p_ptr, gh_ptr, gp_ptr, T, N, F, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr
    ):
        pid_t, n = tl.program_id(0), tl.program_id(1)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_F)
        row_ok = rows < T
        mask = row_ok[:, None] & (cols[None, :] < F)
        offs = rows[:, None].to(tl.int64) * (N * F) + n * F + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + rows.to(tl.int64) * N + n, mask=row_ok, other=0.0)
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
        tl.store(gh_ptr + offs, (g * p[:, None] * (cdf + h * pdf)).to(gh_ptr.dtype.element_ty), mask=mask)
        tl.store(gp_ptr + rows.to(tl.int64) * N + n, tl.sum(g * (h * cdf), axis=1), mask=row_ok)

    def _grid(T: int, N: int, block_t: int):
        return (triton.cdiv(T, block_t), N)

    def _blocks(F: int) -> tuple[int, int]:
        block_f = triton.next_power_of_2(F)
        return max(1, 4096 // block_f), block_f  # ~4k elements a program

    @torch.library.custom_op("dsmoe::scaled_gelu_fwd", mutates_args=())
    def scaled_gelu_fwd(h_TK: torch.Tensor, p_TN: torch.Tensor) -> torch.Tensor:
        T, K = h_TK.shape
        N = p_TN.shape[1]
        s = torch.empty_like(h_TK)
        block_t, block_f = _blocks(K // N)
        _scaled_gelu_fwd[_grid(T, N, block_t)](h_TK, p_TN, s, T, N, K // N, BLOCK_T=block_t, BLOCK_F=block_f)
        return s

    @torch.library.custom_op("dsmoe::scaled_gelu_bwd", mutates_args=())
    def scaled_gelu_bwd(
        g_TK: torch.Tensor, h_TK: torch.Tensor, p_TN: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T, K = h_TK.shape
        N = p_TN.shape[1]
        grad_h = torch.empty_like(h_TK)
        grad_p = torch.empty((T, N), device=h_TK.device, dtype=torch.float32)
        block_t, block_f = _blocks(K // N)
        _scaled_gelu_bwd[_grid(T, N, block_t)](
            g_TK, h_TK, p_TN, grad_h, grad_p, T, N, K // N, BLOCK_T=block_t, BLOCK_F=block_f
        )
        return grad_h, grad_p

    def _setup(ctx, inputs, output) -> None:
        h_TK, p_TN = inputs
        ctx.save_for_backward(h_TK, p_TN)

    def _backward(ctx, grad_s):
        h_TK, p_TN = ctx.saved_tensors
        grad_h, grad_p = scaled_gelu_bwd(grad_s.contiguous(), h_TK, p_TN)
        return grad_h, grad_p

    @scaled_gelu_fwd.register_fake
    def _(h_TK: torch.Tensor, p_TN: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(h_TK)

    @scaled_gelu_bwd.register_fake
    def _(g_TK: torch.Tensor, h_TK: torch.Tensor, p_TN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty_like(h_TK), h_TK.new_empty(p_TN.shape, dtype=torch.float32)

    scaled_gelu_fwd.register_autograd(_backward, setup_context=_setup)


def scaled_gelu(h_TK: torch.Tensor, p_TN: torch.Tensor) -> torch.Tensor:
    """gelu(h) * p per expert block: (T, N*F) low-precision h, (T, N) fp32 p; differentiable in both."""
    return scaled_gelu_fwd(h_TK.contiguous(), p_TN.float().contiguous())
