"""Tensor parallelism applied to the plain model, with megatron-core's parallel layers and mappings.

Attention: q/k/v column-parallel (each rank holds heads/tp query heads and kv_heads/tp shared K/V heads),
output row-parallel. MoA experts are groups of query heads, so they split with them; the replicated
router's probabilities enter the local heads through megatron's copy-to-tensor-parallel region (identity
forward, all-reduce backward), so the router's gradient is complete on every rank. Dense MLPs: first
projection column-parallel, second row-parallel. Embedding and LM head vocab-parallel, with megatron's
vocab-parallel cross-entropy. DS-MoE experts split their hidden width the same way (parallel.expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.model.attention import ATTENTION_BACKENDS, CausalSelfAttention, apply_rope, causal_mask
from dsmoe.model.mlp import DenseMLP, activate
from dsmoe.model.moe import DENSE, RoutingRule, select_experts
from parallel.groups import ParallelDims
from parallel.layout import placement, shard
from parallel.routing import routing_aux_over


def megatron_config(dims: ParallelDims, dtype: torch.dtype = torch.float32):
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=dims.tp,
        expert_model_parallel_size=dims.ep,
        use_cpu_initialization=True,  # we copy the plain model's weights in; nothing to initialise
        perform_initialization=False,
        params_dtype=dtype,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
    )


def _no_init(_weight) -> None:
    pass


def _load(
    layer_weight: nn.Parameter, full: torch.Tensor, name: str, dims: ParallelDims, activation: str
) -> None:
    """Copy this rank's shard of the plain weight in, and mark the parameter as tensor-parallel
    (megatron sets its attributes only when it initialises the weight itself)."""
    where = placement(name, activation)
    with torch.no_grad():
        layer_weight.copy_(shard(full, where, dims.tp_rank, dims.tp, dims.ep_rank, dims.ep))
    if where.tp_dim is not None:
        _mark_tensor_parallel(layer_weight, where.tp_dim, dims)


def column_parallel(linear: nn.Linear, name: str, dims: ParallelDims, activation: str = "gelu"):
    from megatron.core.tensor_parallel import ColumnParallelLinear

    layer = ColumnParallelLinear(
        linear.in_features,
        linear.out_features,
        config=megatron_config(dims, linear.weight.dtype),
        init_method=_no_init,
        bias=False,
        gather_output=False,
        tp_group=dims.tp_group,
    )
    _load(layer.weight, linear.weight, name, dims, activation)
    return layer


def row_parallel(linear: nn.Linear, name: str, dims: ParallelDims):
    from megatron.core.tensor_parallel import RowParallelLinear

    layer = RowParallelLinear(
        linear.in_features,
        linear.out_features,
        config=megatron_config(dims, linear.weight.dtype),
        init_method=_no_init,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=dims.tp_group,
    )
    _load(layer.weight, linear.weight, name, dims, "gelu")
    return layer


def copy_to_tensor_parallel(x: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient over the tensor group backward (replicated -> split)."""
    if dims.tp == 1:
        return x
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(x, group=dims.tp_group)


def reduce_from_tensor_parallel(x: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """All-reduce over the tensor group forward (partial sums -> whole), identity backward."""
    if dims.tp == 1:
        return x
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=dims.tp_group)


class ParallelAttention(nn.Module):
    """CausalSelfAttention over this rank's heads; the same parameter names as the plain module.

    Used for every MoA layer when the world has more than one rank (its MI loss then takes the whole
    batch's marginal, see parallel.routing.routing_aux_over), and for every attention layer under tp > 1.
    Sparse MoA routing weights dropped experts' heads by zero here (the same output as the plain sparse
    path, without its compute saving: serving runs the exported single-process model).
    """

    def __init__(self, plain: CausalSelfAttention, prefix: str, dims: ParallelDims):
        super().__init__()
        self.dims = dims
        self.head_dim, self.backend = plain.head_dim, plain.backend
        self.n_heads, self.n_kv_heads = plain.n_heads // dims.tp, plain.n_kv_heads // dims.tp
        self.num_experts = plain.num_experts
        self.heads_per_expert = plain.n_heads // plain.num_experts if plain.num_experts else 0
        self.q_proj = column_parallel(plain.q_proj, f"{prefix}.q_proj.weight", dims)
        self.k_proj = column_parallel(plain.k_proj, f"{prefix}.k_proj.weight", dims)
        self.v_proj = column_parallel(plain.v_proj, f"{prefix}.v_proj.weight", dims)
        self.o_proj = row_parallel(plain.o_proj, f"{prefix}.o_proj.weight", dims)
        self.router, self.q_norm, self.k_norm = plain.router, plain.q_norm, plain.k_norm
        self.head_mask: torch.Tensor | None = (
            None  # MSG growth, full (heads x head_dim,) as on the plain layer
        )

    def _norm(self, norm: nn.RMSNorm | None, x: torch.Tensor) -> torch.Tensor:
        if norm is None:
            return x
        # Replicated weight applied to this rank's heads only: its gradient is summed over the tensor group.
        return F.rms_norm(x, norm.normalized_shape, copy_to_tensor_parallel(norm.weight, self.dims), norm.eps)

    def forward(self, x, cos, sin, routing: RoutingRule = DENSE, cache=None, layer: int = 0):
        if cache is not None:
            raise NotImplementedError("KV-cache generation runs on the exported single-process model")
        B, T, D = x.shape
        q = self._norm(self.q_norm, self.q_proj(x)[0].view(B, T, self.n_heads, self.head_dim))
        k = self._norm(self.k_norm, self.k_proj(x)[0].view(B, T, self.n_kv_heads, self.head_dim))
        v = self.v_proj(x)[0].view(B, T, self.n_kv_heads, self.head_dim)
        k, v = apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)
        causal, mask = causal_mask(T, 0, x.device)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        y = ATTENTION_BACKENDS[self.backend](q, k, v, causal=causal, mask=mask).transpose(
            1, 2
        )  # (B, T, h, hd)
        aux = None
        if self.router is not None:
            probs_TE = self.router(x.reshape(B * T, D))
            keep_TE = select_experts(probs_TE.detach(), routing)
            aux = routing_aux_over(probs_TE, keep_TE.float().mean(), self.dims)
            weights_TE = copy_to_tensor_parallel(probs_TE, self.dims) * keep_TE
            first = self.dims.tp_rank * self.n_heads  # this rank's heads, in global numbering
            weights_TH = weights_TE.repeat_interleave(self.heads_per_expert, dim=1)[
                :, first : first + self.n_heads
            ]
            y = y * weights_TH.view(B, T, self.n_heads, 1).to(y.dtype)
        y = y.reshape(B, T, -1)
        if self.head_mask is not None:  # this rank's heads' part of the growth mask
            width = self.n_heads * self.head_dim
            y = y * self.head_mask[self.dims.tp_rank * width : (self.dims.tp_rank + 1) * width].to(y.dtype)
        return self.o_proj(y)[0], aux


