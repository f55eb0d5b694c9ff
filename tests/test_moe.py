"""DS-MoE layer: dense forward against a per-expert loop, sparse inference, and the MI loss."""

from __future__ import annotations

import math

import pytest
import torch

from dsmoe.model import moe
from dsmoe.model.mlp import DenseMLP, activate
from dsmoe.model.moe import DSMoE, RoutingRule, mutual_information_loss, select_experts

SHAPES = [  # (tokens, d_model, num_experts, expert_hidden, activation)
    (37, 16, 4, 8, "gelu"),
    (64, 24, 8, 12, "swiglu"),
    (5, 8, 3, 4, "gelu"),
]


def make_layer(d, n, f, act, seed=0) -> DSMoE:
    torch.manual_seed(seed)
    layer = DSMoE(d, n, f, act).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def reference_moe(layer: DSMoE, x: torch.Tensor) -> torch.Tensor:
    """y = sum_i p_i(x) E_i(x), one expert at a time: the definition in the paper."""
    probs = torch.softmax(x @ layer.router.weight.T, dim=-1)
    y = torch.zeros_like(x)
    for i in range(layer.num_experts):
        h = activate(x @ layer.w_in[i].T, layer.activation)
        y = y + probs[:, i : i + 1] * (h @ layer.w_out[i])
    return y


@pytest.mark.parametrize("T, d, n, f, act", SHAPES)
def test_dense_forward_equals_per_expert_loop(T, d, n, f, act):
    layer = make_layer(d, n, f, act)
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], grad_out)

    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference_moe(layer, x_ref)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *layer.parameters()], grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_one_expert_equals_dense_mlp(act):
    d, f = 16, 24
    moe = make_layer(d, 1, f, act)
    mlp = DenseMLP(d, f, act).double()
    with torch.no_grad():
        mlp.w_in.weight.copy_(moe.w_in[0])
        mlp.w_out.weight.copy_(moe.w_out[0].T)
    x = torch.randn(2, 9, d, dtype=torch.float64)
    y_moe, _ = moe(x)
    y_mlp, _ = mlp(x)
    torch.testing.assert_close(y_moe, y_mlp, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y_moe)
    y_moe.backward(g)
    y_mlp.backward(g)
    torch.testing.assert_close(moe.w_in.grad[0], mlp.w_in.weight.grad)
    torch.testing.assert_close(moe.w_out.grad[0], mlp.w_out.weight.grad.T)
    # With one expert the router's softmax is constant 1: no gradient reaches it, nothing else differs.
    assert moe.router.weight.grad.abs().max() == 0


def test_every_expert_and_the_router_get_gradient():
    layer = make_layer(16, 8, 8, "gelu")
    x = torch.randn(32, 16, dtype=torch.float64)
    y, aux = layer(x)
    (y.square().mean() + aux.mi_loss).backward()
    per_expert = layer.w_in.grad.flatten(1).abs().sum(1) * layer.w_out.grad.flatten(1).abs().sum(1)
    assert (per_expert > 0).all(), "dense training must update every expert"
    assert (layer.router.weight.grad.abs().sum(1) > 0).all(), "every router row must get gradient"


def test_router_is_fp32_under_bf16():
    layer = DSMoE(16, 4, 8, "gelu")
    torch.nn.init.normal_(layer.router.weight)
    probs = layer.to(torch.bfloat16).router(torch.randn(3, 16, dtype=torch.bfloat16))
    assert probs.dtype == torch.float32


def test_mutual_information_loss_cases():
    n = 8
    uniform = torch.full((16, n), 1.0 / n)
    assert mutual_information_loss(uniform).abs() < 1e-6
    spread_one_hot = torch.eye(n).repeat(3, 1)  # each expert chosen by the same number of tokens
    assert torch.isclose(mutual_information_loss(spread_one_hot), torch.tensor(-math.log(n)), atol=1e-6)
    collapsed = torch.zeros(16, n)
    collapsed[:, 3] = 1.0
    assert mutual_information_loss(collapsed).abs() < 1e-6
    # A random routing lies strictly between the extremes.
    random_probs = torch.softmax(torch.randn(64, n) * 3, -1)
    assert -math.log(n) < mutual_information_loss(random_probs) < 0


