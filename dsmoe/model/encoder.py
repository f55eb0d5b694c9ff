"""EncoderMLM: a MosaicBERT-style bidirectional encoder for masked-language-model pretraining.

papers/mosaicbert.md: ALiBi instead of a position-embedding table; unpadded batches (every linear, norm
and FFN runs on the packed real tokens, attention through cu_seqlens); GeGLU FFN or a DS-MoE layer;
BERT's post-LN (or pre-LN); LayerNorm kept in the training precision (bf16); the MLM head only at the
masked positions. Plain single-process PyTorch, like DecoderLM, with the same submodule names where they
mean the same thing (embed, blocks[i].attn / attn_norm / mlp / mlp_norm, final_norm, lm_head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.model.alibi_triton import available as alibi_triton_available  # noqa: F401  (registers the dsmoe:: ops)
from dsmoe.model.attention import BidirectionalSelfAttention, Varlen, plan_attention, resolve_backend
from dsmoe.model.config import ModelConfig
from dsmoe.model.head_loss import linear_cross_entropy
from dsmoe.model.mlp import DenseMLP
from dsmoe.model.moe import TRAINING, DSMoE, MoEAux, Routing
from dsmoe.model.transformer import CrossEntropy, RouterStats

IGNORE_INDEX = -100
"""Label of a position that is not predicted (transformers' convention)."""


@dataclass
class EncoderOutput:
    """Model outputs; `loss` is what the trainer backpropagates: MLM loss + alpha x MI loss."""

    logits: torch.Tensor | None
    """(M, V) at the M masked positions when labels are given (packed, row-major; None when the loss was
    computed without them, train.head_loss fused); else (B, S, V), zeros at padding."""
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    """Mean MLM cross-entropy over the masked positions."""
    masked_tokens: int = 0
    correct: torch.Tensor | None = None
    """Masked positions whose argmax is the label (detached count)."""
    mlp: RouterStats | None = None
    attention: RouterStats | None = None
    """Always None: the encoder has no MoA (kept so the loop reads both backbones alike)."""


class LayerNorm(nn.LayerNorm):
    """LayerNorm that runs in the training precision: under autocast in its dtype (bf16) instead of the
    fp32 autocast would pick (MosaicBERT's low-precision LayerNorm); with bf16 weights, as under
    DeepSpeed's bf16, it is bf16 already."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return F.layer_norm(
                x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.bias.to(dtype), self.eps
            )


class TritonGeGLUMLP(DenseMLP):
    """DenseMLP with GeGLU through one fused Triton kernel each way (model.geglu_kernel: triton) on CUDA; same
    parameters, same function (the torch ops on other devices)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        if not x.is_cuda:  # the kernel is CUDA-only; elsewhere (an export loaded on a CPU) the same function
            return super().forward(x)
        h = torch.ops.dsmoe.geglu(self.w_in(x))
        return self.w_out(h if self.unit_mask is None else h * self.unit_mask.to(h.dtype)), None


class EncoderBlock(nn.Module):
    """Post-LN (BERT): x = LN(x + attn(x)), x = LN(x + ffn(x)); pre-LN: x + attn(LN(x)), x + ffn(LN(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.post_norm = cfg.post_norm
        self.attn_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = BidirectionalSelfAttention(cfg)
        self.mlp_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        m = cfg.moe
        if cfg.mlp == "moe":
            self.mlp = DSMoE(cfg.d_model, m.num_experts, m.expert_hidden, m.activation)
        elif m.activation == "geglu" and cfg.geglu_kernel == "triton":
            self.mlp = TritonGeGLUMLP(cfg.d_model, cfg.ffn_hidden, m.activation, bias=True)
        else:
            self.mlp = DenseMLP(cfg.d_model, cfg.ffn_hidden, m.activation, bias=True)
        self.dropout = nn.Dropout(cfg.dropout)

    def _mlp(self, h: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, MoEAux | None]:
        return self.mlp(h, routing.mlp) if getattr(self.mlp, "routed", False) else self.mlp(h)

    def forward(self, x_TD: torch.Tensor, plan, routing: Routing) -> tuple[torch.Tensor, None, MoEAux | None]:
        if self.post_norm:
            attn_out, _ = self.attn(x_TD, plan)
            x_TD = self.attn_norm(x_TD + self.dropout(attn_out))
            mlp_out, mlp_aux = self._mlp(x_TD, routing)
            return self.mlp_norm(x_TD + self.dropout(mlp_out)), None, mlp_aux
        attn_out, _ = self.attn(self.attn_norm(x_TD), plan)
        x_TD = x_TD + self.dropout(attn_out)
        mlp_out, mlp_aux = self._mlp(self.mlp_norm(x_TD), routing)
        return x_TD + self.dropout(mlp_out), None, mlp_aux


class GrowthEncoderBlock(EncoderBlock):
    """An EncoderBlock newly inserted by MSG layer growth (dsmoe/growth.py), gated while its ramp runs:
    x + c * (Block(x) - x), its MI loss scaled by c. At c = 0 it is exactly the identity for pre-LN and
    post-LN alike (a post-LN LN(x + c f(x)) would not be: LN of a normalised x is not x)."""

    gate: float | None = None

    def forward(self, x_TD: torch.Tensor, plan, routing: Routing) -> tuple[torch.Tensor, None, MoEAux | None]:
        y_TD, _, mlp_aux = super().forward(x_TD, plan, routing)
        if self.gate is None:
            return y_TD, None, mlp_aux
        if mlp_aux is not None:
            mlp_aux.mi_loss = mlp_aux.mi_loss * self.gate
        return x_TD + self.gate * (y_TD - x_TD), None, mlp_aux


class EncoderMLM(nn.Module):
    """Masked LM: token embedding (no positions) + LayerNorm, N encoder blocks on the packed real tokens,
    BERT's prediction head (dense, GELU, LayerNorm) and a (tied) decoder with a bias, at masked positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = None if cfg.post_norm else LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head_dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.head_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.cross_entropy = CrossEntropy()
        self.fused_head_loss = (
            None  # train.head_loss: set by dsmoe.train.engine (ours: the count comes along)
        )
        self._head_loss = type(self).masked_head_loss  # compile_head() swaps in a compiled one
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's init: N(0, init_std) for matrices and the embedding, zero biases, unit norm weights; the
        residual output projections scaled by 1/sqrt(2L) under pre-LN, as in the decoder."""
        std = self.cfg.init_std
        out_std = std if self.cfg.post_norm else std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "w_out", "w_out.weight")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    @property
    def moe_layers(self) -> list[DSMoE]:
        return [b.mlp for b in self.blocks if getattr(b.mlp, "routed", False)]

    @property
    def moa_layers(self) -> list:
        return []

    def attention_backend(self, device) -> str:
        """The attention backend this model runs on `device` (for the logs). 'triton' is CUDA-only: on other
        devices (an export of a GPU run loaded on a CPU) SDPA runs, with the same ALiBi and padding."""
        backend = resolve_backend(self.cfg.attention.backend, encoder=True, device=device)
        return "sdpa" if backend == "triton" and torch.device(device).type != "cuda" else backend

    def head(self, h_MD: torch.Tensor) -> torch.Tensor:
        """BERT's prediction head: (M, D) -> (M, V)."""
        return self.lm_head(self.head_norm(F.gelu(self.head_dense(h_MD))))

    def masked_head_loss(self, h_MD: torch.Tensor, targets_M: torch.Tensor):
        """The head at the M masked positions: (M, V) logits, mean cross-entropy, detached correct count.
        With train.head_loss fused the logits are never made (None)."""
        if self.fused_head_loss is not None and torch.is_grad_enabled():
            h_MD = self.head_norm(F.gelu(self.head_dense(h_MD)))
            loss, correct = linear_cross_entropy(
                h_MD, self.lm_head.weight, targets_M, self.lm_head.bias, with_correct=True
            )
            return None, loss, correct
        logits_MV = self.head(h_MD)
        correct = (logits_MV.detach().argmax(-1) == targets_M).sum()
        return logits_MV, self.cross_entropy(logits_MV, targets_M), correct

    def compile_head(self) -> None:
        """torch.compile the head and its loss (dynamic: the masked count changes every batch), fusing the
        GELU, LayerNorm and the cross-entropy's softmax around the two GEMMs."""
        self._head_loss = torch.compile(type(self).masked_head_loss, dynamic=True)  # unbound: copies keep it

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        routing: Routing = TRAINING,
    ) -> EncoderOutput:
        """input_ids, attention_mask, labels: (B, S). Labels hold the original token at masked positions
        and IGNORE_INDEX elsewhere; with them, the head runs at the masked positions only and the loss is
        returned. Without, logits for every position come back padded to (B, S, V).

        attention_mask and labels may stay on the host while input_ids are on the GPU (the Trainer does so):
        the packing and the masked positions are then worked out on the host and copied over without
        blocking, so the step never waits for the GPU (with them on the GPU, each costs a host sync)."""
        if attention_mask is None:  # made on the host: its packing costs no sync
            attention_mask = torch.ones(input_ids.shape, dtype=torch.bool)
        varlen, masked_M, targets_M = self._packing(attention_mask, labels, input_ids.device)
        x_TD = self.dropout(self.embed_norm(self.embed(varlen.unpad(input_ids))))  # (T, D) real tokens
        plan = plan_attention(
            self.attention_backend(x_TD.device), varlen, self.cfg.attention.num_heads, x_TD.dtype
        )
        mlp_auxes = []
        for block in self.blocks:
            x_TD, _, mlp_aux = block(x_TD, plan, routing)
            mlp_auxes += [mlp_aux] if mlp_aux is not None else []
        if self.final_norm is not None:
            x_TD = self.final_norm(x_TD)
        mlp = RouterStats.stack(mlp_auxes)
        if labels is None:
            return EncoderOutput(logits=varlen.pad(self.head(x_TD)), mlp=mlp)
        logits_MV, lm_loss, correct = self._head_loss(self, x_TD[masked_M], targets_M)
        out = EncoderOutput(logits=logits_MV, masked_tokens=len(masked_M), mlp=mlp)
        out.lm_loss, out.correct = lm_loss, correct
        out.loss = out.lm_loss
        if mlp is not None:
            out.loss = out.loss + self.cfg.moe.alpha * mlp.mi_loss
        return out

    @staticmethod
    def _packing(attention_mask: torch.Tensor, labels: torch.Tensor | None, device: torch.device):
        """(Varlen, masked positions among the packed tokens, their labels), all on `device`, worked out where
        the mask and labels live (the host: no sync; then one pinned copy carries them all)."""
        varlen = Varlen.from_mask(attention_mask)
        if labels is None:
            return varlen.to(device), None, None
        labels_T = (varlen if labels.device == attention_mask.device else varlen.to(labels.device)).unpad(
            labels
        )
        masked_M = (labels_T != IGNORE_INDEX).nonzero().squeeze(1)  # the head runs here only
        varlen, (masked_M, targets_M) = varlen.to_with(device, masked_M, labels_T[masked_M])
        return varlen, masked_M, targets_M

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n

    def num_expert_params(self) -> int:
        """Parameters of the DS-MoE experts (w_in, w_out), the part sparse routing skips."""
        return sum(m.w_in.numel() + m.w_out.numel() for m in self.moe_layers)

    def num_attention_expert_params(self) -> int:
        return 0

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per real token: 6 x the non-embedding parameters (every expert; the head counted
        as if it ran at every token, an upper bound) plus bidirectional attention's score and value
        products, 12 x L x seq_len x H x head_dim."""
        width = self.cfg.attention.num_heads * self.cfg.head_dim
        return 6.0 * self.num_params(exclude_embedding=True) + 12.0 * self.cfg.n_layers * seq_len * width
