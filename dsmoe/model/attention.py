"""Causal self-attention with RoPE and grouped-query heads, behind one interface with two backends.

Backends: 'sdpa' (torch.nn.functional.scaled_dot_product_attention, which dispatches to flash /
memory-efficient kernels where the device has them) and 'eager' (the plain reference the tests hold the
fast path to). 'auto' picks sdpa. `attention_backend_name` says which one runs, for the logs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import ModelConfig
from dsmoe.model.moe import DENSE, MoEAux, Router, RoutingRule, routing_aux, select_experts


def resolve_backend(name: str) -> str:
    """The backend that will actually run for a configured name."""
    return "sdpa" if name == "auto" else name


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype=torch.float32):
    """cos/sin tables of shape (T, head_dim/2) for rotary position embeddings (Su et al. 2021)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dimension. x: (B, H, T, hd)."""
    x1, x2 = at_least_fp32(x).chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, mask=None
) -> torch.Tensor:
    """Reference attention. q: (B, H, T, hd); k, v: (B, KV, S, hd) with H a multiple of KV; mask: (T, S) bool."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, H, T, hd)
    v = v.repeat_interleave(group, dim=1)
    scores = (at_least_fp32(q) @ at_least_fp32(k).transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    if causal:
        T = q.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ at_least_fp32(v)).to(q.dtype)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, mask=None
) -> torch.Tensor:
    """PyTorch SDPA; grouped-query heads handled by the kernel (enable_gqa) without copying K/V."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
    )


def causal_mask(T: int, start: int, device) -> tuple[bool, torch.Tensor | None]:
    """(is_causal, mask) for T queries at positions start.. over start + T cached keys."""
    if start == 0:
        return True, None
    if T == 1:
        return False, None  # one new token sees every cached key
    keys, queries = torch.arange(start + T, device=device), start + torch.arange(T, device=device)
    return False, keys[None, :] <= queries[:, None]  # (T, start + T)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to max_len.

    MoA experts share K/V, so the cache holds n_kv_heads per layer whatever the number of experts.
    """

    def __init__(
        self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype
    ):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' (B, KV, T, hd) keys/values; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


ATTENTION_BACKENDS = {"sdpa": sdpa_attention, "eager": eager_attention}


class CausalSelfAttention(nn.Module):
    """Causal self-attention with RoPE and grouped-query K/V heads; optionally a mixture of attention heads.

    MoA (papers/dsmoe.md): `experts` attention experts, each owning heads_per_expert query heads (its rows
    of q_proj) and its slice of the output projection (its columns of o_proj); K and V are shared, so the
    KV cache does not grow with the number of experts. Training runs every expert as one grouped-query
    attention over all query heads and scales each expert's head outputs by its router probability
    before the output projection: the cost of plain attention with as many query heads.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.attention
        self.n_heads, self.n_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, cfg.head_dim
        self.backend = resolve_backend(a.backend)
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.num_experts = a.experts
        self.router = Router(cfg.d_model, a.experts) if a.experts else None
        self.head_mask: torch.Tensor | None = None  # MSG head growth: (heads x head_dim,), c on new heads
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if a.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if a.qk_norm else None

    def project_q(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Query heads (..., h, hd) of x for the rows `weight` of q_proj (all heads, or one expert's)."""
        q = (x @ weight.T).unflatten(-1, (-1, self.head_dim))
        return self.q_norm(q) if self.q_norm is not None else q

    def project_kv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared keys (rotated) and values, (B, KV, T, hd) each: what a KV cache holds."""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        k = (self.k_norm(k) if self.k_norm is not None else k).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def attend(self, q_BTHd: torch.Tensor, k, v, cos, sin) -> torch.Tensor:
        """Attention of query heads (B, T, H, hd) over the shared K/V (B, KV, S, hd); returns (B, T, H, hd).

        The T queries are the last T of the S key positions (S > T when earlier tokens are cached).
        """
        T = q_BTHd.shape[1]
        causal, mask = causal_mask(T, k.shape[2] - T, q_BTHd.device)
        q = apply_rope(q_BTHd.transpose(1, 2), cos, sin)  # (B, H, T, hd)
        return ATTENTION_BACKENDS[self.backend](q, k, v, causal=causal, mask=mask).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        cos,
        sin,
        routing: RoutingRule = DENSE,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> tuple[torch.Tensor, MoEAux | None]:
        """x: (B, T, D); cos/sin for the T new positions; with a cache, earlier tokens' K/V come from it."""
        B, T, D = x.shape
        k, v = self.project_kv(x, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if self.router is None:
            y = self.attend(self.project_q(x, self.q_proj.weight), k, v, cos, sin).reshape(B, T, -1)
            return self.o_proj(y if self.head_mask is None else y * self.head_mask.to(y.dtype)), None
        probs_TE = self.router(x.reshape(B * T, D))  # (B*T, E)
        if routing.mode == "dense":
            y = self.attend(self.project_q(x, self.q_proj.weight), k, v, cos, sin)
            y = y.reshape(B, T, self.num_experts, -1) * probs_TE.view(B, T, -1, 1).to(
                y.dtype
            )  # scale expert e
            return self.o_proj(y.reshape(B, T, -1)), routing_aux(probs_TE, probs_TE.new_ones(()))
        out, active = self._sparse_forward(x, k, v, cos, sin, probs_TE, routing)
        return out, routing_aux(probs_TE, active)

    def _sparse_forward(self, x, k, v, cos, sin, probs_TE, routing):
        """Only the kept experts' query and output projections run, grouped per expert.

        The attention core still runs over every query head (a dropped expert's heads see zero queries and
        their outputs are never read): a kernel that skips heads per token belongs to the inference engine.
        """
        B, T, D = x.shape
        E, width = self.num_experts, self.n_heads * self.head_dim // self.num_experts
        x_TD = x.reshape(B * T, D)
        keep_TE = select_experts(probs_TE, routing)
        _, token_idx = keep_TE.T.nonzero(as_tuple=True)  # grouped by expert
        counts = keep_TE.sum(0).tolist()
        q_TEW = x_TD.new_zeros(B * T, E, width)
        spans, start = [], 0
        for e, count in enumerate(counts):
            tokens = token_idx[start : start + count]
            spans.append(tokens)
            start += count
            if count:
                q_TEW[tokens, e] = self.project_q(
                    x_TD[tokens], self.q_proj.weight[e * width : (e + 1) * width]
                ).flatten(-2)
        y_TEW = self.attend(q_TEW.view(B, T, self.n_heads, self.head_dim), k, v, cos, sin).reshape(
            B * T, E, width
        )
        out_TD = torch.zeros_like(x_TD)
        for e, tokens in enumerate(spans):
            if len(tokens):
                expert_out = y_TEW[tokens, e] @ self.o_proj.weight[:, e * width : (e + 1) * width].T
                weights = (
                    probs_TE[tokens, e].to(x.dtype).unsqueeze(-1)
                )  # raw probabilities, no renormalisation
                out_TD.index_add_(0, tokens, expert_out * weights)
        return out_TD.view(B, T, D), keep_TE.float().mean()
