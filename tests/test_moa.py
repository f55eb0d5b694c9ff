"""Mixture of attention heads (MoA): dense equals a per-expert loop, shared K/V, sparse inference."""

from __future__ import annotations

import pytest
import torch

from dsmoe import config as config_lib
from dsmoe.model import Routing, RoutingRule, build
from dsmoe.model.attention import CausalSelfAttention, apply_rope, eager_attention, rope_cos_sin
from dsmoe.model.moe import mutual_information_loss, select_experts


def moa_cfg(
    experts: int, heads_per_expert: int, kv_heads: int, d_model: int = 32, **extra
) -> config_lib.ModelConfig:
    overrides = [
        f"model.d_model={d_model}",
        "model.attention.heads=0",
        f"model.attention.experts={experts}",
        f"model.attention.heads_per_expert={heads_per_expert}",
        f"model.attention.kv_heads={kv_heads}",
        "model.vocab_size=128",
        "data.tokenizer_vocab_size=128",
        "model.max_seq_len=32",
        "data.seq_len=32",
    ] + [f"model.{k}={v}" for k, v in extra.items()]
    return config_lib.load(None, overrides).model


def make_attention(cfg, seed=0) -> CausalSelfAttention:
    torch.manual_seed(seed)
    layer = CausalSelfAttention(cfg).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def reference_moa(layer: CausalSelfAttention, x: torch.Tensor, keep=None) -> torch.Tensor:
    """sum_e p_e * O_e(attention of expert e's own query heads over the shared K/V), one expert at a time."""
    B, T, D = x.shape
    E, hd = layer.num_experts, layer.head_dim
    hpe = layer.n_heads // E
    group = layer.n_heads // layer.n_kv_heads
    cos, sin = rope_cos_sin(T, hd, 10000.0, x.device, x.dtype)
    probs = torch.softmax(x @ layer.router.weight.T, dim=-1)  # (B, T, E)
    k = apply_rope(layer.k_proj(x).view(B, T, -1, hd).transpose(1, 2), cos, sin)
    v = layer.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
    out = torch.zeros_like(x)
    for e in range(E):
        heads = range(e * hpe, (e + 1) * hpe)
        w_q = layer.q_proj.weight[e * hpe * hd : (e + 1) * hpe * hd]  # this expert's query rows
        w_o = layer.o_proj.weight[:, e * hpe * hd : (e + 1) * hpe * hd]  # its output-projection columns
        q = apply_rope((x @ w_q.T).view(B, T, hpe, hd).transpose(1, 2), cos, sin)
        kv_of_head = [h // group for h in heads]  # the shared K/V head each query head reads
        y = eager_attention(q, k[:, kv_of_head], v[:, kv_of_head])  # (B, hpe, T, hd)
        weight = probs[..., e : e + 1] if keep is None else probs[..., e : e + 1] * keep[..., e : e + 1]
        out = out + weight * (y.transpose(1, 2).reshape(B, T, -1) @ w_o.T)
    return out


@pytest.mark.parametrize("experts, heads_per_expert, kv_heads", [(4, 1, 2), (2, 2, 1), (3, 2, 3), (8, 1, 8)])
def test_dense_moa_equals_per_expert_loop(experts, heads_per_expert, kv_heads):
    cfg = moa_cfg(experts, heads_per_expert, kv_heads, d_model=experts * heads_per_expert * 4)
    layer = make_attention(cfg)
    x = torch.randn(2, 9, cfg.d_model, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_cos_sin(9, cfg.head_dim, 10000.0, "cpu", torch.float64)
    y, aux = layer(x, cos, sin)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], g)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference_moa(layer, x_ref)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *layer.parameters()], g)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    probs = layer.router(x.detach().reshape(-1, cfg.d_model))
    torch.testing.assert_close(aux.mi_loss, mutual_information_loss(probs))
    assert all(gr.abs().sum() > 0 for gr in grads)  # every expert, K/V and the router learn


def test_one_expert_with_all_heads_equals_plain_gqa():
    moa = make_attention(moa_cfg(1, 4, 2))
    plain_cfg = moa_cfg(1, 4, 2)
    plain_cfg.attention.experts, plain_cfg.attention.heads = 0, 4
    plain = CausalSelfAttention(plain_cfg).double()
    plain.load_state_dict({k: v for k, v in moa.state_dict().items() if not k.startswith("router")})
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    cos, sin = rope_cos_sin(7, 8, 10000.0, "cpu", torch.float64)
    y_moa, _ = moa(x, cos, sin)
    y_plain, aux = plain(x, cos, sin)
    assert aux is None
    torch.testing.assert_close(y_moa, y_plain, rtol=1e-12, atol=1e-12)