@pytest.mark.parametrize("T, d, n, f, act", SHAPES)
def test_sparse_with_all_experts_equals_dense(T, d, n, f, act):
    layer = make_layer(d, n, f, act).float()
    x = torch.randn(T, d)
    y_dense, _ = layer(x)
    for rule in (RoutingRule("top_k", k=n), RoutingRule("threshold", eps=0.0)):
        y_sparse, aux = layer(x, rule)
        assert (y_sparse - y_dense).abs().max() <= 1e-5
        assert aux.active_fraction == 1.0


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "inference"])
@pytest.mark.parametrize("rule", [RoutingRule("top_k", k=2), RoutingRule("threshold", eps=0.9)])
def test_sparse_equals_masked_reference(rule, grad):
    """Under autograd the threshold rule takes the nonzero() path; for inference the sync-free one (fp32:
    torch._grouped_mm has no fp64)."""
    layer = make_layer(12, 6, 8, "swiglu").to(torch.float64 if grad else torch.float32)
    x = torch.randn(40, 12, dtype=torch.float64 if grad else torch.float32)
    with torch.set_grad_enabled(grad):
        y, aux = layer(x, rule)
    probs = layer.router(x).double()
    keep = select_experts(probs, rule)
    y_ref = torch.zeros_like(x)
    for i in range(layer.num_experts):
        h = activate(x @ layer.w_in[i].T, layer.activation) @ layer.w_out[i]
        y_ref += (probs[:, i] * keep[:, i]).unsqueeze(-1) * h  # raw probabilities, no renormalisation
    torch.testing.assert_close(y, y_ref)
    assert torch.isclose(aux.active_fraction, keep.double().mean().float())
    assert 0 < aux.active_fraction < 1


@pytest.mark.parametrize("act", ["gelu", "swiglu", "geglu"])
@pytest.mark.parametrize("mode", ["threshold", "threshold_top_k", "top_k", "dense"])
def test_masked_forward_equals_a_per_expert_reference(mode, act):
    """moe_masked_forward (every pair in a fixed slot, no host sync) against a loop over tokens and experts,
    fp32, with a token that keeps no expert; the Triton kernels' half runs in test_triton_interpret.py."""
    from dsmoe.model.sparse import moe_masked_forward

    E, F, D, T = 6, 8, 12, 25
    w_in, w_out = torch.randn(E, F if act == "gelu" else 2 * F, D) * 0.3, torch.randn(E, F, D) * 0.3
    x = torch.randn(T, D)
    probs = torch.randn(T, E).mul(2).softmax(-1)
    keep = select_experts(probs, RoutingRule(mode, k=2, eps=0.9))
    keep[4] = False
    weights = probs * keep
    y = moe_masked_forward(x, weights, keep, w_in, w_out, act, kernels=False)
    y_ref = torch.zeros(T, D)
    for t in range(T):
        for e in range(E):
            if keep[t, e]:
                y_ref[t] += weights[t, e] * (activate(x[t] @ w_in[e].T, act) @ w_out[e])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert y[4].abs().max() == 0


def test_masked_forward_in_token_chunks_equals_one_pass(monkeypatch):
    """A slot buffer over MASKED_MAX_BYTES runs in chunks of tokens: 25 tokens in chunks of 4 (the last
    short) give the one-pass result (to the GEMMs' rounding: their blocking follows the row count)."""
    from dsmoe.model import sparse

    E, F, D, T = 6, 8, 12, 25
    w_in, w_out = torch.randn(E, F, D), torch.randn(E, F, D)
    x, probs = torch.randn(T, D), torch.randn(T, E).softmax(-1)
    keep = E * probs > 0.9
    whole = sparse.moe_masked_forward(x, probs * keep, keep, w_in, w_out, "gelu", kernels=False)
    monkeypatch.setattr(sparse, "MASKED_MAX_BYTES", 4 * E * D * x.element_size())
    chunked = sparse.moe_masked_forward(x, probs * keep, keep, w_in, w_out, "gelu", kernels=False)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_sum_per_token_equals_scatter_add_with_empty_tokens():
    """The threshold rules' deterministic combine (token-major segment sums) against index_add_, forward and
    backward, with tokens that keep no expert (their rows stay zero)."""
    keep = torch.rand(30, 5) < 0.3
    keep[3] = False
    expert_idx, token_idx = keep.T.nonzero(as_tuple=True)  # expert-major, as _sparse_forward makes them
    rows = torch.randn(len(token_idx), 7, dtype=torch.float64, requires_grad=True)
    y = moe.sum_per_token(rows, token_idx, expert_idx, keep)
    y_ref = torch.zeros(30, 7, dtype=torch.float64).index_add(0, token_idx, rows)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert y[3].abs().max() == 0
    grad = torch.randn(30, 7, dtype=torch.float64)
    (g,) = torch.autograd.grad(y, rows, grad)
    torch.testing.assert_close(g, grad[token_idx])