class ParallelMLP(nn.Module):
    """Dense MLP with its hidden width split over the tensor group."""

    def __init__(self, plain: DenseMLP, prefix: str, dims: ParallelDims):
        super().__init__()
        self.activation = plain.activation
        self.w_in = column_parallel(plain.w_in, f"{prefix}.w_in.weight", dims, plain.activation)
        self.w_out = row_parallel(plain.w_out, f"{prefix}.w_out.weight", dims)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.w_out(activate(self.w_in(x)[0], self.activation))[0], None


class VocabParallelHead(nn.Module):
    """LM head over this rank's vocabulary rows: returns vocab-sharded logits (gather_logits joins them)."""

    def __init__(self, plain: nn.Linear, dims: ParallelDims, tied_to: nn.Parameter | None):
        super().__init__()
        self.dims = dims
        if tied_to is not None:
            self.weight = tied_to
        else:
            self.weight = nn.Parameter(torch.empty(plain.out_features // dims.tp, plain.in_features))
            _load(self.weight, plain.weight, "lm_head.weight", dims, "gelu")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tensor_parallel(h, self.dims), self.weight)


class VocabParallelCrossEntropy(nn.Module):
    """megatron-core's cross-entropy over vocab-sharded logits (no rank holds a whole row)."""

    def forward(
        self, logits_NV: torch.Tensor, targets_N: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        # megatron shifts the logits in place: give it its own fp32 copy
        logits = logits_NV.float() if logits_NV.element_size() < 4 else logits_NV.clone()
        per_token = vocab_parallel_cross_entropy(logits, targets_N)  # every tensor-parallel rank has them all
        return per_token.mean() if reduction == "mean" else per_token


def gather_logits(logits: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Whole-vocabulary logits from vocab-sharded ones, for evaluation (no gradient; megatron's gather
    allocates on CUDA, this one runs over gloo too)."""
    if dims.tp == 1:
        return logits
    pieces = [torch.empty_like(logits) for _ in range(dims.tp)]
    torch.distributed.all_gather(pieces, logits.contiguous(), group=dims.tp_group)
    return torch.cat(pieces, dim=-1)


def _mark_tensor_parallel(p: nn.Parameter, dim: int, dims: ParallelDims) -> None:
    """megatron's attributes: DeepSpeed sums such shards' gradient norms over the tensor group."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    if dims.tp > 1:
        set_tensor_model_parallel_attributes(p, True, dim, 1)


def apply_embedding(model, dims: ParallelDims) -> None:
    """Vocab-parallel embedding, LM head (still tied when the plain model ties them) and cross-entropy."""
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    plain = model.embed
    embed = VocabParallelEmbedding(
        plain.num_embeddings,
        plain.embedding_dim,
        init_method=_no_init,
        config=megatron_config(dims, plain.weight.dtype),
        tp_group=dims.tp_group,
    )
    _load(embed.weight, plain.weight, "embed.weight", dims, "gelu")
    tied = model.lm_head.weight is plain.weight
    model.embed = embed
    model.lm_head = VocabParallelHead(model.lm_head, dims, embed.weight if tied else None)
    model.cross_entropy = VocabParallelCrossEntropy()


def apply(model, dims: ParallelDims) -> None:
    """Tensor-parallel embedding, head, attention and dense MLPs (in place). With tp = 1 only MoA layers
    are replaced, for their whole-batch MI loss."""
    for i, block in enumerate(model.blocks):
        if dims.tp > 1 or block.attn.router is not None:
            block.attn = ParallelAttention(block.attn, f"blocks.{i}.attn", dims)
        if dims.tp > 1 and isinstance(block.mlp, DenseMLP):
            block.mlp = ParallelMLP(block.mlp, f"blocks.{i}.mlp", dims)
    if dims.tp > 1:
        apply_embedding(model, dims)
