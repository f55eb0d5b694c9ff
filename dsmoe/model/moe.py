"""The DS-MoE layer (Pan et al. 2024, papers/dsmoe.md): dense training of all experts, sparse inference.

Training: a fp32 softmax router over all N experts weights every expert's output for every token,
  y = sum_i p_i(x) * E_i(x).
With the experts stored stacked (w_in: (N, F_in, D), w_out: (N, F, D)) this is one wide MLP of width N*F
whose hidden blocks are scaled by p_i before the second GEMM: two large matmuls, no loop over experts,
no top-k, no capacity, no dropped tokens.

Inference: keep experts by top-K or by threshold (N * p_i > eps), weight them by the raw router
probabilities (no renormalisation), and compute only those: tokens are grouped per expert.

The mutual-information balance loss is returned with the output; the layer keeps no global state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dsmoe.model.mlp import activate
from dsmoe.model.moe_triton import available as scaled_gelu_available
from dsmoe.model.moe_triton import scaled_gelu
from dsmoe.model.router import Router
from dsmoe.model.sparse import (
    grouped_mm_available,
    masked_path_available,
    moe_masked_forward,
    moe_topk_forward,
)

THRESHOLD_MODES = ("threshold", "threshold_top_k")
"""The rules that keep a share of the experts only the router's probabilities decide (no fixed K)."""


@dataclass(frozen=True)
class RoutingRule:
    """Which experts run per token: all of them (training), the top K, those with N * p_i > eps, or the
    top K with K the batch-average count the threshold rule would keep (the paper's Threshold-TopK)."""

    mode: Literal["dense", "top_k", "threshold", "threshold_top_k"] = "dense"
    k: int = 0
    eps: float = 0.0

    def __post_init__(self):
        if self.mode not in ("dense", "top_k", "threshold", "threshold_top_k"):
            raise ValueError(f"routing mode must be dense|top_k|threshold|threshold_top_k, got {self.mode!r}")
        if self.mode == "top_k" and self.k < 1:
            raise ValueError(f"top_k routing needs k >= 1, got {self.k}")
        if self.mode in THRESHOLD_MODES and self.eps < 0:
            raise ValueError(f"threshold routing needs eps >= 0, got {self.eps}")

    def __str__(self) -> str:
        return {
            "dense": "dense",
            "top_k": f"top-{self.k}",
            "threshold": f"threshold N*p>{self.eps:g}",
            "threshold_top_k": f"threshold-top-K N*p>{self.eps:g}",
        }[self.mode]

    def to_dict(self) -> dict:
        return {"mode": self.mode, "k": self.k, "eps": self.eps}


DENSE = RoutingRule()


