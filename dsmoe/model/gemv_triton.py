"""The Triton kernels of the gather-GEMV decode path (dsmoe/model/sparse.py calls them): each program reads
one (token, expert) pair's rows of the experts' stacked weights in place, with the top-K routing folded into
the up projection's programs where the Engine asks for it.

Their own module, imported only when a kernel runs (CPU installs lack Triton), so that the kernels and the
jit helper they share are module globals: Triton's interpreter resolves a kernel's names there, not in an
enclosing function.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: sparse.py checks triton_available() first
    triton = None


if triton is not None:

    @triton.jit
    def gather_sum_kernel(src_ptr, rows_ptr, y_ptr, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
        """y[t, d] = sum_k src[rows[t, k], d] for one block of d (fp32 sum)."""
        t = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            row = tl.load(rows_ptr + t * K + k).to(tl.int64)
            acc += tl.load(src_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        tl.store(y_ptr + t * D + offs_d, acc.to(y_ptr.dtype.element_ty), mask=mask_d)

    @triton.jit
    def softmax_topk(
        scores_ptr, t, E, K: tl.constexpr, KP: tl.constexpr, BLOCK_E: tl.constexpr, RENORMALIZE: tl.constexpr
    ):  # fmt: skip
        """Token t's K largest softmax probabilities of its E fp32 router scores, descending (ties to the lower
        expert), renormalised to sum 1 if asked, and their expert ids: two (KP,) vectors, slots K.. zero."""
        offs_e = tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        logits = tl.load(scores_ptr + t * E + offs_e, mask=mask_e, other=float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=0))
        p = p / tl.sum(p, axis=0)
        offs_k = tl.arange(0, KP)
        gates = tl.zeros([KP], dtype=tl.float32)
        experts = tl.zeros([KP], dtype=tl.int32)
        remaining = tl.where(mask_e, p, -1.0)
        total = 0.0
        for r in tl.static_range(K):
            best = tl.max(remaining, axis=0)
            # a NaN row matches no probability: clamp, so the experts' kernels never read past expert E-1
            idx = tl.minimum(tl.min(tl.where(remaining == best, offs_e, BLOCK_E), axis=0), E - 1)
            total += best
            gates = tl.where(offs_k == r, best, gates)
            experts = tl.where(offs_k == r, idx, experts)
            remaining = tl.where(offs_e == idx, -1.0, remaining)
        if RENORMALIZE:
            gates = gates * (1.0 / tl.maximum(total, 1e-20))
        return gates, experts

    @triton.jit
    def softmax_topk_kernel(
        logits_ptr, gate_ptr, expert_ptr, E,
        K: tl.constexpr, KP: tl.constexpr, BLOCK_E: tl.constexpr, RENORMALIZE: tl.constexpr,
    ):  # fmt: skip
        """One token: the K largest of the softmax of its E fp32 router scores (descending) with their
        expert ids; renormalised to sum 1 if asked."""
        t = tl.program_id(0).to(tl.int64)
        gates, experts = softmax_topk(logits_ptr, t, E, K, KP, BLOCK_E, RENORMALIZE)
        offs_k = tl.arange(0, KP)
        tl.store(gate_ptr + t * K + offs_k, gates, mask=offs_k < K)
        tl.store(expert_ptr + t * K + offs_k, experts.to(tl.int64), mask=offs_k < K)

    @triton.jit
    def up_kernel(
        x_ptr, w_ptr, e_ptr, g_ptr, h_ptr, scores_ptr, D, F, E,
        K: tl.constexpr, ACT: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
        ROUTE: tl.constexpr, KP: tl.constexpr, BLOCK_E: tl.constexpr, RENORMALIZE: tl.constexpr,
    ):  # fmt: skip
        """h[p, f] = act(sum_d x[p // K, d] * w_in[e_p, f, d]) for one block of f; a pair of weight 0 (a
        threshold rule dropped it) reads no weights. With ROUTE the pair's expert and weight come from the
        token's router scores here (softmax and top-K, a few hundred flops each program repeats), and the
        first block's program writes them for the down kernel: no launch of their own."""
        p = tl.program_id(0)
        offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        t = (p // K).to(tl.int64)
        if ROUTE:
            gates, experts = softmax_topk(scores_ptr, t, E, K, KP, BLOCK_E, RENORMALIZE)
            pick = tl.arange(0, KP) == p % K
            g = tl.sum(tl.where(pick, gates, 0.0), axis=0)
            e = tl.sum(tl.where(pick, experts, 0), axis=0)
            if tl.program_id(1) == 0:
                tl.store(g_ptr + p, g)
                tl.store(e_ptr + p, e.to(tl.int64))
            e = e.to(tl.int64)
        else:
            g = tl.load(g_ptr + p)
            e = tl.load(e_ptr + p).to(tl.int64)
        mask_f = offs_f < tl.where(g != 0, F, 0)
        rows_in = F * 2 if ACT != 0 else F
        w_base = w_ptr + e * rows_in * D
        acc = tl.zeros([BLOCK_F], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_F], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            xv = tl.load(x_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            m = mask_f[:, None] & mask_d[None, :]
            w = tl.load(w_base + offs_f[:, None] * D + offs_d[None, :], mask=m, other=0.0)
            acc += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
            if ACT != 0:  # gated: rows F.. hold the value half
                w2 = tl.load(w_base + (F + offs_f)[:, None] * D + offs_d[None, :], mask=m, other=0.0)
                acc2 += tl.sum(w2.to(tl.float32) * xv[None, :], axis=1)
        if ACT == 1:  # SwiGLU
            h = acc * tl.sigmoid(acc) * acc2
        else:  # exact GeLU (erf), times the value half for GeGLU
            h = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
            if ACT == 2:
                h = h * acc2
        tl.store(h_ptr + p * F + offs_f, h, mask=mask_f)

    @triton.jit
    def down_kernel(
        h_ptr, w_ptr, e_ptr, g_ptr, y_ptr, P, D, F,
        K: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """y[s * K + k, t, d] = g_p * sum_{f in split s} h[p, f] * w_out[e_p, f, d] for pair p = (t, k): one
        (BLOCK_F, BLOCK_D) tile of the expert's rows per program, the partials summed afterwards (no
        atomics)."""
        p = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        split = tl.program_id(2)
        offs_f = split * BLOCK_F + tl.arange(0, BLOCK_F)
        mask_d = offs_d < D
        e = tl.load(e_ptr + p).to(tl.int64)
        g = tl.load(g_ptr + p).to(tl.float32)
        mask_f = offs_f < tl.where(g != 0, F, 0)  # a dropped pair reads no weights (its partial is 0)
        hv = tl.load(h_ptr + p * F + offs_f, mask=mask_f, other=0.0)
        m = mask_f[:, None] & mask_d[None, :]
        w = tl.load(w_ptr + e * F * D + offs_f[:, None] * D + offs_d[None, :], mask=m, other=0.0)
        acc = tl.sum(w.to(tl.float32) * hv[:, None], axis=0)
        row = split * P + (p % K) * (P // K) + p // K
        tl.store(y_ptr + row * D + offs_d, acc * g, mask=mask_d)
