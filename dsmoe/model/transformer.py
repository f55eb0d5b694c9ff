"""DecoderLM: a pre-norm causal decoder with RoPE attention and DS-MoE (or dense) MLPs.

Plain single-process PyTorch: nothing here knows about ranks; parallel/ applies parallelism to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import ModelConfig
from dsmoe.model.attention import CausalSelfAttention, rope_cos_sin
from dsmoe.model.mlp import DenseMLP
from dsmoe.model.moe import DENSE, DSMoE, MoEAux, RoutingRule


@dataclass
class DecoderOutput:
    """Model outputs; `loss` is what the trainer backpropagates (LM loss + alpha * sum of MI losses)."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mi_loss: torch.Tensor | None = None
    """Sum over MoE layers of the mutual-information loss (unweighted)."""
    expert_load: torch.Tensor | None = None
    """(L, N) mean router probability per MoE layer and expert (detached)."""
    router_entropy: torch.Tensor | None = None
    """(L,) mean per-token routing entropy per MoE layer (detached)."""
    active_fraction: torch.Tensor | None = None
    """(L,) fraction of expert parameters computed per token, per MoE layer."""


class Block(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        m = cfg.moe
        if cfg.mlp == "moe":
            self.mlp = DSMoE(cfg.d_model, m.num_experts, m.expert_hidden, m.activation)
        else:
            self.mlp = DenseMLP(cfg.d_model, cfg.ffn_hidden, m.activation)

    def forward(self, x, cos, sin, routing: RoutingRule) -> tuple[torch.Tensor, MoEAux | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.mlp_norm(x)
        mlp_out, aux = self.mlp(h, routing) if isinstance(self.mlp, DSMoE) else self.mlp(h)
        return x + mlp_out, aux


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
        return [b.mlp for b in self.blocks if isinstance(b.mlp, DSMoE)]

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, routing: RoutingRule = DENSE
    ) -> DecoderOutput:
        """idx: (B, T) token ids; targets: (B, T) next-token ids or None (then logits are returned)."""
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(idx)  # (B, T, D)
        cos, sin = rope_cos_sin(T, self.cfg.head_dim, self.cfg.attention.rope_theta, x.device)
        auxes = []
        for block in self.blocks:
            x, aux = block(x, cos, sin, routing)
            if aux is not None:
                auxes.append(aux)
        logits = self.lm_head(self.final_norm(x))  # (B, T, V)
        out = DecoderOutput(logits=logits)
        if auxes:
            out.mi_loss = torch.stack([a.mi_loss for a in auxes]).sum()
            out.expert_load = torch.stack([a.expert_load for a in auxes])
            out.router_entropy = torch.stack([a.router_entropy for a in auxes])
            out.active_fraction = torch.stack([a.active_fraction for a in auxes])
        if targets is not None:
            out.lm_loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(-1))
            out.loss = out.lm_loss
            if out.mi_loss is not None:
                out.loss = out.loss + self.cfg.moe.alpha * out.mi_loss
        return out

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n

    def num_expert_params(self) -> int:
        """Parameters of the MoE experts (w_in, w_out), the part sparse inference skips."""
        return sum(m.w_in.numel() + m.w_out.numel() for m in self.moe_layers)


def build(cfg: ModelConfig) -> DecoderLM:
    """Build the single-process model for a config (vocab_size already resolved)."""
    if cfg.backbone != "decoder":
        raise ValueError(f"unknown backbone {cfg.backbone!r}")
    return DecoderLM(cfg)