@dataclass(frozen=True)
class Routing:
    """Inference routing per layer type. The paper sparsifies the MLP and keeps every attention expert."""

    mlp: RoutingRule = DENSE
    attention: RoutingRule = DENSE

    def __str__(self) -> str:
        if self.mlp.mode == "dense" and self.attention.mode == "dense":
            return "dense"
        return f"mlp {self.mlp}" + (f", attention {self.attention}" if self.attention.mode != "dense" else "")

    def to_dict(self) -> dict:
        return {"mlp": self.mlp.to_dict(), "attention": self.attention.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> Routing:
        return cls(RoutingRule(**data["mlp"]), RoutingRule(**data["attention"]))


TRAINING = Routing()


@dataclass
class MoEAux:
    """What a DS-MoE layer reports besides its output."""

    mi_loss: torch.Tensor
    """Mutual-information loss of this layer (scalar, differentiable)."""
    expert_load: torch.Tensor
    """(N,) mean router probability per expert over the tokens (detached)."""
    router_entropy: torch.Tensor
    """Mean per-token routing entropy in nats (detached)."""
    active_fraction: torch.Tensor
    """Fraction of (token, expert) pairs computed: 1 in dense mode (detached)."""
    balance_loss: torch.Tensor | None = None
    """Switch load-balancing loss (sparse training only, differentiable)."""


def mutual_information_loss(probs_TE: torch.Tensor, marginal_E: torch.Tensor | None = None) -> torch.Tensor:
    """L_MI = -H(mean_x p(.|x)) + mean_x H(p(.|x)) (ModuleFormer; papers/dsmoe.md).

    0 for uniform routing, -log N for one-hot routing spread evenly over N experts, 0 when every
    token puts all its mass on the same expert. `marginal_E` replaces mean_x p(.|x) when the batch is
    split over ranks (parallel.expert passes the whole batch's marginal).
    """
    probs_TE = probs_TE.to(torch.promote_types(probs_TE.dtype, torch.float32))
    marginal_E = probs_TE.mean(0) if marginal_E is None else marginal_E
    marginal_entropy = -p_log_p(marginal_E).sum()
    conditional_entropy = -p_log_p(probs_TE).sum(-1).mean()
    return conditional_entropy - marginal_entropy


def p_log_p(p: torch.Tensor) -> torch.Tensor:
    """p log p, 0 at p = 0 with a finite gradient there (xlogy's is 0/0 = NaN). Probabilities of exactly 0
    occur: an expert added by growth starts with router logit bias log 0 (dsmoe/growth.py)."""
    return p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


def switch_balance_loss(probs_TE: torch.Tensor, keep_TE: torch.Tensor) -> torch.Tensor:
    """N * sum_i f_i * P_i: f_i the share of routed (token, expert) pairs that go to expert i, P_i its mean
    router probability (Fedus et al. 2021, with top-K assignments); 1 when routing is balanced."""
    f_E = keep_TE.float().sum(0) / keep_TE.sum().clamp_min(1)
    return probs_TE.shape[-1] * (f_E * probs_TE.float().mean(0)).sum()


def select_experts(probs_TE: torch.Tensor, rule: RoutingRule) -> torch.Tensor:
    """Boolean (T, N) mask of the experts each token keeps under `rule`."""
    num_experts = probs_TE.shape[-1]
    if rule.mode == "dense":
        return torch.ones_like(probs_TE, dtype=torch.bool)
    # Threshold on the normalised probability (paper: keep i when N * p_i > eps).
    above_TE = num_experts * probs_TE > rule.eps
    if rule.mode == "threshold":
        return above_TE
    if rule.mode == "top_k":
        top_idx_TK = probs_TE.topk(min(rule.k, num_experts), dim=-1).indices
        return torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(-1, top_idx_TK, True)
    # Threshold-top-K: K is the batch's mean threshold count (at least 1), kept as a device tensor (no host
    # sync, so the inference Engine's decode step stays one CUDA graph); each token keeps its K largest.
    k = above_TE.sum(-1).float().mean().round().clamp_min(1)
    ranks_TE = probs_TE.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    return ranks_TE < k


def kept_weights(probs_TE: torch.Tensor, keep_TE: torch.Tensor, renormalize: bool = False) -> torch.Tensor:
    """Each token's probabilities of the experts it keeps (0 for the others): DS-MoE weights the experts by
    their raw probabilities (paper); `renormalize` makes them sum to 1 (as in Mixtral; a token may keep none)."""
    kept_TE = probs_TE * keep_TE
    return kept_TE / kept_TE.sum(-1, keepdim=True).clamp_min(1e-20) if renormalize else kept_TE


def top_k_table(
    probs_TE: torch.Tensor, k: int, renormalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, expert ids), each (T, k): the k largest probabilities, descending (renormalised if asked)."""
    weights_TK, experts_TK = probs_TE.topk(k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return weights_TK, experts_TK


def routing_aux(
    probs_TE: torch.Tensor, active_fraction: torch.Tensor, marginal_E: torch.Tensor | None = None
) -> MoEAux:
    """The MI loss and the detached routing statistics of one layer, in one pass over the probabilities:
    the MI loss's conditional entropy is the logged routing entropy, its batch marginal the expert load."""
    probs_TE = probs_TE.to(torch.promote_types(probs_TE.dtype, torch.float32))
    conditional_entropy = -p_log_p(probs_TE).sum(-1).mean()
    load_E = probs_TE.mean(0)
    marginal_entropy = -p_log_p(load_E if marginal_E is None else marginal_E).sum()
    return MoEAux(
        mi_loss=conditional_entropy - marginal_entropy,
        expert_load=load_E.detach(),
        router_entropy=conditional_entropy.detach(),
        active_fraction=active_fraction,
    )


class DSMoE(nn.Module):
    """DS-MoE MLP layer: router over all experts; dense all-expert forward in training, sparse at inference."""

    routed = True  # Block passes it the routing rule
    fused = True
    """Class switch: False forces the plain torch GeLU-and-scale path of the dense forward everywhere (on
    CUDA it otherwise takes dsmoe.model.moe_triton's kernels; benchmarks/bench_layers.py compares them)."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        expert_hidden: int,
        activation: str,
        train_top_k: int = 0,
        renormalize: bool = False,
    ):
        super().__init__()
        self.num_experts, self.expert_hidden, self.activation = num_experts, expert_hidden, activation
        self.train_top_k = train_top_k  # > 0: the sparse-trained baseline (SMoE), top-K experts per token
        self.renormalize = renormalize  # SMoE: selected experts' weights sum to 1 (DS-MoE never renormalises)
        width_in = 2 * expert_hidden if activation == "swiglu" else expert_hidden  # SwiGLU: [gate; up]
        self.router = Router(d_model, num_experts)
        self.w_in = nn.Parameter(torch.empty(num_experts, width_in, d_model))  # expert i: x @ w_in[i].T
        self.w_out = nn.Parameter(torch.empty(num_experts, expert_hidden, d_model))  # expert i: h @ w_out[i]
        self.unit_mask: torch.Tensor | None = None  # MSG growth: (N, F), c on new hidden units

    def expert_w_out(self) -> torch.Tensor:
        """w_out with new hidden units scaled by their growth mask (h_f * c_f * w_f = h_f * (c_f w_f))."""
        return (
            self.w_out
            if self.unit_mask is None
            else self.w_out * self.unit_mask.to(self.w_out.dtype).unsqueeze(-1)
        )

    def expert_forward(self, x_TD: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert on its tokens: act(x W_in_i^T) W_out_i."""
        return activate(x_TD @ self.w_in[expert].T, self.activation) @ self.expert_w_out()[expert]

    def forward(self, x: torch.Tensor, routing: RoutingRule = DENSE) -> tuple[torch.Tensor, MoEAux]:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])  # (T, D), T = all tokens of the batch
        probs_TE = self.router(x_TD)
        if routing.mode == "dense" and self.train_top_k:  # SMoE: train (and by default run) top-K
            routing = RoutingRule("top_k", k=self.train_top_k)
            y_TD, active = self._sparse_forward(x_TD, probs_TE, routing, self.renormalize)
            aux = routing_aux(probs_TE, active)
            aux.balance_loss = switch_balance_loss(probs_TE, select_experts(probs_TE.detach(), routing))
            return y_TD.view(shape), aux
        if routing.mode == "dense":
            y_TD, active = self._dense_forward(x_TD, probs_TE), probs_TE.new_ones(())
        else:  # an SMoE renormalises under any sparse rule, as it was trained
            y_TD, active = self._sparse_forward(x_TD, probs_TE, routing, self.renormalize)
        return y_TD.view(shape), routing_aux(probs_TE, active)

    def _dense_forward(self, x_TD: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
        T, N, F_ = x_TD.shape[0], self.num_experts, self.expert_hidden
        h_TK = x_TD @ self.w_in.view(-1, x_TD.shape[1]).T  # one GEMM, width K = N*F_in
        if self.fused and scaled_gelu_available(h_TK, self.activation):  # one pass each way (moe_triton.py)
            h_TK = scaled_gelu(h_TK, probs_TE)
        else:
            h_TNF = activate(h_TK.view(T, N, -1), self.activation)  # (T, N, F)
            h_TNF = h_TNF * probs_TE.to(h_TNF.dtype).unsqueeze(-1)  # scale expert i's block by p_i
            h_TK = h_TNF.reshape(T, N * F_)
        return h_TK @ self.expert_w_out().reshape(N * F_, -1)  # one GEMM sums experts

    def _sparse_forward(
        self, x_TD: torch.Tensor, probs_TE: torch.Tensor, routing: RoutingRule, renormalize: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # top-K is a fixed (T, K) table of pairs: sync-free dispatch (dsmoe/model/sparse.py)
        if routing.mode == "top_k":
            k = min(routing.k, self.num_experts)
            weights_TK, experts_TK = top_k_table(probs_TE, k, renormalize)
            y_TD = moe_topk_forward(
                x_TD, weights_TK, experts_TK, self.w_in, self.expert_w_out(), self.activation
            )
            return y_TD, probs_TE.new_tensor(k / self.num_experts, dtype=torch.float32)
        keep_TE = select_experts(probs_TE, routing)
        probs_TE = kept_weights(probs_TE, keep_TE, renormalize)  # differentiable
        if not torch.is_grad_enabled() and masked_path_available(x_TD):  # inference: no host sync
            y_TD = moe_masked_forward(
                x_TD, probs_TE, keep_TE, self.w_in, self.expert_w_out(), self.activation
            )
            return y_TD, keep_TE.float().mean()
        # Group (token, expert) pairs by expert: transposing makes nonzero() come out expert-major.
        expert_idx, token_idx = keep_TE.T.nonzero(as_tuple=True)
        x_sorted = x_TD[token_idx]  # (P, D), P = kept pairs
        out_sorted = grouped_expert_forward(
            x_sorted, keep_TE.sum(0), self.w_in, self.expert_w_out(), self.activation
        )
        weights_P = probs_TE[token_idx, expert_idx].to(x_TD.dtype)
        y_TD = sum_per_token(out_sorted * weights_P.unsqueeze(-1), token_idx, expert_idx, keep_TE)
        return y_TD, keep_TE.float().mean()


def sum_per_token(
    rows_PD: torch.Tensor, token_idx: torch.Tensor, expert_idx: torch.Tensor, keep_TE: torch.Tensor
) -> torch.Tensor:
    """(T, D): each token's sum of its kept pairs' rows, added in expert order, the same bits every run.
    The pairs arrive expert-major; they are put token-major and summed segment by segment (a scatter-add,
    index_add_, adds in whatever order the GPU's atomics land: bf16 results changed run to run)."""
    token_major = torch.argsort(token_idx * keep_TE.shape[1] + expert_idx)  # keys are unique: no tie to break
    return torch.segment_reduce(rows_PD[token_major], "sum", lengths=keep_TE.sum(1), axis=0, unsafe=True)


def grouped_gemm_available(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs bf16 on Hopper-class GPUs; everything else takes the portable loop."""
    return grouped_mm_available(x)


def grouped_expert_forward(
    x_sorted: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str,
    grouped_gemm: bool | None = None,
) -> torch.Tensor:
    """act(x W_in_e^T) W_out_e for rows grouped by expert (counts per expert given), on the experts' weights
    in place: two grouped GEMMs on Hopper (torch._grouped_mm, no host sync), else a loop over experts.
    `grouped_gemm` forces the choice (None: the fastest available)."""
    if grouped_gemm_available(x_sorted) if grouped_gemm is None else grouped_gemm:
        offsets_E = tokens_per_expert_E.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x_sorted, w_in.transpose(1, 2), offs=offsets_E)  # (P, F_in)
        return torch._grouped_mm(activate(h, activation), w_out, offs=offsets_E)  # (P, D)
    out_sorted = torch.empty_like(x_sorted)
    start = 0
    for expert, count in enumerate(tokens_per_expert_E.tolist()):
        if count:
            rows = slice(start, start + count)
            out_sorted[rows] = activate(x_sorted[rows] @ w_in[expert].T, activation) @ w_out[expert]
            start += count
    return out_sorted
