"""Varlen bidirectional attention with ALiBi as Triton kernels (CUDA only): the encoder's 'triton' backend.

MosaicBERT's rows are short (128 tokens in pretraining, 512 at most), where FlexAttention over the packed
tokens spends most of its time outside the matrix units (a block mask over one long sequence, a generic
score_mod). These kernels work per (row, head) on the packed (T, H, hd) layout, read the row bounds from
cu_seqlens, add -m_h |i - j| inside the kernel and never touch padding:

- forward: grid (query blocks of the longest row, B x H); each program streams the key blocks of its row
  (online softmax) and writes O and the log-sum-exp (base 2);
- backward: delta = rowsum(O * dO) in torch, then one kernel for dK, dV (grid over key blocks, streaming
  the row's query blocks) and one for dQ (grid over query blocks, streaming key blocks): no atomics, so
  the result is deterministic.

Attention dropout is not supported (MosaicBERT trains with 0). Held equal to varlen_eager by
tests/test_gpu_encoder.py.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the backend is then unavailable
    triton = None

LOG2E = 1.4426950408889634


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _fwd_kernel(
        Q, K, V, O, LSE, CU, SLOPES,
        stride_qt, stride_kt, stride_vt, stride_ot,
        qk_scale,  # sm_scale * log2(e)
        H: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
        if pid_m * BLOCK_M >= length:
            return
        slope = tl.load(SLOPES + h) * 1.4426950408889634  # ALiBi in base-2 units
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HD)
        m_valid = offs_m < length
        q = tl.load(
            Q + (start + offs_m)[:, None] * stride_qt + h * HD + offs_d[None, :],
            mask=m_valid[:, None],
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HD], tl.float32)
        for n0 in range(0, length, BLOCK_N):
            cols = n0 + offs_n
            n_valid = cols < length
            k = tl.load(
                K + (start + cols)[:, None] * stride_kt + h * HD + offs_d[None, :],
                mask=n_valid[:, None],
                other=0.0,
            )
            v = tl.load(
                V + (start + cols)[:, None] * stride_vt + h * HD + offs_d[None, :],
                mask=n_valid[:, None],
                other=0.0,
            )
            s = tl.dot(q, tl.trans(k)) * qk_scale
            dist = tl.abs(offs_m[:, None] - cols[None, :]).to(tl.float32)
            s = s - slope * dist
            s = tl.where(n_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(
            O + (start + offs_m)[:, None] * stride_ot + h * HD + offs_d[None, :],
            acc.to(O.dtype.element_ty),
            mask=m_valid[:, None],
        )
        tl.store(LSE + (start + offs_m) * H + h, m_i + tl.log2(l_i), mask=m_valid)

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, CU, SLOPES,
        stride_qt, stride_kt, stride_vt, stride_dot, stride_dkt, stride_dvt,
        qk_scale, sm_scale,
        H: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
        if pid_n * BLOCK_N >= length:
            return
        slope = tl.load(SLOPES + h) * 1.4426950408889634
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HD)
        n_valid = offs_n < length
        k = tl.load(
            K + (start + offs_n)[:, None] * stride_kt + h * HD + offs_d[None, :],
            mask=n_valid[:, None],
            other=0.0,
        )
        v = tl.load(
            V + (start + offs_n)[:, None] * stride_vt + h * HD + offs_d[None, :],
            mask=n_valid[:, None],
            other=0.0,
        )
        dk = tl.zeros([BLOCK_N, HD], tl.float32)
        dv = tl.zeros([BLOCK_N, HD], tl.float32)
        for m0 in range(0, length, BLOCK_M):
            rows = m0 + offs_m
            m_valid = rows < length
            q = tl.load(
                Q + (start + rows)[:, None] * stride_qt + h * HD + offs_d[None, :],
                mask=m_valid[:, None],
                other=0.0,
            )
            do = tl.load(
                DO + (start + rows)[:, None] * stride_dot + h * HD + offs_d[None, :],
                mask=m_valid[:, None],
                other=0.0,
            )
            lse = tl.load(LSE + (start + rows) * H + h, mask=m_valid, other=0.0)
            delta = tl.load(DELTA + (start + rows) * H + h, mask=m_valid, other=0.0)
            # transposed tiles: (BLOCK_N keys, BLOCK_M queries)
            s_t = tl.dot(k, tl.trans(q)) * qk_scale
            dist = tl.abs(offs_n[:, None] - rows[None, :]).to(tl.float32)
            s_t = s_t - slope * dist
            p_t = tl.exp2(s_t - lse[None, :])
            p_t = tl.where(n_valid[:, None] & m_valid[None, :], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q)
        dk = dk * sm_scale
        tl.store(
            DK + (start + offs_n)[:, None] * stride_dkt + h * HD + offs_d[None, :],
            dk.to(DK.dtype.element_ty),
            mask=n_valid[:, None],
        )
        tl.store(
            DV + (start + offs_n)[:, None] * stride_dvt + h * HD + offs_d[None, :],
            dv.to(DV.dtype.element_ty),
            mask=n_valid[:, None],
        )

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, CU, SLOPES,
        stride_qt, stride_kt, stride_vt, stride_dot, stride_dqt,
        qk_scale, sm_scale,
        H: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
        if pid_m * BLOCK_M >= length:
            return
        slope = tl.load(SLOPES + h) * 1.4426950408889634
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HD)
        m_valid = offs_m < length
        q = tl.load(
            Q + (start + offs_m)[:, None] * stride_qt + h * HD + offs_d[None, :],
            mask=m_valid[:, None],
            other=0.0,
        )
        do = tl.load(
            DO + (start + offs_m)[:, None] * stride_dot + h * HD + offs_d[None, :],
            mask=m_valid[:, None],
            other=0.0,
        )
        lse = tl.load(LSE + (start + offs_m) * H + h, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + (start + offs_m) * H + h, mask=m_valid, other=0.0)
        dq = tl.zeros([BLOCK_M, HD], tl.float32)
        for n0 in range(0, length, BLOCK_N):
            cols = n0 + offs_n
            n_valid = cols < length
            k = tl.load(
                K + (start + cols)[:, None] * stride_kt + h * HD + offs_d[None, :],
                mask=n_valid[:, None],
                other=0.0,
            )
            v = tl.load(
                V + (start + cols)[:, None] * stride_vt + h * HD + offs_d[None, :],
                mask=n_valid[:, None],
                other=0.0,
            )
            s = tl.dot(q, tl.trans(k)) * qk_scale
            dist = tl.abs(offs_m[:, None] - cols[None, :]).to(tl.float32)
            s = s - slope * dist
            p = tl.exp2(s - lse[:, None])
            p = tl.where(m_valid[:, None] & n_valid[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        dq = dq * sm_scale
        tl.store(
            DQ + (start + offs_m)[:, None] * stride_dqt + h * HD + offs_d[None, :],
            dq.to(DQ.dtype.element_ty),
            mask=m_valid[:, None],
        )


CONFIG = {"fwd": (64, 64, 4), "bwd": (64, 64, 4)}
"""(BLOCK_M, BLOCK_N, num_warps) of the forward and of both backward kernels."""


def _check(t: torch.Tensor, name: str) -> None:
    if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
        raise ValueError(
            f"alibi_triton: {name} must be (T, H, hd) with contiguous heads, got strides {t.stride()}"
        )


def _fwd(q, k, v, cu_seqlens, max_seqlen, slopes):
    T, H, HD = q.shape
    B = len(cu_seqlens) - 1
    o = torch.empty(T, H, HD, device=q.device, dtype=q.dtype)
    lse = torch.empty(T, H, device=q.device, dtype=torch.float32)
    bm, bn, warps = CONFIG["fwd"]
    grid = (triton.cdiv(max_seqlen, bm), B * H)
    sm_scale = 1.0 / math.sqrt(HD)
    _fwd_kernel[grid](
        q, k, v, o, lse, cu_seqlens, slopes,
        q.stride(0), k.stride(0), v.stride(0), o.stride(0),
        sm_scale * LOG2E,
        H=H, HD=HD, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
    )  # fmt: skip
    return o, lse


def _bwd(do, q, k, v, o, lse, cu_seqlens, max_seqlen, slopes):
    T, H, HD = q.shape
    B = len(cu_seqlens) - 1
    do = do.contiguous()
    delta = (o.float() * do.float()).sum(-1)  # (T, H)
    dq = torch.empty(T, H, HD, device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    bm, bn, warps = CONFIG["bwd"]
    sm_scale = 1.0 / math.sqrt(HD)
    _bwd_dkdv_kernel[(triton.cdiv(max_seqlen, bn), B * H)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, slopes,
        q.stride(0), k.stride(0), v.stride(0), do.stride(0), dk.stride(0), dv.stride(0),
        sm_scale * LOG2E, sm_scale,
        H=H, HD=HD, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
    )  # fmt: skip
    _bwd_dq_kernel[(triton.cdiv(max_seqlen, bm), B * H)](
        q, k, v, do, lse, delta, dq, cu_seqlens, slopes,
        q.stride(0), k.stride(0), v.stride(0), do.stride(0), dq.stride(0),
        sm_scale * LOG2E, sm_scale,
        H=H, HD=HD, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
    )  # fmt: skip
    return dq, dk, dv


class _AlibiVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, slopes):
        o, lse = _fwd(q, k, v, cu_seqlens, max_seqlen, slopes)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, slopes)
        ctx.max_seqlen = max_seqlen
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens, slopes = ctx.saved_tensors
        dq, dk, dv = _bwd(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, slopes)
        return dq, dk, dv, None, None, None


def alibi_varlen_attention(
    q_THd: torch.Tensor,
    k_THd: torch.Tensor,
    v_THd: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    slopes_H: torch.Tensor,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) - m_h |i - j|) v within each row of the packed (T, H, hd) tensors (rows given
    by the int32 cu_seqlens), bidirectional; (T, H, hd) out in q's dtype. Strided views of a fused QKV
    projection are fine as long as each token's heads are contiguous."""
    if triton is None or not q_THd.is_cuda:
        raise RuntimeError("model.attention.backend 'triton' needs CUDA and triton")
    for t, name in ((q_THd, "q"), (k_THd, "k"), (v_THd, "v")):
        _check(t, name)
    if q_THd.shape[-1] not in (16, 32, 64, 128):
        raise ValueError(f"alibi_triton: head_dim {q_THd.shape[-1]} not supported (16, 32, 64 or 128)")
    return _AlibiVarlen.apply(
        q_THd, k_THd, v_THd, cu_seqlens.int(), int(max_seqlen), slopes_H.float().contiguous()
    )