def test_kv_cache_does_not_grow_with_experts():
    x = torch.randn(2, 5, 64)
    cos, sin = rope_cos_sin(5, 8, 10000.0, "cpu")
    shapes, kv_params = set(), set()
    for experts, heads_per_expert in [(1, 8), (2, 4), (4, 2), (8, 1)]:  # always 8 query heads
        layer = CausalSelfAttention(moa_cfg(experts, heads_per_expert, 2, d_model=64))
        k, v = layer.project_kv(x, cos, sin)
        shapes.add((tuple(k.shape), tuple(v.shape)))
        kv_params.add(layer.k_proj.weight.numel() + layer.v_proj.weight.numel())
    assert shapes == {((2, 2, 5, 8), (2, 2, 5, 8))} and len(kv_params) == 1


@pytest.mark.parametrize("experts", [0, 4])  # plain GQA and MoA: both project Q/K/V as one GEMM
def test_backward_does_not_keep_the_fused_qkv_output(experts):
    """Autograd saves V for the attention's backward: a view of the one Q/K/V GEMM's output would keep all
    (B, T, Q + K + V) of it alive per layer (1.8 GiB of DS-MoE-1B's peak), where V is 1/18 of it."""
    extra = {"attention.experts": 0, "attention.heads": 8} if not experts else {}
    layer = CausalSelfAttention(moa_cfg(experts or 1, 2, 2, d_model=64, **extra))
    B, T = 2, 6
    x = torch.randn(B, T, 64, requires_grad=True)
    cos, sin = rope_cos_sin(T, layer.head_dim, 10000.0, "cpu")
    qkv_bytes = B * T * (layer.n_heads + 2 * layer.n_kv_heads) * layer.head_dim * x.element_size()
    saved_bytes = []

    def pack(t):
        saved_bytes.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin, RoutingRule("dense"))
    assert saved_bytes and qkv_bytes not in saved_bytes


@pytest.mark.parametrize(
    "rule",
    [RoutingRule("top_k", k=1), RoutingRule("threshold", eps=1.1), RoutingRule("threshold_top_k", eps=1.1)],
)
def test_sparse_moa_equals_masked_reference(rule):
    cfg = moa_cfg(4, 2, 2)
    layer = make_attention(cfg)
    x = torch.randn(3, 8, cfg.d_model, dtype=torch.float64)
    cos, sin = rope_cos_sin(8, cfg.head_dim, 10000.0, "cpu", torch.float64)
    y, aux = layer(x, cos, sin, rule)
    probs = layer.router(x.reshape(-1, cfg.d_model))
    keep = select_experts(probs, rule)
    expected = reference_moa(layer, x, keep.view(3, 8, 4).double())
    torch.testing.assert_close(y, expected)
    assert 0 < aux.active_fraction < 1
    k, v = layer.project_kv(x, cos, sin)  # CUDA's path: every expert, the dropped ones weighted 0
    torch.testing.assert_close(layer.combine(x, k, v, cos, sin, probs * keep), expected)


def test_sparse_moa_with_all_experts_equals_dense():
    cfg = moa_cfg(4, 2, 2)
    layer = make_attention(cfg).float()
    x = torch.randn(2, 8, cfg.d_model)
    cos, sin = rope_cos_sin(8, cfg.head_dim, 10000.0, "cpu")
    y_dense, _ = layer(x, cos, sin)
    for rule in (RoutingRule("top_k", k=4), RoutingRule("threshold", eps=0.0)):
        y_sparse, aux = layer(x, cos, sin, rule)
        assert (y_sparse - y_dense).abs().max() <= 1e-5 and aux.active_fraction == 1.0


def test_decoder_with_moa_weights_both_mi_losses():
    torch.manual_seed(0)
    cfg = moa_cfg(4, 1, 2, n_layers=2, **{"attention.alpha": 0.25, "moe.alpha": 0.5, "moe.num_experts": 4})
    model = build(cfg)
    idx = torch.randint(0, 128, (2, 12))
    out = model(idx, idx)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.mlp.mi_loss + 0.25 * out.attention.mi_loss)
    assert out.attention.expert_load.shape == (2, 4)
    every = model(idx, idx, routing=Routing(RoutingRule("top_k", k=4), RoutingRule("top_k", k=4)))
    assert (every.logits - out.logits).abs().max() <= 1e-5
    out.loss.backward()
    for block in model.blocks:
        assert (
            block.attn.router.weight.grad.abs().sum(1).min() > 0
        )  # every attention expert's router row learns
