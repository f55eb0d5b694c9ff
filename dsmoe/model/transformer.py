"""DecoderLM: a pre-norm causal decoder with RoPE attention (plain or MoA) and DS-MoE (or dense) MLPs.

Plain single-process PyTorch: nothing here knows about ranks; parallel/ applies parallelism to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsmoe.model.attention import CausalSelfAttention, KVCache, rope_cos_sin
from dsmoe.model.config import ModelConfig
from dsmoe.model.mlp import DenseMLP
from dsmoe.model.moe import TRAINING, DSMoE, MoEAux, Routing


@dataclass
class RouterStats:
    """Routing of all mixture layers of one type (MLP or attention), stacked over those layers."""

    mi_loss: torch.Tensor
    """Sum over the layers of the mutual-information loss (unweighted, differentiable)."""
    expert_load: torch.Tensor
    """(L, N) mean router probability per layer and expert (detached)."""
    router_entropy: torch.Tensor
    """(L,) mean per-token routing entropy in nats (detached)."""
    active_fraction: torch.Tensor
    """(L,) fraction of the experts' parameters computed per token."""
    balance_loss: torch.Tensor | None = None
    """Sum over the layers of the Switch load-balancing loss (sparse training only)."""

    @classmethod
    def stack(cls, auxes: list[MoEAux]) -> RouterStats | None:
        if not auxes:
            return None
        return cls(
            mi_loss=torch.stack([a.mi_loss for a in auxes]).sum(),
            expert_load=torch.stack([a.expert_load for a in auxes]),
            router_entropy=torch.stack([a.router_entropy for a in auxes]),
            active_fraction=torch.stack([a.active_fraction for a in auxes]),
            balance_loss=torch.stack([a.balance_loss for a in auxes]).sum()
            if all(a.balance_loss is not None for a in auxes)
            else None,
        )


@dataclass
class DecoderOutput:
    """Model outputs; `loss` is what the trainer backpropagates: LM loss + alpha-weighted MI losses."""

    logits: torch.Tensor | None
    """(B, T, V); None when the loss was computed without them (train.head_loss: fused)."""
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mlp: RouterStats | None = None
    """DS-MoE MLP routing (None for dense MLPs)."""
    attention: RouterStats | None = None
    """MoA routing (None for plain attention)."""


