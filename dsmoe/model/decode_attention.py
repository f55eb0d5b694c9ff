"""Decode attention over a static KV cache that reads only the cache's filled part.

The Engine preallocates its cache for max_len tokens, so a decode step has fixed shapes and replays as one
CUDA graph; the position of the new token lives on the device. Attention written in torch over that cache
(`decode_attention_reference`) reads all max_len keys and values every step, masks the ones after the
position, and casts the whole key cache to fp32 first: at batch 64 with max_len 2048 that is ~1.6 GB of K/V
and ~2.4 GB of fp32 copy a step for DS-MoE-1B's 24 layers, whatever the length of the sequences.

`decode_attention` is split-K ("flash-decoding") in two Triton kernels. The first runs one program per
(sequence, K/V head, split of the cache): it reads the position from the device, returns at once where its
split starts after it, and otherwise streams its keys and values once, all the K/V head's query heads
together (grouped-query attention, the cache never repeated), with an online softmax in fp32 (scores from
bf16 products accumulated in fp32, as `reference` computes them in fp32). The second combines the splits'
partial results. A step costs the K/V bytes of the tokens so far, and no launch depends on the host.
"""

from __future__ import annotations

import functools
import math

import torch


def decode_attention_reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """One query per sequence, (B, H, 1, hd), over the cache (B, KV, S, hd), positions after `pos` masked:
    (B, 1, H x hd) in the cache's dtype. Query heads grouped per K/V head (no copy of the cache); scores and
    softmax in fp32 (bf16 scores lose ~3 digits); probabilities @ V in the cache's dtype, accumulated in fp32
    as flash attention does."""
    B, H, _, hd = q.shape
    KV = keys.shape[1]
    scores = q.float().reshape(B, KV, H // KV, hd) @ keys.float().transpose(-2, -1)  # (B, KV, G, S)
    scores = (scores / math.sqrt(hd)).masked_fill(positions > pos, float("-inf"))
    return (scores.softmax(-1).to(values.dtype) @ values).reshape(B, 1, H * hd)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, S, chunk, scale,
        G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, HDP: tl.constexpr, NSPLIT: tl.constexpr,
        BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Program (b x KV + kv, split): the G query heads of K/V head kv over cache rows
        [split x chunk, min((split + 1) x chunk, pos + 1)); writes the running max, sum and weighted values."""
        bk = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        pos = tl.load(pos_ptr)
        start = split * chunk
        end = tl.minimum(start + chunk, pos + 1)
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, HDP)
        mask_g, mask_d = offs_g < G, offs_d < HD
        q = tl.load(
            q_ptr + (bk * G + offs_g)[:, None] * HD + offs_d[None, :],
            mask=mask_g[:, None] & mask_d[None, :],
            other=0.0,
        )
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, HDP], tl.float32)
        cache = bk * S * HD
        for n0 in range(start, end, BLOCK_N):  # no iteration where the split starts after pos
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = offs_n < end
            rows = cache + offs_n[:, None] * HD + offs_d[None, :]
            k = tl.load(k_ptr + rows, mask=valid[:, None] & mask_d[None, :], other=0.0)
            if IEEE:  # fp32 caches: tf32 would round the inputs
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(valid[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + rows, mask=valid[:, None] & mask_d[None, :], other=0.0)
            if IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        part = bk * NSPLIT + split
        tl.store(m_ptr + part * GP + offs_g, m_i)
        tl.store(l_ptr + part * GP + offs_g, l_i)
        tl.store(acc_ptr + (part * GP + offs_g)[:, None] * HDP + offs_d[None, :], acc)

    @triton.jit
    def combine_kernel(
        m_ptr, l_ptr, acc_ptr, out_ptr,
        G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, HDP: tl.constexpr, NSPLIT: tl.constexpr,
        NSPLIT_P: tl.constexpr,
    ):  # fmt: skip
        """Program b x KV + kv: the splits' partial softmaxes rescaled to their common max and added up."""
        bk = tl.program_id(0).to(tl.int64)
        offs_s = tl.arange(0, NSPLIT_P)
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, HDP)
        parts = (bk * NSPLIT + offs_s)[:, None] * GP + offs_g[None, :]
        in_range = (offs_s < NSPLIT)[:, None]
        m = tl.load(m_ptr + parts, mask=in_range, other=float("-inf"))  # (NSPLIT_P, GP)
        sums = tl.load(l_ptr + parts, mask=in_range, other=0.0)
        m_max = tl.max(m, 0)  # finite: split 0 always holds position 0
        total = tl.sum(tl.exp(m - m_max[None, :]) * sums, 0)
        out = tl.zeros([GP, HDP], tl.float32)
        for s in range(NSPLIT):
            part = bk * NSPLIT + s
            weight = tl.exp(tl.load(m_ptr + part * GP + offs_g) - m_max)  # 0 for an empty split
            out += weight[:, None] * tl.load(acc_ptr + (part * GP + offs_g)[:, None] * HDP + offs_d[None, :])
        out = out / total[:, None]
        mask = (offs_g < G)[:, None] & (offs_d < HD)[None, :]
        tl.store(out_ptr + (bk * G + offs_g)[:, None] * HD + offs_d[None, :], out, mask=mask)

    return triton, split_kernel, combine_kernel


