"""Sparse expert compute for inference, with no host sync: top-K routing as a fixed-shape dispatch, and any
per-token set of experts (threshold rules) in fixed slots.

Every token keeps exactly K experts under top-K, so the (token, expert) pairs are a fixed (T, K) table and
nothing here asks the host how many tokens an expert got (no nonzero(), no .item(), no bincount, which syncs
on CUDA). Three paths compute sum_k w_tk E_{e_tk}(x_t) on the experts' stacked weights in place (no copy of
a weight):

  'gemv'     small batches (decode): two Triton kernels over the pairs, each reading only the chosen experts'
             rows of w_in and w_out (a gather-GEMV), the router weight applied in the second; the first can
             take the top-K routing from the router's scores itself (`gemv_routed_partials`); CUDA only.
  'grouped'  large batches (prefill): pairs sorted by expert (argsort of the expert ids, counts by
             scatter_add and cumsum on the device), the sorted token rows gathered, two torch._grouped_mm
             (bf16, Hopper) with the activation and router weight between them, the rows put back in pair
             order and summed over K; differentiable (the SMoE baseline trains through it).
  'loop'     the portable path (CPU, or any dtype): the same sort, a loop over experts (host sync: fine on CPU).

`moe_topk_forward` picks the fastest available path; `moe_masked_forward` (below) runs the threshold rules,
its up projection a Triton grouped GEMM that gathers the token rows as it loads them (`gather_up`). (That
GEMM ran slower than gather + cuBLAS's grouped GEMM for top-K, and faster for the threshold rules' fixed
slots, in four runs on one H100, benchmarks/infer23_h100/: each rule keeps the faster.)
Triton is imported only when a Triton path runs.
"""

from __future__ import annotations

import functools

import torch

from dsmoe.model.mlp import activate
from dsmoe.model.router import router_scores

GEMV_MAX_TOKENS = 16
"""Up to this many tokens the gather-GEMV path runs (decode); beyond, the sorted grouped GEMMs."""


