"""Self-attention behind one interface: the decoder's causal RoPE attention and the encoder's unpadded
bidirectional ALiBi attention.

Decoder backends: 'sdpa' (torch.nn.functional.scaled_dot_product_attention, which dispatches to flash /
memory-efficient kernels where the device has them), 'eager' (the plain reference the tests hold the
fast path to) and 'flash4' (FlashAttention-4, the flash-attn-4 package's CuTeDSL kernels; SDPA, with a
warning, where it cannot run: not installed, no CUDA, a pre-Hopper GPU, fp32 tensors). 'auto' picks sdpa.

Encoder backends (all take the packed real tokens of a batch, (T, H, hd), and its cu_seqlens):
  'flash'  flash-attn's varlen kernel with its native ALiBi slopes (when flash_attn imports; CUDA);
  'flex'   FlexAttention on the packed tokens: an ALiBi score_mod and a document mask from cu_seqlens
           (compiled on CUDA; forward-only on CPU, where torch has no FlexAttention backward);
  'sdpa'   SDPA on the batch padded back to max_seqlen around the call, with an explicit ALiBi +
           key-padding bias (the portable path);
  'eager'  the plain reference: the same padding and bias, scores and softmax in fp32;
  'triton' our varlen kernels with ALiBi in the kernel (dsmoe/model/alibi_triton.py; CUDA, else it runs sdpa).
'auto' takes flash, else triton (flex without Triton) on CUDA, else sdpa. `resolve_backend` says which runs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.model.config import ModelConfig
from dsmoe.model.moe import DENSE, MoEAux, RoutingRule, routing_aux, select_experts
from dsmoe.model.router import Router


def resolve_backend(name: str, encoder: bool = False, device: torch.device | str | None = None) -> str:
    """The backend that will actually run for a configured name (the encoder's 'auto' depends on the device)."""
    if name == "flash4" and not encoder and (flash_attn_4() is None or not _on_cuda(device)):
        warnings.warn(
            "model.attention.backend 'flash4': flash-attn-4 is not installed or there is no CUDA device; "
            "attention runs on SDPA",
            stacklevel=2,
        )
        return "sdpa"
    if name != "auto":
        return name
    if not encoder:
        return "sdpa"
    on_cuda = _on_cuda(device)
    if on_cuda and flash_attn_varlen() is not None:
        return "flash"
    if on_cuda:  # our Triton varlen ALiBi kernels beat compiled Flex on packed tokens (benchmarks/encoder/)
        return "triton" if importlib.util.find_spec("triton") is not None else "flex"
    return "sdpa"


def _on_cuda(device: torch.device | str | None) -> bool:
    return torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()


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


SDPA_PRIORITY: tuple[str, ...] = ()
"""SDPA kernels to try first on CUDA, best first (names of torch.nn.attention.SDPBackend, e.g.
("CUDNN_ATTENTION", "FLASH_ATTENTION")); empty: PyTorch's own order. benchmarks/bench_layers.py times each."""


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, mask=None
) -> torch.Tensor:
    """PyTorch SDPA; grouped-query heads handled by the kernel (enable_gqa) without copying K/V."""
    if q.is_cuda and SDPA_PRIORITY:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        first = [getattr(SDPBackend, name) for name in SDPA_PRIORITY]
        rest = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
        order = first + [b for b in rest if b not in first] + [SDPBackend.MATH]
        with sdpa_kernel(order, set_priority=True):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
            )
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