class CrossEntropy(nn.Module):
    """Mean next-token cross-entropy of (N, V) logits, computed in fp32 ("none": each token's, for evaluation)."""

    def forward(
        self, logits_NV: torch.Tensor, targets_N: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        return F.cross_entropy(logits_NV.float(), targets_N, reduction=reduction)


class Block(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        m = cfg.moe
        if cfg.mlp == "moe":
            sparse = m.training == "sparse"  # the SMoE baseline; DS-MoE never renormalises (paper)
            top_k = m.train_top_k if sparse else 0
            self.mlp = DSMoE(
                cfg.d_model,
                m.num_experts,
                m.expert_hidden,
                m.activation,
                top_k,
                sparse and m.train_renormalize,
            )
        else:
            self.mlp = DenseMLP(cfg.d_model, cfg.ffn_hidden, m.activation)

    def forward(
        self, x, cos, sin, routing: Routing, cache: KVCache | None = None, layer: int = 0
    ) -> tuple[torch.Tensor, MoEAux | None, MoEAux | None]:
        attn_out, attn_aux = self.attn(self.attn_norm(x), cos, sin, routing.attention, cache, layer)
        x = x + attn_out
        h = self.mlp_norm(x)
        mlp_out, mlp_aux = self.mlp(h, routing.mlp) if getattr(self.mlp, "routed", False) else self.mlp(h)
        return x + mlp_out, attn_aux, mlp_aux


class GrowthBlock(Block):
    """A Block while MSG growth ramps (dsmoe/growth.py): new hidden channels of its outputs are scaled by
    `channel_mask`, and a newly inserted block is gated, x + c * (Block(x) - x), its MI losses scaled by c
    too, so at c = 0 the model and its loss are the small one's."""

    channel_mask: torch.Tensor | None = None
    gate: float | None = None

    def forward(self, x, cos, sin, routing: Routing, cache: KVCache | None = None, layer: int = 0):
        mask = self.channel_mask
        attn_out, attn_aux = self.attn(self.attn_norm(x), cos, sin, routing.attention, cache, layer)
        mask = None if mask is None else mask.to(x.dtype)
        y = x + (attn_out if mask is None else attn_out * mask)
        h = self.mlp_norm(y)
        mlp_out, mlp_aux = self.mlp(h, routing.mlp) if getattr(self.mlp, "routed", False) else self.mlp(h)
        y = y + (mlp_out if mask is None else mlp_out * mask)
        if self.gate is None:
            return y, attn_aux, mlp_aux
        for aux in (attn_aux, mlp_aux):
            if aux is not None:
                aux.mi_loss = aux.mi_loss * self.gate
        return x + self.gate * (y - x), attn_aux, mlp_aux


class DecoderLM(nn.Module):
    """Causal language model: token embedding, N blocks, final norm, (tied) LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.cross_entropy = CrossEntropy()  # tensor parallelism swaps in the vocab-parallel one
        self.channel_mask: torch.Tensor | None = None  # MSG hidden growth (dsmoe/growth.py)
        self.checkpoint_blocks = False  # train.activation_checkpointing (set by dsmoe.train.engine)
        self.fused_head_loss = (
            None  # train.head_loss: the fused head + loss function (set by dsmoe.train.engine)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, std) everywhere, residual output projections scaled by 1/sqrt(2L)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:  # norm weights
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "w_out", "w_out.weight")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    @property
    def moe_layers(self) -> list[DSMoE]:
        return [b.mlp for b in self.blocks if getattr(b.mlp, "routed", False)]

    @property
    def moa_layers(self) -> list[CausalSelfAttention]:
        return [b.attn for b in self.blocks if b.attn.router is not None]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        routing: Routing = TRAINING,
        cache: KVCache | None = None,
    ) -> DecoderOutput:
        """idx: (B, T) token ids; targets: (B, T) next-token ids or None (then only logits are returned).

        With a KV cache, idx continues the tokens already in it (prefill, then decode one token at a time).
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + T} exceeds model.max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(idx)  # (B, T, D)
        if self.channel_mask is not None:  # MSG hidden growth: new channels enter scaled by c
            x = x * self.channel_mask.to(x.dtype)
        cos, sin = rope_cos_sin(start + T, self.cfg.head_dim, self.cfg.attention.rope_theta, x.device)
        cos, sin = cos[start:], sin[start:]  # positions of the new tokens
        attn_auxes, mlp_auxes = [], []
        recompute = self.checkpoint_blocks and cache is None and torch.is_grad_enabled()
        for layer, block in enumerate(self.blocks):
            if recompute:  # train.activation_checkpointing: keep only the block's inputs, recompute the rest
                x, attn_aux, mlp_aux = checkpoint(
                    block, x, cos, sin, routing, None, layer, use_reentrant=False
                )
            else:
                x, attn_aux, mlp_aux = block(x, cos, sin, routing, cache, layer)
            attn_auxes += [attn_aux] if attn_aux is not None else []
            mlp_auxes += [mlp_aux] if mlp_aux is not None else []
        if cache is not None:
            cache.length += T
        h = self.final_norm(x)
        fused = targets is not None and self.fused_head_loss is not None and torch.is_grad_enabled()
        logits = None if fused else self.lm_head(h)  # (B, T, V)
        out = DecoderOutput(
            logits=logits, mlp=RouterStats.stack(mlp_auxes), attention=RouterStats.stack(attn_auxes)
        )
        if targets is not None:
            if fused:  # train.head_loss: the head and its loss a chunk of tokens at a time, no logits
                out.lm_loss = self.fused_head_loss(
                    h.view(B * T, -1), self.lm_head.weight, targets.reshape(-1)
                )
            else:
                out.lm_loss = self.cross_entropy(logits.view(B * T, -1), targets.reshape(-1))
            out.loss = out.lm_loss
            if out.mlp is not None:
                out.loss = out.loss + self.cfg.moe.alpha * out.mlp.mi_loss
                if out.mlp.balance_loss is not None:
                    out.loss = out.loss + self.cfg.moe.balance_alpha * out.mlp.balance_loss
            if out.attention is not None:
                out.loss = out.loss + self.cfg.attention.alpha * out.attention.mi_loss
        return out

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for generation (one K/V per shared head per layer, whatever the experts)."""
        weight = self.embed.weight
        return KVCache(
            self.cfg.n_layers,
            batch,
            self.cfg.attention.num_kv_heads,
            max_len or self.cfg.max_seq_len,
            self.cfg.head_dim,
            weight.device,
            weight.dtype,
        )

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n

    def num_expert_params(self) -> int:
        """Parameters of the MLP experts (w_in, w_out), the part sparse MLP routing skips."""
        return sum(m.w_in.numel() + m.w_out.numel() for m in self.moe_layers)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), counting every expert, as DS-MoE trains them.

        6 x (parameters touched per token, the LM head included, the embedding lookup not) plus causal
        attention's score and value products, 6 x L x seq_len x H x head_dim (half of 12: the causal mask).
        The LM head counts once: an untied head is among the non-embedding parameters already; a tied one
        left the count with the embedding and is added back.
        """
        matmul_params = self.num_params(exclude_embedding=True)
        if self.lm_head.weight is self.embed.weight:
            matmul_params += self.lm_head.weight.numel()
        heads = self.cfg.attention.num_heads
        return 6.0 * matmul_params + 6.0 * self.cfg.n_layers * seq_len * heads * self.cfg.head_dim

    def num_attention_expert_params(self) -> int:
        """Query and output projections of MoA layers, the part sparse attention routing skips.

        The shared K/V projections and the routers always run.
        """
        return sum(a.q_proj.weight.numel() + a.o_proj.weight.numel() for a in self.moa_layers)


def build(cfg: ModelConfig) -> DecoderLM:
    """Build the single-process model for a config (vocab_size already resolved)."""
    if cfg.backbone != "decoder":
        raise ValueError(f"unknown backbone {cfg.backbone!r}")
    return DecoderLM(cfg)