def grouped_mm_available(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs bf16 on Hopper-class GPUs."""
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pick_path(x_TD: torch.Tensor) -> str:
    """The fastest path for these tokens: gemv (few tokens, CUDA), grouped (Hopper bf16), else loop."""
    inference_kernels = x_TD.is_cuda and not torch.is_grad_enabled() and triton_available()
    if inference_kernels and x_TD.shape[0] <= GEMV_MAX_TOKENS:
        return "gemv"
    return "grouped" if grouped_mm_available(x_TD) else "loop"


def sort_pairs(experts_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, counts): the pair indices (into the flattened (T*K,) table) sorted by expert, stable; and
    how many pairs each expert got, (E,) int32. No host sync."""
    flat = experts_TK.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order, counts


def moe_topk_forward(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str,
    path: str | None = None,
) -> torch.Tensor:
    """y_t = sum_k weights_tk * act(x_t W_in[e_tk]^T) W_out[e_tk] for (T, K) expert ids and weights.

    w_in: (E, F_in, D) with F_in = 2F for SwiGLU; w_out: (E, F, D). `path` forces gemv|grouped|loop."""
    path = path or pick_path(x_TD)
    if path == "gemv":
        return gemv_topk_forward(x_TD, weights_TK, experts_TK, w_in, w_out, activation)
    if path not in ("grouped", "loop"):
        raise ValueError(f"expert path must be gemv|grouped|loop, got {path!r}")
    T, K = experts_TK.shape
    order, counts = sort_pairs(experts_TK, w_in.shape[0])
    offsets = counts.cumsum(0, dtype=torch.int32)
    x_sorted = x_TD.index_select(0, order // K)  # (P, D) token rows in expert order
    w_sorted = weights_TK.reshape(-1).index_select(0, order).to(x_TD.dtype).unsqueeze(-1)  # (P, 1)
    if path == "grouped":
        h = activate(torch._grouped_mm(x_sorted, w_in.transpose(1, 2), offs=offsets), activation)
        out_sorted = torch._grouped_mm(h * w_sorted, w_out, offs=offsets)  # (P, D), weighted
    else:
        out_sorted = torch.empty_like(x_sorted)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                rows = slice(start, start + count)
                h = activate(x_sorted[rows] @ w_in[expert].T, activation)
                out_sorted[rows] = (h @ w_out[expert]) * w_sorted[rows]
                start += count
    # Row of pair (t, k) in the sorted order: the inverse permutation (a scatter of P ints, no sort).
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    if out_sorted.is_cuda and not torch.is_grad_enabled() and triton_available():
        return gather_sum(out_sorted, inverse.view(T, K))  # one pass: each token sums its K rows
    return out_sorted.index_select(0, inverse).view(T, K, -1).sum(1)


# ---------------------------------------------------------------------------------------------------------
# Triton gather-GEMV (decode): each program reads one pair's expert rows in place.

ACTIVATIONS = {"gelu": 0, "swiglu": 1, "geglu": 2}


@functools.cache
def _gemv_kernels():
    """triton and the gather-GEMV kernels (dsmoe/model/gemv_triton.py), imported when one first runs."""
    from dsmoe.model.gemv_triton import (
        down_kernel,
        gather_sum_kernel,
        softmax_topk_kernel,
        triton,
        up_kernel,
    )

    return triton, up_kernel, down_kernel, gather_sum_kernel, softmax_topk_kernel


def gemv_topk_forward(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """The decode path, (T, D) in x's dtype: the gather-GEMV partial sums added up."""
    partials = gemv_topk_partials(x_TD, weights_TK, experts_TK, w_in, w_out, activation)
    return partials.sum(0).to(x_TD.dtype)


GEMV_TILES = {"up_f": 4, "up_d": 2048, "up_warps": 4, "down_f": 128, "down_d": 128, "down_warps": 2}
"""The gather-GEMV's tiles: hidden units x model dims each up program reads (and its warps), and the down
program's (hidden units, model dims) tile. benchmarks/sweep_gemv.py picked these on an H100 (2026-12-07,
benchmarks/infer23_h100/sweep_gemv_ca73201.md; down_warps 2 was the threshold case's best, 4 top-4's, within
1% of each other there): whole-model decode at batch 1 618 tok/s at top-4 and 569 at threshold 1.5, where the
tiles before (up_d 1024, down_f 64, down_warps 4) gave 600 and 492 (auto_tiles_ca73201.md, sparse_37b972b.md)."""


def gemv_tiles(overrides: dict | None = None) -> dict:
    """GEMV_TILES with `overrides` in place of its entries; a key it does not have is an error (a misspelt
    tile would otherwise be ignored, and a benchmark would record tiles it never ran)."""
    unknown = set(overrides or {}) - set(GEMV_TILES)
    if unknown:
        raise ValueError(f"gather-GEMV tiles: unknown {sorted(unknown)}, known {sorted(GEMV_TILES)}")
    return {**GEMV_TILES, **(overrides or {})}


def gemv_topk_partials(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str,
    tiles: dict | None = None,
) -> torch.Tensor:
    """The gather-GEMV's fp32 partial outputs, (S, T, D) whose sum over S is the top-K MLP output: one per
    (split of the hidden units, k). The Engine sums them inside its next compiled segment (one launch less
    a layer). Small tiles and many programs: at batch 1 only K experts' rows are read, and they must stream
    from every SM. `tiles` overrides GEMV_TILES' entries."""
    K = experts_TK.shape[1]
    return _gemv_partials(
        x_TD, weights_TK.reshape(-1).contiguous(), experts_TK.reshape(-1).contiguous(), None, K, False,
        w_in, w_out, activation, tiles,
    )  # fmt: skip


def gemv_routed_partials(
    x_TD: torch.Tensor,
    scores_TE: torch.Tensor,
    k: int,
    renormalize: bool,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str,
    tiles: dict | None = None,
) -> torch.Tensor:
    """`gemv_topk_partials` of the top k experts of each token's fp32 router scores (T, E): the up kernel's
    programs take the softmax and top-k themselves (what `route_topk`'s kernel does), so decode routes and
    runs its experts in two launches instead of three."""
    T = scores_TE.shape[0]
    gates = torch.empty(T * k, device=x_TD.device, dtype=torch.float32)
    experts = torch.empty(T * k, device=x_TD.device, dtype=torch.long)
    return _gemv_partials(
        x_TD, gates, experts, scores_TE.float().contiguous(), k, renormalize, w_in, w_out, activation, tiles
    )


def _gemv_partials(x_TD, gates, experts, scores_TE, K, renormalize, w_in, w_out, activation, tiles):
    """The two gather-GEMV launches over the T x K pairs (gates, experts: (T*K,), written by the up kernel
    from `scores_TE` when given)."""
    triton, up_kernel, down_kernel, *_ = _gemv_kernels()
    t = GEMV_TILES if tiles is None else gemv_tiles(tiles)
    T = x_TD.shape[0]
    E, F, D = w_out.shape
    if activation not in ACTIVATIONS or (w_in.shape[1] == 2 * F) != (activation in ("swiglu", "geglu")):
        raise ValueError(f"gather-GEMV: activation {activation!r} does not match w_in {tuple(w_in.shape)}")
    x_TD, w_in, w_out = x_TD.contiguous(), w_in.contiguous(), w_out.contiguous()
    route = scores_TE is not None
    P = T * K
    up_f, up_d = min(t["up_f"], triton.next_power_of_2(F)), min(t["up_d"], triton.next_power_of_2(D))
    h = torch.empty(P, F, device=x_TD.device, dtype=torch.float32)
    up_kernel[(P, triton.cdiv(F, up_f))](
        x_TD, w_in, experts, gates, h, scores_TE if route else gates, D, F, E,
        K=K, ACT=ACTIVATIONS[activation], BLOCK_F=up_f, BLOCK_D=up_d, ROUTE=route,
        KP=triton.next_power_of_2(K), BLOCK_E=triton.next_power_of_2(E), RENORMALIZE=renormalize, num_warps=t["up_warps"],
    )  # fmt: skip
    down_f, down_d = min(t["down_f"], triton.next_power_of_2(F)), min(t["down_d"], triton.next_power_of_2(D))
    splits = triton.cdiv(F, down_f)
    y = torch.empty(splits * K, T, D, device=x_TD.device, dtype=torch.float32)
    down_kernel[(P, triton.cdiv(D, down_d), splits)](
        h, w_out, experts, gates, y, P, D, F, K=K, BLOCK_F=down_f, BLOCK_D=down_d, num_warps=t["down_warps"]
    )
    return y


def gather_sum(src_PD: torch.Tensor, rows_TK: torch.Tensor) -> torch.Tensor:
    """(T, D) with row t = sum_k src[rows[t, k]] (Triton, CUDA): the un-permute and the sum over K in one
    pass."""
    triton, _, _, kernel, _ = _gemv_kernels()
    T, K = rows_TK.shape
    D = src_PD.shape[1]
    y = torch.empty(T, D, device=src_PD.device, dtype=src_PD.dtype)
    block_d = min(1024, triton.next_power_of_2(D))
    kernel[(T, triton.cdiv(D, block_d))](
        src_PD.contiguous(), rows_TK.contiguous(), y, D, K=K, BLOCK_D=block_d
    )
    return y


def route_topk(
    h_TD: torch.Tensor, router_weight: torch.Tensor, k: int, renormalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, expert ids), each (T, k): the k largest of softmax(h W_r^T), descending, for decode (CUDA).

    Two launches: the router scores from one GEMM that accumulates and writes fp32 (as the model's Router
    does for bf16), then one Triton program per token for the softmax and top-k (and the renormalisation).
    A single fused kernel was slower: one program per token read the whole (E, D) router serially."""
    triton, *_, kernel = _gemv_kernels()
    T = h_TD.shape[0]
    E = router_weight.shape[0]
    logits = router_scores(h_TD, router_weight)
    gates = torch.empty(T, k, device=h_TD.device, dtype=torch.float32)
    experts = torch.empty(T, k, device=h_TD.device, dtype=torch.long)
    kernel[(T,)](
        logits.contiguous(), gates, experts, E,
        K=k, KP=triton.next_power_of_2(k), BLOCK_E=triton.next_power_of_2(E), RENORMALIZE=renormalize,
    )  # fmt: skip
    return gates, experts


# ---------------------------------------------------------------------------------------------------------
# Any per-token set of experts (threshold rules) without a host sync: every pair has a fixed slot.
#
# A threshold rule keeps a number of (token, expert) pairs that only the device knows. Every pair gets a
# row (pair_rows: one cumulative sum over the expert-major mask, no sort, no nonzero()), the kept ones first
# in expert-major order; the buffers are sized for every pair (T*E rows, allocated, never cleared), and each
# kernel reads the kept count from the device and touches only the rows below it: torch._grouped_mm (its
# groups end at the count) and the Triton kernels here. So the cost follows the kept pairs, the shapes are
# fixed, and a CUDA graph captures it.


MASKED_MAX_BYTES = 2**31
"""moe_masked_forward's largest slot buffer (T x E rows of D in x's dtype): more tokens than fit run in
chunks of tokens (the DS-MoE-1B shape takes 16,384 tokens in one: 2 GiB in bf16; a 32k-token eval batch of
64 experts of d 4096 would otherwise ask for 17 GB). The torch path (CPU) also sums an fp32 copy of it."""


def masked_path_available(x: torch.Tensor) -> bool:
    """moe_masked_forward runs where torch._grouped_mm does for x: bf16 on Hopper, or 16/32-bit on the CPU."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    return grouped_mm_available(x) if x.is_cuda else x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def pair_rows(keep_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, offsets): the row of every (token, expert) pair, (T, E) int32, a permutation of 0..T*E-1: the
    kept pairs first, in expert-major order (tokens ascending within an expert), then the dropped ones; and
    the (E,) int32 ends of the experts' groups of kept rows (offsets[-1] pairs are kept). One scan over the
    flattened expert-major mask (a scan down the T axis runs one thread per expert: slow); no host sync."""
    T, E = keep_TE.shape
    keep_flat = keep_TE.T.reshape(-1)  # (E*T,) expert-major
    kept_upto = keep_flat.cumsum(0, dtype=torch.int32)  # inclusive
    index = torch.arange(T * E, dtype=torch.int32, device=keep_TE.device)
    rows = torch.where(keep_flat, kept_upto - 1, kept_upto[-1] + index - kept_upto)  # dropped: after the kept
    return rows.view(E, T).T.contiguous(), kept_upto.view(E, T)[:, -1].contiguous()


def moe_masked_forward(
    x_TD: torch.Tensor,
    weights_TE: torch.Tensor,
    keep_TE: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str,
    kernels: bool | None = None,
    blocks: dict | None = None,
) -> torch.Tensor:
    """y_t = sum over the experts e token t keeps of weights_te * act(x_t W_in[e]^T) W_out[e], with no host
    sync: the threshold rules' sparse path; the same bits every run (a fixed-order fp32 sum per token).

    Needs torch._grouped_mm for x (bf16 on Hopper; CPU). `kernels` forces the Triton kernels (CUDA, or CPU
    under Triton's interpreter: the up projection `gather_up`, a grouped GEMM that gathers its rows as it
    loads them with act x weight in its epilogue, and the combine; `blocks` sets gather_up's tiles and
    'combine_d' the combine's) or their torch equivalents, which touch every slot (None: Triton on CUDA where
    it imports)."""
    T, E = keep_TE.shape
    D, C = x_TD.shape[1], T * E
    chunk = max(1, MASKED_MAX_BYTES // (E * D * x_TD.element_size()))
    if T > chunk:  # tokens are independent here: the same function, a bounded buffer
        args = (w_in, w_out, activation, kernels, blocks)
        return torch.cat(
            [
                moe_masked_forward(
                    x_TD[i : i + chunk], weights_TE[i : i + chunk], keep_TE[i : i + chunk], *args
                )
                for i in range(0, T, chunk)
            ]
        )
    rows_TE, offsets_E = pair_rows(keep_TE)
    # What each row holds: its token and its weight (rows is a permutation: a scatter without collisions).
    flat_rows = rows_TE.reshape(-1).long()
    tokens_TE = torch.arange(T, dtype=torch.int32, device=x_TD.device).unsqueeze(1).expand(T, E)
    token_of_row = torch.empty(C, dtype=torch.int32, device=x_TD.device).scatter_(
        0, flat_rows, tokens_TE.reshape(-1)
    )
    weight_of_row = torch.empty(C, dtype=torch.float32, device=x_TD.device).scatter_(
        0, flat_rows, weights_TE.reshape(-1).float()
    )
    total = offsets_E[-1:]  # the kept count, on the device
    if kernels is None:
        kernels = x_TD.is_cuda and triton_available()
    if not kernels:
        x_sorted = x_TD.index_select(0, token_of_row)
        h = torch._grouped_mm(x_sorted, w_in.transpose(1, 2), offs=offsets_E)
        h = activate(h, activation) * weight_of_row[:, None].to(h.dtype)
        out = torch._grouped_mm(h, w_out, offs=offsets_E)  # rows from offsets[-1] on: never written
        out = torch.cat([out, out.new_zeros(1, D)])  # row C reads as zero: the dropped pairs' row
        rows = torch.where(rows_TE < total, rows_TE, C)
        return out.index_select(0, rows.reshape(-1)).view(T, E, D).float().sum(1).to(x_TD.dtype)
    triton, combine_kernel, _ = _masked_kernels()
    x_TD, w_in, w_out = x_TD.contiguous(), w_in.contiguous(), w_out.contiguous()
    F_ = w_out.shape[1]
    if activation not in ACTIVATIONS or (w_in.shape[1] == 2 * F_) != (activation in ("swiglu", "geglu")):
        raise ValueError(f"masked experts: activation {activation!r} does not match w_in {tuple(w_in.shape)}")
    blocks = dict(blocks or {})
    block_d = blocks.pop("combine_d", min(1024, triton.next_power_of_2(D)))
    h_act = gather_up(x_TD, token_of_row, weight_of_row, offsets_E, w_in, F_, activation, **blocks)
    out = torch._grouped_mm(h_act, w_out, offs=offsets_E)  # (C, D), weighted, kept rows only
    y = torch.empty(T, D, device=x_TD.device, dtype=x_TD.dtype)
    combine_kernel[(T, triton.cdiv(D, block_d))](out, rows_TE, y, total, D, E=E, BLOCK_D=block_d)
    return y


def gather_up(
    x_TD: torch.Tensor,
    token_of_row: torch.Tensor,
    weight_of_row: torch.Tensor,
    offsets_E: torch.Tensor,
    w_in: torch.Tensor,
    F_: int,
    activation: str,
    block_m: int = 64,
    block_n: int = 128,
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """(C, F): row r = act(x[token_of_row[r]] W_in[e]^T) * weight_of_row[r] for the kept rows (r below
    offsets[-1], expert e the group r falls in), the rest unwritten. The grid covers the most tiles any
    split of the rows into groups can need; a table on the device maps each tile to its expert and first
    row, and tiles past the last do nothing (fixed shapes, no host sync)."""
    triton, *_, up_kernel = _masked_kernels()
    C, E, D = token_of_row.shape[0], offsets_E.shape[0], x_TD.shape[1]
    starts_E = torch.cat([offsets_E.new_zeros(1), offsets_E[:-1]])
    tiles_E = (offsets_E - starts_E + block_m - 1) // block_m
    tile_ends = tiles_E.cumsum(0, dtype=torch.int32)
    max_tiles = triton.cdiv(C, block_m) + E
    tile = torch.arange(max_tiles, dtype=torch.int32, device=x_TD.device)
    tile_expert = torch.searchsorted(tile_ends, tile, right=True).clamp_max(E - 1).to(torch.int32)
    tile_row = starts_E[tile_expert] + (tile - (tile_ends - tiles_E)[tile_expert]) * block_m
    h_act = torch.empty(C, F_, device=x_TD.device, dtype=x_TD.dtype)
    up_kernel[(max_tiles, triton.cdiv(F_, block_n))](
        x_TD, token_of_row, w_in, weight_of_row, h_act, tile_expert, tile_row, offsets_E, tile_ends[-1:], D, F_,
        ACT=ACTIVATIONS[activation], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return h_act


@functools.cache
def _masked_kernels():
    try:  # in a try, as in _gemv_kernels: transformers' remote-code check then does not require triton
        import triton
        import triton.language as tl
    except ImportError:  # callers check triton_available() first
        raise

    @triton.jit
    def combine_kernel(src_ptr, rows_ptr, y_ptr, total_ptr, D, E: tl.constexpr, BLOCK_D: tl.constexpr):
        """y[t, block] = the fp32 sum, in expert order, of src[rows[t, e], block] over the kept rows: E loads
        unrolled, so they are in flight together; a dropped pair's load is masked off (reads nothing)."""
        t = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        total = tl.load(total_ptr)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for e in tl.static_range(E):
            row = tl.load(rows_ptr + t * E + e)
            kept_d = offs_d < tl.where(row < total, D, 0)
            acc += tl.load(src_ptr + row.to(tl.int64) * D + offs_d, mask=kept_d, other=0.0).to(tl.float32)
        tl.store(y_ptr + t * D + offs_d, acc.to(y_ptr.dtype.element_ty), mask=offs_d < D)

    @triton.jit
    def up_kernel(
        x_ptr, token_ptr, w_ptr, weight_ptr, out_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr, n_tiles_ptr,
        D, F, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """One (BLOCK_M rows of one expert's group, BLOCK_N hidden units) tile of act(x W_in[e]^T) * weight:
        the x rows loaded through the token table (no gathered copy), gate and value halves side by side."""
        tile = tl.program_id(0)
        if tile < tl.load(n_tiles_ptr):
            e = tl.load(tile_expert_ptr + tile).to(tl.int64)
            offs_m = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
            mask_m = offs_m < tl.load(offsets_ptr + e)
            token = tl.load(token_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
            offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < F
            width = F * 2 if ACT != 0 else F
            w_base = w_ptr + e * width * D
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < D
                a = tl.load(
                    x_ptr + token[:, None] * D + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0,
                )
                m_b = mask_k[:, None] & mask_n[None, :]
                b = tl.load(
                    w_base + offs_n[None, :] * D + offs_k[:, None], mask=m_b, other=0.0
                )  # W_in[e]^T tile
                acc = tl.dot(a, b, acc)
                if ACT != 0:  # gated: rows F.. of W_in[e] give the value half
                    b2 = tl.load(w_base + (F + offs_n)[None, :] * D + offs_k[:, None], mask=m_b, other=0.0)
                    acc2 = tl.dot(a, b2, acc2)
            if ACT == 1:  # SwiGLU
                h = acc * tl.sigmoid(acc) * acc2
            else:  # exact GeLU (erf), times the value half for GeGLU
                h = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
                if ACT == 2:
                    h = h * acc2
            h = h * tl.load(weight_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
            out = out_ptr + offs_m[:, None].to(tl.int64) * F + offs_n[None, :]
            tl.store(out, h.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    return triton, combine_kernel, up_kernel
