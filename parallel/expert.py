"""Expert parallelism (and tensor parallelism of the experts) applied to DS-MoE layers.

Each rank of the expert group holds N/ep experts; under tp each holds F/tp of every local expert's
hidden width. The router is replicated.

Dense training needs every token at every expert. Each rank all-gathers the expert group's tokens and
its local experts' router probabilities, computes its local experts' probability-weighted sum for all of
them, and reduce-scatters the sum back to the tokens' owners (the gather's backward is a reduce-scatter and the
reduce-scatter's an all-gather, so gradients flow back to the owners' tokens and routers). Per step and layer that moves 4(ep-1)/ep x
the group's tokens x D activations (forward + backward); parallel/README.md compares it with gathering
the expert weights instead.

Sparse inference under top-K sends only the selected (token, expert) pairs: an all-to-all to the experts'
ranks, the grouped expert compute there, an all-to-all back, weighted by the raw router probabilities.
Threshold rules (a share of the experts that only the device knows) gather the group's tokens as dense
training does and run each rank's kept pairs in fixed slots (dsmoe.model.sparse.moe_masked_forward): no host
sync, deterministic.

The MI loss uses the whole batch's marginal p(e) = mean over every rank's tokens: the marginal is
all-reduced over the data group (the ranks that split the batch), so the loss equals the single-process
value on the same global batch.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from dsmoe.model.moe import (
    DENSE,
    DSMoE,
    MoEAux,
    RoutingRule,
    grouped_expert_forward,
    select_experts,
    sum_per_token,
)
from dsmoe.model.sparse import masked_path_available, moe_masked_forward
from parallel.groups import ParallelDims
from parallel.layout import placement, shard
from parallel.routing import routing_aux_over
from parallel.tensor import copy_to_tensor_parallel, reduce_from_tensor_parallel


class _GatherTokens(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward: reduce-scatter (each owner gets its rows' sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter(grad, ctx.group), None


class _ScatterSums(torch.autograd.Function):
    """Reduce-scatter along dim 0 over a group; backward: all-gather."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter(y, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather(grad, ctx.group), None


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(y: torch.Tensor, group) -> torch.Tensor:
    out = y.new_empty((y.shape[0] // dist.get_world_size(group), *y.shape[1:]))
    dist.reduce_scatter_tensor(out, y.contiguous(), group=group)
    return out


def _gather_tokens(x: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """The expert group's tokens, this rank's first (megatron-core's versions of these mappings allocate
    on CUDA, so we keep our own: they must run over gloo too)."""
    return x if dims.ep == 1 else _GatherTokens.apply(x, dims.ep_group)


def _scatter_sums(y: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    return y if dims.ep == 1 else _ScatterSums.apply(y, dims.ep_group)


class ParallelDSMoE(nn.Module):
    """A DS-MoE layer holding this rank's experts (and hidden slice); the plain layer's parameter names."""

    routed = True

    def __init__(self, plain: DSMoE, prefix: str, dims: ParallelDims, dispatch: str = "tokens"):
        nn.Module.__init__(self)
        self.dims, self.dispatch = dims, dispatch
        self.num_experts, self.activation = plain.num_experts, plain.activation
        self.num_local_experts = plain.num_experts // dims.ep
        self.first_expert = dims.ep_rank * self.num_local_experts
        self.router = plain.router
        self.w_in = nn.Parameter(self._shard(plain.w_in, f"{prefix}.w_in"))
        self.w_out = nn.Parameter(self._shard(plain.w_out, f"{prefix}.w_out"))
        self.prefix = prefix
        self.unit_mask: torch.Tensor | None = None  # MSG growth, full (N, F) as on the plain layer
        for p in (self.w_in, self.w_out):
            if dims.tp > 1:
                from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

                set_tensor_model_parallel_attributes(p, True, 1, 1)
            if dims.ep > 1:  # DeepSpeed's MoE marks: reduce over the expert-data group named group_name
                p.allreduce = False
                p.group_name = f"ep_size_{dims.ep}"

    def _shard(self, full: torch.Tensor, name: str) -> torch.Tensor:
        d = self.dims
        return shard(full.detach(), placement(name, self.activation), d.tp_rank, d.tp, d.ep_rank, d.ep)

    def _w_out(self) -> torch.Tensor:
        """w_out with new hidden units scaled by their growth mask (as DSMoE.expert_w_out), this rank's piece."""
        if self.unit_mask is None:
            return self.w_out
        local = self._shard(self.unit_mask, f"{self.prefix}.w_out")  # (N, F) split like w_out's first dims
        return self.w_out * local.to(self.w_out.dtype).unsqueeze(-1)

    def forward(self, x: torch.Tensor, routing: RoutingRule = DENSE) -> tuple[torch.Tensor, MoEAux]:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        probs_TE = self.router(x_TD)
        if routing.mode == "dense":
            y_TD, active = self._dense_forward(x_TD, probs_TE), probs_TE.new_ones(())
        else:
            y_TD, active = self._sparse_forward(x_TD, probs_TE, routing)
        return y_TD.view(shape), routing_aux_over(probs_TE, active, self.dims)

    def _dense_forward(self, x_TD: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
        if self.dispatch == "weights" and self.dims.ep > 1:
            return self._dense_forward_gathering_weights(x_TD, probs_TE)
        local = slice(self.first_expert, self.first_expert + self.num_local_experts)
        x_all = _gather_tokens(copy_to_tensor_parallel(x_TD, self.dims), self.dims)  # (ep*T, D)
        # every rank's tokens' probabilities for this rank's experts (N columns travel: each rank wants others)
        p_all = _gather_tokens(copy_to_tensor_parallel(probs_TE, self.dims), self.dims)[:, local]  # (ep*T, n)
        T, n = x_all.shape[0], self.num_local_experts
        h = (x_all @ self.w_in.reshape(-1, x_all.shape[1]).T).view(T, n, -1)  # local experts: one GEMM
        h = activate_scaled(h, p_all, self.activation)
        y_all = h.reshape(T, -1) @ self._w_out().reshape(
            -1, x_all.shape[1]
        )  # partial: local experts, local width
        return reduce_from_tensor_parallel(_scatter_sums(y_all, self.dims), self.dims)

    def _dense_forward_gathering_weights(self, x_TD: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
        """The other path: all-gather every expert's weights (backward: reduce-scatter their gradients to
        the experts' ranks) and run all N experts on this rank's own tokens, as the plain layer does."""
        x_TD = copy_to_tensor_parallel(x_TD, self.dims)
        probs_TE = copy_to_tensor_parallel(probs_TE, self.dims)
        w_in, w_out = (
            _gather_tokens(self.w_in, self.dims),
            _gather_tokens(self._w_out(), self.dims),
        )  # (N, ., D)
        T, N = x_TD.shape[0], self.num_experts
        h = activate_scaled(
            (x_TD @ w_in.reshape(-1, x_TD.shape[1]).T).view(T, N, -1), probs_TE, self.activation
        )
        return reduce_from_tensor_parallel(h.reshape(T, -1) @ w_out.reshape(-1, x_TD.shape[1]), self.dims)

    @torch.no_grad()
    def _sparse_forward(self, x_TD, probs_TE, routing: RoutingRule) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-K: all-to-all dispatch of the kept (token, expert) pairs to the experts' ranks and back. Threshold
        rules: the expert group's tokens gathered as the dense forward does, each rank's kept pairs in fixed
        slots (moe_masked_forward): no host sync, and the same bits every run."""
        d, n = self.dims, self.num_local_experts
        keep_TE = select_experts(probs_TE, routing)
        if routing.mode != "top_k" and masked_path_available(x_TD):
            return self._masked_forward(x_TD, probs_TE * keep_TE, keep_TE), keep_TE.float().mean()
        expert_idx, token_idx = keep_TE.T.nonzero(as_tuple=True)  # expert-major: grouped by destination
        weights_P = probs_TE[token_idx, expert_idx].to(x_TD.dtype)
        send_counts = torch.bincount(expert_idx // n, minlength=d.ep)
        recv_counts = _exchange(send_counts, torch.ones_like(send_counts), torch.ones_like(send_counts), d)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        x_recv = _exchange(x_TD[token_idx], send, recv, d)
        expert_recv = _exchange(expert_idx % n, send, recv, d)  # local expert index on the receiving rank
        order = expert_recv.argsort(stable=True)  # arrivals are grouped by source: regroup by local expert
        out_sorted = grouped_expert_forward(
            x_recv[order], torch.bincount(expert_recv, minlength=n), self.w_in, self._w_out(), self.activation
        )
        out_recv = torch.empty_like(out_sorted).index_copy_(0, order, out_sorted)
        out_P = _exchange(out_recv, recv, send, d)  # back to the owners, in the order they were sent
        # each token's pairs summed in expert order (index_add_'s atomics made bf16 results vary run to run)
        y_TD = sum_per_token(out_P * weights_P.unsqueeze(-1), token_idx, expert_idx, keep_TE)
        if d.tp > 1:
            dist.all_reduce(y_TD, group=d.tp_group)  # partial sums over the hidden slices
        return y_TD, keep_TE.float().mean()

    def _masked_forward(self, x_TD, weights_TE, keep_TE) -> torch.Tensor:
        """Threshold rules under ep/tp: every rank of the expert group runs its experts' kept pairs of the
        group's tokens (the all-gather of the dense 'tokens' dispatch; at ~1/3 of 32 experts kept, fewer rows
        than the all-to-all's kept pairs), the partial sums reduce-scattered back to their owners, then
        summed over the hidden slices (tp)."""
        d = self.dims
        local = slice(self.first_expert, self.first_expert + self.num_local_experts)
        x_all = _gather_tokens(x_TD, d)  # (ep*T, D), this rank's first
        weights_all = _gather_tokens(weights_TE, d)[:, local]  # every rank's tokens, this rank's experts
        keep_all = _gather_tokens(keep_TE.to(torch.uint8), d)[:, local].bool()  # (bool: not every backend)
        y_all = moe_masked_forward(x_all, weights_all, keep_all, self.w_in, self._w_out(), self.activation)
        y_TD = _scatter_sums(y_all, d)
        if d.tp > 1:
            dist.all_reduce(y_TD, group=d.tp_group)  # partial sums over the hidden slices
        return y_TD


def activate_scaled(h: torch.Tensor, p: torch.Tensor, activation: str) -> torch.Tensor:
    from dsmoe.model.mlp import activate

    h = activate(h, activation)
    return h * p.to(h.dtype).unsqueeze(-1)


def _exchange(t: torch.Tensor, send_sizes, recv_sizes, dims: ParallelDims) -> torch.Tensor:
    """all_to_all_single over the expert group with per-rank split sizes along dim 0."""
    if dims.ep == 1:
        return t.clone()
    if isinstance(send_sizes, torch.Tensor):  # the counts themselves: one element to each rank
        send_sizes, recv_sizes = send_sizes.tolist(), recv_sizes.tolist()
    out = t.new_empty((sum(recv_sizes), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), recv_sizes, send_sizes, group=dims.ep_group)
    return out


@functools.cache
def _expert_parallel_class():
    """ParallelDSMoE that DeepSpeed recognises as an MoE layer (engine.has_moe_layers), so that it reduces
    the expert weights over the expert-data group, partitions them there under ZeRO, and keeps them in
    their own optimizer groups. DeepSpeed's MoE supplies only that identity: its gate and experts are not
    built (DeepSpeed reads num_experts, num_local_experts, ep_size, expert_group_name)."""
    from deepspeed.moe.layer import MoE

    class ExpertParallelDSMoE(ParallelDSMoE, MoE):
        def __init__(self, plain: DSMoE, prefix: str, dims: ParallelDims, dispatch: str):
            ParallelDSMoE.__init__(self, plain, prefix, dims, dispatch)
            self.ep_size = dims.ep
            self.expert_group_name = f"ep_size_{dims.ep}"

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """Called by deepspeed.initialize: build DeepSpeed's expert groups and check they are ours."""
            from deepspeed.utils import groups as ds_groups

            if self.expert_group_name not in ds_groups._get_expert_parallel_group_dict():
                ds_groups._create_expert_data_and_model_parallel(self.ep_size, mpu=ds_groups.mpu)
            ours = (
                dist.get_process_group_ranks(self.dims.ep_group),
                dist.get_process_group_ranks(self.dims.expert_data_group),
            )
            theirs = (
                list(ds_groups._get_expert_parallel_group_ranks(self.expert_group_name)),
                list(ds_groups._get_expert_data_parallel_group_ranks(self.expert_group_name)),
            )
            if tuple(list(r) for r in ours) != theirs:
                raise RuntimeError(f"DeepSpeed's expert groups {theirs} differ from megatron-core's {ours}")

    return ExpertParallelDSMoE


def choose_dispatch(setting: str, tokens: int, d_model: int, expert_params: int, dims: ParallelDims) -> str:
    """'tokens' or 'weights' for dense training under ep > 1 (parallel/README.md): per rank and layer the
    token path moves 4(ep-1)·T·D elements, the weight path 3(ep-1)/ep·W (W: the layer's expert parameters
    on this tensor rank); 'auto' takes the smaller."""
    if setting != "auto" or dims.ep == 1:
        return setting if dims.ep > 1 else "tokens"
    token_volume = 4 * (dims.ep - 1) * tokens * d_model
    weight_volume = 3 * (dims.ep - 1) / dims.ep * expert_params / dims.tp
    return "weights" if weight_volume < token_volume else "tokens"


def make_parallel_moe(
    plain: DSMoE, prefix: str, dims: ParallelDims, dispatch: str = "tokens"
) -> ParallelDSMoE:
    if dims.ep > 1:
        return _expert_parallel_class()(plain, prefix, dims, dispatch)
    return ParallelDSMoE(plain, prefix, dims, dispatch)


def apply(model, dims: ParallelDims, dispatch: str = "tokens") -> None:
    """Replace every DS-MoE layer by its expert/tensor-parallel form (in place)."""
    for i, block in enumerate(model.blocks):
        if isinstance(block.mlp, DSMoE):
            if block.mlp.train_top_k:  # the SMoE baseline: plain layers under data parallelism (config.py
                continue  # refuses ep/tp for it); its balance loss uses each rank's batch, as Switch does
            block.mlp = make_parallel_moe(block.mlp, f"blocks.{i}.mlp", dims, dispatch)