MIN_PROGRAMS = 256
"""Splits enough for about this many programs (two per SM of an H100): at batch 1 a few K/V heads alone would
leave most of the GPU idle while one program streams the whole context."""


def decode_attention_splits(batch_kv: int, max_len: int, block_n: int) -> tuple[int, int]:
    """(splits, rows per split) of a cache of max_len rows for batch x KV-head programs."""
    blocks = -(-max_len // block_n)
    splits = max(1, min(blocks, -(-MIN_PROGRAMS // batch_kv)))
    chunk = -(-blocks // splits) * block_n  # a whole number of BLOCK_N tiles
    return -(-max_len // chunk), chunk


@torch.library.custom_op("dsmoe::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """`decode_attention_reference` (positions 0..pos of the cache) in two Triton kernels that read only those
    rows: q (B, H, 1, hd), keys and values (B, KV, S, hd), pos a one-element device tensor; (B, 1, H x hd) in
    the cache's dtype. A custom op: the Engine's compiled decode segment keeps it in its graph."""
    triton, split_kernel, combine_kernel = _kernels()
    B, H, _, hd = q.shape
    KV, S = keys.shape[1], keys.shape[2]
    G = H // KV
    GP, HDP = max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(hd))
    block_n = 64 if S >= 64 else 16
    splits, chunk = decode_attention_splits(B * KV, S, block_n)
    ieee = values.dtype == torch.float32
    q = q.to(values.dtype).contiguous()
    keys, values = keys.contiguous(), values.contiguous()
    m = torch.empty(B * KV, splits, GP, device=q.device, dtype=torch.float32)
    sums = torch.empty_like(m)
    acc = torch.empty(B * KV, splits, GP, HDP, device=q.device, dtype=torch.float32)
    split_kernel[(B * KV, splits)](
        q, keys, values, pos, m, sums, acc, S, chunk, 1.0 / math.sqrt(hd),
        G=G, GP=GP, HD=hd, HDP=HDP, NSPLIT=splits, BLOCK_N=block_n, IEEE=ieee,
    )  # fmt: skip
    out = torch.empty(B, 1, H * hd, device=q.device, dtype=values.dtype)
    combine_kernel[(B * KV,)](
        m, sums, acc, out, G=G, GP=GP, HD=hd, HDP=HDP, NSPLIT=splits, NSPLIT_P=triton.next_power_of_2(splits)
    )
    return out


@decode_attention.register_fake
def _(q, keys, values, pos):
    B, H, _, hd = q.shape
    return q.new_empty(B, 1, H * hd, dtype=values.dtype)