@functools.cache
def flash_attn_4():
    """FlashAttention-4's attention function (the flash-attn-4 package: CuTeDSL kernels for Hopper and
    Blackwell, forward and backward), or None where it is not installed or does not import."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception:  # not installed, or its CUDA runtime pieces fail to load: SDPA runs instead
        return None
    return flash_attn_func


@torch.compiler.assume_constant_result  # answered once while tracing: a compiled block keeps no check
def _flash4_runs_on(device_type: str, device_index: int, dtype: torch.dtype) -> bool:
    return (
        flash_attn_4() is not None
        and device_type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability(device_index)[0] >= 9
    )


def flash4_runs(q: torch.Tensor) -> bool:
    """Whether FlashAttention-4 can take these queries: installed, CUDA, Hopper or newer, bf16 or fp16."""
    return _flash4_runs_on(q.device.type, q.device.index or 0, q.dtype)


def flash4_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, mask=None
) -> torch.Tensor:
    """FlashAttention-4 on q (B, H, T, hd) and grouped k, v (B, KV, S, hd), the kernel sharing each K/V head
    among its query heads. An explicit mask (the Engine's chunked prefill) goes to SDPA: FA4 takes causal
    or none, not a boolean mask; so does what FA4 cannot take (flash4_runs: fp32, CPU, pre-Hopper), with a
    warning."""
    if mask is not None:
        return sdpa_attention(q, k, v, causal=causal, mask=mask)
    if not flash4_runs(q):
        warnings.warn(
            f"model.attention.backend 'flash4': FlashAttention-4 cannot take {q.dtype} on {q.device}; "
            "attention runs on SDPA",
            stacklevel=2,
        )
        return sdpa_attention(q, k, v, causal=causal, mask=mask)
    # FA4 reads (B, T, H, hd); made contiguous here, inside the compiled graph, the layout change fuses into
    # the kernel that writes q (RoPE) instead of costing a copy.
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out, _ = _flash4_fwd_op(q, k, v, causal)
    return out.transpose(1, 2)


# FlashAttention-4 as torch.library custom ops, forward and backward apart (what flash_attn_func's own
# autograd.Function does), so that a compiled block traces the attention as one opaque node instead of
# breaking its graph around it. Measured on one H100 (benchmarks/fa4_h100/): with a graph break per block
# the GPU waited on the host ~290 ms a DS-MoE-1B step, vs ~94 ms with SDPA, as much as FA4's kernels saved
# (~176 ms). The two calls are flash-attn-4 4.0.0b40's (pinned in tools/device_wheels.sh).
def _fa4_interface():
    try:  # in a try: transformers' remote-code check then does not require flash-attn-4 of an export
        from flash_attn.cute import interface
    except ImportError:  # callers check flash4_runs() first
        raise
    return interface


@torch.library.custom_op("dsmoe::flash4_fwd", mutates_args=())
def _flash4_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse, *_ = _fa4_interface()._flash_attn_fwd(q, k, v, causal=causal, return_lse=True)
    return out, lse


@_flash4_fwd_op.register_fake
def _(q, k, v, causal):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("dsmoe::flash4_bwd", mutates_args=())
def _flash4_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _fa4_interface()._flash_attn_bwd(q, k, v, out, dout, lse, causal=causal)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()  # as the fake says (no copy when they are)


@_flash4_bwd_op.register_fake
def _(dout, q, k, v, out, lse, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash4_setup(ctx, inputs, output):
    q, k, v, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal = causal


def _flash4_backward(ctx, dout, dlse):  # lse is not an output anyone differentiates
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _flash4_bwd_op(dout.contiguous(), q, k, v, out, lse, ctx.causal)
    return dq, dk, dv, None


_flash4_fwd_op.register_autograd(_flash4_backward, setup_context=_flash4_setup)


ATTENTION_BACKENDS = {"sdpa": sdpa_attention, "eager": eager_attention, "flash4": flash4_attention}


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

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Every query head (B, T, H, hd), unrotated, and project_kv's keys and values, from one GEMM over
        W_q, W_k, W_v stacked. The weights stay three parameters (checkpoints, growth and tensor parallelism
        see them as before); stacking them copies ~10 MB a layer per forward, where the two thin K/V GEMMs
        would each read x again, and backward would write and sum three (T, D) input gradients and read x
        three times for the weight gradients."""
        B, T, _ = x.shape
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        q, k, v = (x @ weight.T).split([q_width, kv_width, kv_width], dim=-1)
        q = q.unflatten(-1, (-1, self.head_dim))
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # A copy of V's columns: attention saves V for backward, and a view would keep the whole (T, Q+K+V)
        # GEMM output alive with it (+1.8 GiB of DS-MoE-1B's peak on an H100, 99f8668).
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2).contiguous()
        return q, apply_rope(k.transpose(1, 2), cos, sin), v

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
        every_head = self.router is None or routing.mode == "dense" or x.is_cuda  # else _sparse_forward's
        if every_head:
            q, k, v = self.project_qkv(x, cos, sin)
        else:
            q, (k, v) = None, self.project_kv(x, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if self.router is None:
            y = self.attend(q, k, v, cos, sin).reshape(B, T, -1)
            return self.o_proj(y if self.head_mask is None else y * self.head_mask.to(y.dtype)), None
        probs_TE = self.router(x.reshape(B * T, D))  # (B*T, E)
        if routing.mode == "dense":
            return self.combine(x, k, v, cos, sin, probs_TE, q), routing_aux(probs_TE, probs_TE.new_ones(()))
        keep_TE = select_experts(probs_TE, routing)
        # CUDA: every expert's heads, the dropped ones weighted 0 (no host sync, the same bits every run)
        if x.is_cuda:
            out = self.combine(x, k, v, cos, sin, probs_TE * keep_TE, q)
        else:  # fewer FLOPs; a host sync costs nothing on the CPU
            out = self._sparse_forward(x, k, v, cos, sin, probs_TE, keep_TE)
        return out, routing_aux(probs_TE, keep_TE.float().mean())

    def combine(self, x, k, v, cos, sin, weights_TE, q=None):
        """Every expert's heads, expert e's output scaled by weights_TE[:, e]: the router's probabilities (the
        dense rule), or a sparse rule's kept ones (zero for the dropped experts: the sparse rule's function,
        with the attention core's cost, which _sparse_forward pays too, and every expert's Q/O projections).
        `q`: every query head if already projected (project_qkv)."""
        B, T, _ = x.shape
        q = self.project_q(x, self.q_proj.weight) if q is None else q
        y = self.attend(q, k, v, cos, sin)
        y = y.reshape(B, T, self.num_experts, -1) * weights_TE.view(B, T, -1, 1).to(y.dtype)  # scale expert e
        return self.o_proj(y.reshape(B, T, -1))

    def _sparse_forward(self, x, k, v, cos, sin, probs_TE, keep_TE):
        """Only the kept experts' query and output projections run, grouped per expert (host sync per layer:
        the CPU path; CUDA combines every expert with the rule's weights, see forward).

        The attention core still runs over every query head (a dropped expert's heads see zero queries and
        their outputs are never read): a kernel that skips heads per token belongs to the inference engine.
        """
        B, T, D = x.shape
        E, width = self.num_experts, self.n_heads * self.head_dim // self.num_experts
        x_TD = x.reshape(B * T, D)
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
        return out_TD.view(B, T, D)


# ---------------------------------------------------------------------------------------------------------
# The encoder: ALiBi, unpadding, varlen backends (MosaicBERT, papers/mosaicbert.md)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022), fp32 (H,): m_h = 2^(-8h/n) for h = 1..n when n is a power of
    two; otherwise the p = 2^floor(log2 n) slopes of p heads, then the first n - p of the even-indexed slopes
    of 2p heads (12 heads: 2^-1 .. 2^-8, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5)."""

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    p = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(p) + power_of_two(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


@functools.cache
def device_slopes(n_heads: int, device: torch.device) -> torch.Tensor:
    """alibi_slopes on `device`, made once per process: a fresh host-to-GPU copy each batch would sync."""
    return alibi_slopes(n_heads).to(device)


def alibi_bias(slopes_H: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The symmetric bidirectional ALiBi bias -m_h |i - j|, (H, S, S) fp32, zero on the diagonal. Built for
    the batch at hand, so it grows with the input: a model trained at 128 tokens runs at 512."""
    pos = torch.arange(seq_len, device=slopes_H.device)
    distance = (pos[None, :] - pos[:, None]).abs().float()  # (S, S)
    return -slopes_H.float()[:, None, None] * distance


def to_device(tensors: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Integer `tensors` on `device`. Host tensors bound for a GPU go over as one pinned, non-blocking copy
    (concatenated as int64, split and cast back there), so the host does not wait for the GPU's queue, as a
    copy from pageable memory would, and pins one buffer rather than one per tensor."""
    device = torch.device(device)
    if all(t.device == device for t in tensors):
        return list(tensors)
    if not (device.type == "cuda" and all(t.device.type == "cpu" for t in tensors)):
        return [t.to(device) for t in tensors]
    flat = torch.cat([t.reshape(-1).long() for t in tensors]).pin_memory().to(device, non_blocking=True)
    parts = flat.split([t.numel() for t in tensors])
    return [part.view(t.shape).to(t.dtype) for part, t in zip(parts, tensors, strict=True)]


@dataclass
class Varlen:
    """Where the real tokens of a padded (B, S) batch sit once packed row after row (papers/mosaicbert.md).

    A row's real tokens keep their order, and ALiBi distances count real tokens: with right padding (the
    usual case) they are the positions of the padded batch.
    """

    indices: torch.Tensor
    """(T,) flat index into B*S of each real token, row-major."""
    cu_seqlens: torch.Tensor
    """(B+1,) int32 exclusive prefix sum of the row lengths; cu_seqlens[-1] = T."""
    max_seqlen: int
    row: torch.Tensor
    """(T,) the row each packed token came from (its 'document')."""
    position: torch.Tensor
    """(T,) its position among its row's real tokens."""
    batch_size: int
    padded_len: int

    @classmethod
    def from_mask(cls, attention_mask_BS: torch.Tensor) -> Varlen:
        """The packing of a (B, S) mask, computed where the mask lives (`to` places it elsewhere). From a mask
        on the host (the Trainer keeps it there) the GPU waits for nothing and the host never waits for the
        GPU; from a mask on the GPU, the packed length and max_seqlen (shapes the kernels need) cost one host
        sync."""
        B, S = attention_mask_BS.shape
        mask = attention_mask_BS.bool()
        lengths_B = mask.sum(1)
        indices = mask.flatten().nonzero().squeeze(1)  # (T,)
        cu_seqlens = F.pad(lengths_B.cumsum(0, dtype=torch.int32), (1, 0))
        row = torch.repeat_interleave(
            torch.arange(B, device=mask.device), lengths_B, output_size=len(indices)
        )
        position = torch.arange(len(indices), device=mask.device) - cu_seqlens[row].long()
        max_seqlen = int(lengths_B.max()) if B else 0  # on a GPU mask, a host sync: kernels need it
        return cls(indices, cu_seqlens, max_seqlen, row, position, B, S)

    def to(self, device: torch.device | str) -> Varlen:
        """The same packing with its index tensors on `device` (copied from pinned host memory, not waited for)."""
        return self.to_with(device)[0]

    def to_with(self, device: torch.device | str, *riders: torch.Tensor) -> tuple[Varlen, list[torch.Tensor]]:
        """`to`, with more integer tensors (`riders`) carried to `device` in the same copy: (packing, riders)."""
        names = ("indices", "cu_seqlens", "row", "position")
        moved = to_device([getattr(self, name) for name in names] + list(riders), device)
        return dataclasses.replace(self, **dict(zip(names, moved, strict=False))), moved[len(names) :]

    def unpad(self, x_BS: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (T, ...) real tokens only."""
        return x_BS.flatten(0, 1)[self.indices]

    def pad(self, x_T: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """(T, ...) -> (B, S, ...) with `value` at the padding."""
        out = x_T.new_full((self.batch_size * self.padded_len, *x_T.shape[1:]), value)
        out[self.indices] = x_T
        return out.view(self.batch_size, self.padded_len, *x_T.shape[1:])

    def pad_dense(self, x_T: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, max_seqlen, ...), left-aligned rows, zeros after each row's end."""
        out = x_T.new_zeros(self.batch_size, self.max_seqlen, *x_T.shape[1:])
        out[self.row, self.position] = x_T
        return out


@functools.cache
def flash_attn_varlen():
    """flash_attn.flash_attn_varlen_func when flash-attn is installed, else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled once per process (eager FlexAttention materialises the scores); dynamic
    shapes, since the packed token count changes every batch."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


@dataclass
class AttentionPlan:
    """What every layer's attention needs for one batch, built once per forward: the backend, the packing,
    the ALiBi slopes, and the backend's own mask (bias for sdpa/eager, block mask for flex)."""

    backend: str
    varlen: Varlen
    slopes: torch.Tensor
    """(H,) fp32 ALiBi slopes."""
    bias: torch.Tensor | None = None
    """sdpa/eager: (B, H, L, L) ALiBi plus -inf at padded keys, L = max_seqlen."""
    block_mask: object = None
    """flex: the document mask as a BlockMask."""
    score_mod: object = None
    """flex: the ALiBi score_mod."""


def plan_attention(backend: str, varlen: Varlen, n_heads: int, dtype: torch.dtype) -> AttentionPlan:
    """The per-batch attention inputs for `backend` (a resolved name)."""
    device = varlen.indices.device
    slopes = device_slopes(n_heads, device)
    plan = AttentionPlan(backend, varlen, slopes)
    if backend in ("sdpa", "eager"):
        L = varlen.max_seqlen
        keys_real_BL = torch.arange(L, device=device)[None, :] < varlen.cu_seqlens.diff()[:, None]
        bias = alibi_bias(slopes, L)[None].masked_fill(~keys_real_BL[:, None, None, :], float("-inf"))
        plan.bias = bias if backend == "eager" else bias.to(dtype)  # (B, H, L, L)
    elif backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        if device.type == "cpu" and torch.is_grad_enabled():
            raise RuntimeError(
                "model.attention.backend 'flex': torch has no FlexAttention backward on CPU; train on CPU "
                "with 'sdpa' (or 'auto')"
            )
        row = varlen.row.int()

        def document_mask(b, h, q_idx, kv_idx):
            return row[q_idx] == row[kv_idx]

        def alibi(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (q_idx - kv_idx).abs()  # same row: packed distance = distance

        T = len(varlen.indices)
        plan.block_mask = create_block_mask(
            document_mask, None, None, T, T, device=device, _compile=device.type == "cuda"
        )
        plan.score_mod = alibi
    elif backend == "triton":
        from dsmoe.model.alibi_triton import available as alibi_triton_available

        if device.type != "cuda" or not alibi_triton_available():
            raise RuntimeError(
                "model.attention.backend 'triton' needs CUDA and triton; on CPU use 'sdpa' (or 'auto')"
            )
        plan.slopes = plan.slopes.contiguous()
    elif backend == "flash":
        if flash_attn_varlen() is None:
            raise RuntimeError("model.attention.backend 'flash' needs flash-attn (pip install flash-attn)")
    else:
        raise ValueError(f"unknown encoder attention backend {backend!r}")
    return plan


def varlen_eager(q_THd, k_THd, v_THd, plan: AttentionPlan) -> torch.Tensor:
    """Reference: pad to (B, H, L, hd), fp32 scores + ALiBi + key padding, softmax, back to (T, H, hd)."""
    vl = plan.varlen
    q, k, v = (at_least_fp32(vl.pad_dense(t)).transpose(1, 2) for t in (q_THd, k_THd, v_THd))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + plan.bias  # (B, H, L, L)
    out = (scores.softmax(-1) @ v).transpose(1, 2)  # (B, L, H, hd)
    return out[vl.row, vl.position].to(q_THd.dtype)


def varlen_sdpa(q_THd, k_THd, v_THd, plan: AttentionPlan) -> torch.Tensor:
    """SDPA with the explicit bias on the batch padded back to max_seqlen around the call."""
    vl = plan.varlen
    q, k, v = (vl.pad_dense(t).transpose(1, 2) for t in (q_THd, k_THd, v_THd))  # (B, H, L, hd)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.bias).transpose(1, 2)  # (B, L, H, hd)
    return out[vl.row, vl.position]


# Not traced into a compiled block: the score_mod and mask are new closures every batch, so the block would
# recompile; the separately compiled kernel runs instead.
@torch.compiler.disable
def varlen_flex(q_THd, k_THd, v_THd, plan: AttentionPlan) -> torch.Tensor:
    """FlexAttention over the packed tokens as one sequence, (1, H, T, hd): the block mask keeps each token
    to its own row, the score_mod adds ALiBi; compiled on CUDA (once per process, dynamic shapes)."""
    if q_THd.is_cuda:
        flex = compiled_flex_attention()
    else:
        from torch.nn.attention.flex_attention import flex_attention as flex
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q_THd, k_THd, v_THd))  # (1, H, T, hd)
    out = flex(q, k, v, score_mod=plan.score_mod, block_mask=plan.block_mask)
    return out.squeeze(0).transpose(0, 1)


def varlen_flash(q_THd, k_THd, v_THd, plan: AttentionPlan) -> torch.Tensor:
    """flash-attn's varlen kernel: bias -m_h |i - j| from its native alibi_slopes (non-causal, equal lengths)."""
    vl = plan.varlen
    return flash_attn_varlen()(
        q_THd,
        k_THd,
        v_THd,
        vl.cu_seqlens,
        vl.cu_seqlens,
        vl.max_seqlen,
        vl.max_seqlen,
        dropout_p=0.0,
        causal=False,
        alibi_slopes=plan.slopes,
    )


def varlen_triton(q_THd, k_THd, v_THd, plan: AttentionPlan) -> torch.Tensor:
    """Our Triton kernels (dsmoe/model/alibi_triton.py): per (row, head) tiles of the packed tokens, ALiBi
    added in the kernel, no padding and no block mask; CUDA only. A custom op: a compiled block traces it as
    one node (plan_attention imported the module, which registers it)."""
    if q_THd.shape[-1] not in (16, 32, 64, 128):
        raise ValueError(f"attention backend 'triton': head_dim {q_THd.shape[-1]} is not 16, 32, 64 or 128")
    vl = plan.varlen
    return torch.ops.dsmoe.alibi_varlen_fwd(q_THd, k_THd, v_THd, vl.cu_seqlens, vl.max_seqlen, plan.slopes)[0]


VARLEN_BACKENDS = {
    "eager": varlen_eager,
    "sdpa": varlen_sdpa,
    "flex": varlen_flex,
    "flash": varlen_flash,
    "triton": varlen_triton,
}


class BidirectionalSelfAttention(nn.Module):
    """The encoder's attention on packed real tokens: fused QKV projection, ALiBi (no position embedding),
    every token attending to every real token of its own row. Biases on the projections, as in BERT."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.attention.num_heads, cfg.head_dim
        width = self.n_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * width)  # [q; k; v] in one GEMM
        self.o_proj = nn.Linear(width, cfg.d_model)
        self.router = None  # no MoA in the encoder (growth and the loop look for it)
        self.head_mask: torch.Tensor | None = None  # MSG head growth: (heads x head_dim,), c on new heads

    def forward(self, x_TD: torch.Tensor, plan: AttentionPlan) -> tuple[torch.Tensor, None]:
        qkv = self.qkv_proj(x_TD).view(-1, 3, self.n_heads, self.head_dim)  # (T, 3, H, hd)
        q, k, v = qkv.unbind(1)
        out = VARLEN_BACKENDS[plan.backend](q, k, v, plan).flatten(1)  # (T, H x hd)
        return self.o_proj(out if self.head_mask is None else out * self.head_mask.to(out.dtype)), None