def test_select_experts_rules():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    assert select_experts(probs, RoutingRule("top_k", k=2)).sum(1).tolist() == [2, 2]
    # keep i when N * p_i > eps: N = 4, eps = 0.9 keeps p > 0.225
    assert select_experts(probs, RoutingRule("threshold", eps=0.9)).tolist() == [
        [True, True, False, False],
        [True, True, True, True],
    ]
    with pytest.raises(ValueError):
        RoutingRule("top_k", k=0)
    with pytest.raises(ValueError):
        RoutingRule("sometimes")


def test_sparse_training_baseline_trains_only_the_top_k_experts():
    """The SMoE baseline (model.moe.training: sparse): top-K experts per token in training, Switch balance
    loss; with K = N it is the DS-MoE layer exactly (renormalising probabilities that sum to 1 changes nothing)."""
    from dsmoe.model.moe import switch_balance_loss

    torch.manual_seed(0)
    dense = DSMoE(16, 4, 8, "gelu")
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.3)
    full = DSMoE(16, 4, 8, "gelu", train_top_k=4, renormalize=True)
    full.load_state_dict(dense.state_dict())
    x = torch.randn(32, 16)
    y_dense, _ = dense(x)
    y_full, aux = full(x)
    torch.testing.assert_close(y_full, y_dense, rtol=1e-5, atol=1e-6)
    (y_dense.square().sum()).backward()
    (y_full.square().sum()).backward()
    for a, b in zip(full.parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    assert aux.balance_loss is not None and aux.active_fraction == 1

    top1 = DSMoE(16, 4, 8, "gelu", train_top_k=1)
    top1.load_state_dict(dense.state_dict())
    x = torch.randn(3, 16)
    y, aux = top1(x)
    y.sum().backward()
    chosen = top1.router(x).argmax(-1).unique()
    untouched = [e for e in range(4) if e not in chosen.tolist()]
    assert untouched and all(top1.w_in.grad[e].abs().sum() == 0 for e in untouched)
    assert aux.active_fraction == 0.25
    uniform = torch.full((8, 4), 0.25)
    keep = torch.eye(4, dtype=torch.bool).repeat(2, 1)
    assert switch_balance_loss(uniform, keep).item() == pytest.approx(1.0)


@pytest.mark.parametrize("renormalize", [True, False])
def test_sparse_training_equals_a_per_expert_reference(renormalize):
    """SMoE top-2 of 6: y = sum over the two most probable experts of w_i E_i(x), with w_i = p_i / (p_a + p_b)
    (Mixtral's gate) or the raw p_i; gradients of weights and router equal the reference's."""
    torch.manual_seed(1)
    layer = DSMoE(16, 6, 8, "gelu", train_top_k=2, renormalize=renormalize)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    reference = DSMoE(16, 6, 8, "gelu")
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(20, 16)
    y, _ = layer(x)
    probs = reference.router(x)
    top = probs.topk(2, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True) if renormalize else top.values
    y_ref = torch.stack(
        [
            sum(
                weights[t, j] * reference.expert_forward(x[t : t + 1], int(top.indices[t, j]))[0]
                for j in range(2)
            )
            for t in range(x.shape[0])
        ]
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, a), b in zip(layer.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_topk_dispatch_equals_a_per_token_reference(act):
    """The sync-free (T, K) dispatch (pairs sorted by expert, counts on the device) gives
    sum_k w_tk E_{e_tk}(x_t) computed token by token; the counts are the pairs per expert."""
    from dsmoe.model.sparse import moe_topk_forward, sort_pairs

    layer = make_layer(12, 6, 8, act)
    x = torch.randn(17, 12, dtype=torch.float64)
    weights, experts = layer.router(x).topk(3, dim=-1)
    y = moe_topk_forward(x, weights, experts, layer.w_in, layer.w_out, act, path="loop")
    y_ref = torch.stack(
        [
            sum(weights[t, k] * layer.expert_forward(x[t : t + 1], int(experts[t, k]))[0] for k in range(3))
            for t in range(17)
        ]
    )
    torch.testing.assert_close(y, y_ref)
    order, counts = sort_pairs(experts, 6)
    assert counts.tolist() == torch.bincount(experts.flatten(), minlength=6).tolist()
    assert (experts.flatten()[order].diff() >= 0).all()
    with pytest.raises(ValueError, match="gemv|grouped|loop"):
        moe_topk_forward(x, weights, experts, layer.w_in, layer.w_out, act, path="fast")


def test_every_routing_rule_names_itself():
    """Rules print in tools' output (generate.py, eval tables); threshold-top-K once raised KeyError there."""
    names = [
        str(RoutingRule(mode, k=2, eps=1.0)) for mode in ("dense", "top_k", "threshold", "threshold_top_k")
    ]
    assert names == ["dense", "top-2", "threshold N*p>1", "threshold-top-K N*p>1"]
