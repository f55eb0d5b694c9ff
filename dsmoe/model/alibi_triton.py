"""Varlen bidirectional attention with ALiBi as Triton kernels (CUDA only): the encoder's 'triton' backend.

MosaicBERT's rows are short (128 tokens in pretraining, 512 at most), where FlexAttention over the packed
tokens spends most of its time outside the matrix units (a block mask over one long sequence, a generic
score_mod). These kernels work per (row, head) on the packed (T, H, hd) layout, read the row bounds from
cu_seqlens, add -m_h |i - j| inside the kernel and never touch padding:

- forward: grid (query blocks of the longest row, B x H); each program streams the key blocks of its row
  (online softmax) and writes the output and the log-sum-exp (base 2);
- backward: delta = rowsum(out * dout) (one small kernel), then one kernel for dK, dV (grid over key
  blocks, streaming the row's query blocks) and one for dQ (grid over query blocks, streaming key blocks): no atomics, so
  the result is deterministic.

Also a GeGLU (GELU(gate) * value) forward/backward pair. All are torch custom ops, so a compiled block
traces them as single nodes. Attention dropout is not supported (MosaicBERT trains with 0). Held equal to varlen_eager by
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
        Q, K, V, OUT, LSE, CU, SLOPES,
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
            OUT + (start + offs_m)[:, None] * stride_ot + h * HD + offs_d[None, :],
            acc.to(OUT.dtype.element_ty),
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

    @triton.jit
    def _delta_kernel(OUT, DO, DELTA, n_rows, HD: tl.constexpr, BLOCK_R: tl.constexpr):
        """delta[r] = sum_d O[r, d] dO[r, d] over the (T x H, hd) rows, fp32."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        valid = rows < n_rows
        offs = rows.to(tl.int64)[:, None] * HD + tl.arange(0, HD)[None, :]
        o = tl.load(OUT + offs, mask=valid[:, None], other=0.0).to(tl.float32)
        do = tl.load(DO + offs, mask=valid[:, None], other=0.0).to(tl.float32)
        tl.store(DELTA + rows, tl.sum(o * do, 1), mask=valid)

    @triton.jit
    def _geglu_fwd_kernel(H_, Y, n, INNER: tl.constexpr, BLOCK: tl.constexpr):
        """Y[t, i] = GELU(H[t, i]) * H[t, INNER + i] (exact GELU), over n = T x INNER outputs."""
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = idx < n
        row = idx // INNER
        col = idx % INNER
        gate = tl.load(H_ + row * 2 * INNER + col, mask=valid, other=0.0).to(tl.float32)
        value = tl.load(H_ + row * 2 * INNER + INNER + col, mask=valid, other=0.0).to(tl.float32)
        gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        tl.store(Y + idx, (gelu * value).to(Y.dtype.element_ty), mask=valid)

    @triton.jit
    def _geglu_bwd_kernel(DY, H_, DH, n, INNER: tl.constexpr, BLOCK: tl.constexpr):
        """dgate = dY * value * GELU'(gate), dvalue = dY * GELU(gate), into DH = [dgate; dvalue]."""
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = idx < n
        row = idx // INNER
        col = idx % INNER
        dy = tl.load(DY + idx, mask=valid, other=0.0).to(tl.float32)
        gate = tl.load(H_ + row * 2 * INNER + col, mask=valid, other=0.0).to(tl.float32)
        value = tl.load(H_ + row * 2 * INNER + INNER + col, mask=valid, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327
        tl.store(
            DH + row * 2 * INNER + col, (dy * value * (cdf + gate * pdf)).to(DH.dtype.element_ty), mask=valid
        )
        tl.store(DH + row * 2 * INNER + INNER + col, (dy * gate * cdf).to(DH.dtype.element_ty), mask=valid)


CONFIG = {"fwd": (64, 64, 4), "bwd": (64, 64, 4)}
"""(BLOCK_M, BLOCK_N, num_warps) of the forward and of both backward kernels."""


def _heads_contiguous(t: torch.Tensor) -> torch.Tensor:
    """(T, H, hd) with each token's heads contiguous (a strided view of a fused QKV is fine as it is)."""
    return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()


def _fwd(q, k, v, cu_seqlens, max_seqlen, slopes):
    q, k, v = (_heads_contiguous(t) for t in (q, k, v))
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
    q, k, v = (_heads_contiguous(t) for t in (q, k, v))
    T, H, HD = q.shape
    B = len(cu_seqlens) - 1
    do = do.contiguous()
    delta = torch.empty(T, H, device=q.device, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(T * H, 64),)](o, do, delta, T * H, HD=HD, BLOCK_R=64, num_warps=4)
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


# Custom ops: a compiled block traces them as single opaque nodes (no graph break around the attention), and
# their fake versions give dynamo the output shapes for any packed token count.
@torch.library.custom_op("dsmoe::alibi_varlen_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    slopes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd(q, k, v, cu_seqlens, max_seqlen, slopes)


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, slopes):
    T, H, HD = q.shape
    return q.new_empty(T, H, HD), q.new_empty(T, H, dtype=torch.float32)


@torch.library.custom_op("dsmoe::alibi_varlen_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    slopes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(do, q, k, v, o, lse, cu_seqlens, max_seqlen, slopes)


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, max_seqlen, slopes):
    T, H, HD = q.shape
    return tuple(q.new_empty(T, H, HD) for _ in range(3))


def _setup_attention(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, slopes = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, slopes)
    ctx.max_seqlen = max_seqlen


def _attention_backward(ctx, do, dlse):
    q, k, v, o, lse, cu_seqlens, slopes = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, slopes)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_attention_backward, setup_context=_setup_attention)


# GeGLU: one pass over [gate; value] each way (inductor's fused backward of the split + GELU + product
# ran at about a third of the memory bandwidth on the H200, benchmarks/encoder/explore_h200_run1.md).
@torch.library.custom_op("dsmoe::geglu", mutates_args=())
def geglu(h: torch.Tensor) -> torch.Tensor:
    """GELU(gate) * value for h = [gate; value] on its last dimension (exact GELU), CUDA."""
    h = h.contiguous()
    inner = h.shape[-1] // 2
    y = h.new_empty(*h.shape[:-1], inner)
    n = y.numel()
    _geglu_fwd_kernel[(triton.cdiv(n, 1024),)](h, y, n, INNER=inner, BLOCK=1024, num_warps=4)
    return y


@geglu.register_fake
def _(h):
    return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)


@torch.library.custom_op("dsmoe::geglu_bwd", mutates_args=())
def _geglu_bwd(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    h, dy = h.contiguous(), dy.contiguous()
    dh = torch.empty_like(h)
    n = dy.numel()
    _geglu_bwd_kernel[(triton.cdiv(n, 1024),)](dy, h, dh, n, INNER=h.shape[-1] // 2, BLOCK=1024, num_warps=4)
    return dh


@_geglu_bwd.register_fake
def _(dy, h):
    return torch.empty_like(h)


def _setup_geglu(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _geglu_backward(ctx, dy):
    return _geglu_bwd(dy, ctx.saved_tensors[0])


geglu.register_autograd(_geglu_backward, setup_context=_setup_geglu)
