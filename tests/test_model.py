"""DecoderLM and attention: backends agree, causality holds, sparse K=N reproduces dense."""

from __future__ import annotations

import pytest
import torch

from dsmoe import config as config_lib
from dsmoe.model import Routing, RoutingRule, build
from dsmoe.model.attention import apply_rope, eager_attention, rope_cos_sin, sdpa_attention


def model_cfg(*overrides: str) -> config_lib.ModelConfig:
    base = ["model.d_model=32", "model.n_layers=2", "model.max_seq_len=32", "model.vocab_size=128"]
    base += [
        "model.attention.heads=4",
        "model.attention.experts=0",
        "model.attention.kv_heads=2",
        "model.moe.num_experts=4",
    ]
    base += ["model.moe.expert_hidden=16", "data.seq_len=32", "data.tokenizer_vocab_size=128"]
    return config_lib.load(None, base + list(overrides)).model


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_sdpa_equals_eager_attention(heads, kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, heads, 11, 8, requires_grad=True)
    k = torch.randn(2, kv_heads, 11, 8, requires_grad=True)
    v = torch.randn(2, kv_heads, 11, 8, requires_grad=True)
    out_fast = sdpa_attention(q, k, v)
    out_ref = eager_attention(q, k, v)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out_ref)
    grads_fast = torch.autograd.grad(out_fast, [q, k, v], g)
    grads_ref = torch.autograd.grad(out_ref, [q, k, v], g)
    for a, b in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rope_preserves_norm_and_is_relative():
    cos, sin = rope_cos_sin(16, 8, 10000.0, "cpu")
    x = torch.randn(1, 1, 16, 8)
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    # q.k after rotation depends only on the offset: same vectors at positions (2, 5) and (7, 10).
    q, k = torch.randn(8), torch.randn(8)
    seq = torch.zeros(1, 1, 16, 8)
    seq[0, 0, [2, 7]] = q
    seq2 = torch.zeros(1, 1, 16, 8)
    seq2[0, 0, [5, 10]] = k
    rq, rk = apply_rope(seq, cos, sin)[0, 0], apply_rope(seq2, cos, sin)[0, 0]
    torch.testing.assert_close(rq[2] @ rk[5], rq[7] @ rk[10], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mlp", ["moe", "dense"])
def test_decoder_is_causal_and_backends_agree(mlp):
    torch.manual_seed(0)
    cfg = model_cfg(f"model.mlp={mlp}")
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = model(idx).logits
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(changed).logits[:, :10], logits[:, :10])
    eager = build(model_cfg(f"model.mlp={mlp}", "model.attention.backend=eager"))
    eager.load_state_dict(model.state_dict())
    torch.testing.assert_close(eager(idx).logits, logits, rtol=1e-5, atol=1e-5)


def test_flash4_backend_is_the_decoders_and_falls_back_to_sdpa_saying_so(monkeypatch):
    """'flash4' (FlashAttention-4) is a bf16 decoder backend; where it cannot run (not installed, CPU) SDPA
    runs with a warning, so a model trained with it still loads and runs anywhere; an explicit mask (the
    Engine's chunked prefill) goes to SDPA."""
    from dsmoe.model import attention as attention_lib
    from dsmoe.model.attention import flash4_attention, resolve_backend

    monkeypatch.setattr(attention_lib, "flash_attn_4", lambda: None)  # as on a machine without it
    flash4 = ["model.attention.backend=flash4", "train.precision=bf16"]
    assert model_cfg(*flash4).attention.backend == "flash4"
    with pytest.raises(config_lib.ConfigError, match="runs bf16 only"):
        config_lib.load("configs/tiny.yaml", flash4[:1] + ["train.precision=fp32"])
    with pytest.raises(config_lib.ConfigError, match="model.attention.backend"):
        config_lib.load("configs/mosaicbert_base.yaml", flash4)
    with pytest.warns(UserWarning, match="attention runs on SDPA"):
        assert resolve_backend("flash4") == "sdpa"
    with pytest.warns(UserWarning, match="attention runs on SDPA"):
        model = build(model_cfg(*flash4))
    assert {block.attn.backend for block in model.blocks} == {"sdpa"}
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.arange(5)[None, :] <= 2 + torch.arange(3)[:, None]  # 3 queries after 2 cached keys
    torch.testing.assert_close(
        flash4_attention(q, k, v, causal=False, mask=mask), sdpa_attention(q, k, v, causal=False, mask=mask)
    )
    q = torch.randn(1, 4, 5, 8)
    with pytest.warns(UserWarning, match="cannot take torch.float32 on cpu"):
        torch.testing.assert_close(flash4_attention(q, k, v), sdpa_attention(q, k, v))


def _fa4_stand_in():
    """flash-attn-4's two entry points as dsmoe calls them, in plain torch on (B, T, H, hd), K/V heads shared by
    groups of query heads. Only for holding our custom-op wiring (layouts, GQA, autograd, tracing) to SDPA on
    a machine without FA4; the GPU tests (tests/test_gpu_train.py) run the real kernels."""
    import types

    def heads_first(q, k, v):  # (B, H, T, hd) in fp32, each K/V head repeated for its query heads
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
        return q, *(t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))

    def probs(q, k, causal):
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(scores, -1), scores.logsumexp(-1)

    def fwd(q, k, v, causal=False, return_lse=False):
        qh, kh, vh = heads_first(q, k, v)
        p, lse = probs(qh, kh, causal)
        return (p @ vh).transpose(1, 2).to(q.dtype).contiguous(), lse, None, None, None

    def bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False):  # by hand: ops run below autograd
        qh, kh, vh = heads_first(q, k, v)
        p, _ = probs(qh, kh, causal)
        do = dout.transpose(1, 2).float()
        dp = do @ vh.transpose(-1, -2)
        ds = p * (dp - (do * out.transpose(1, 2).float()).sum(-1, keepdim=True)) / q.shape[-1] ** 0.5
        dq, dk, dv = ds @ kh, ds.transpose(-1, -2) @ qh, p.transpose(-1, -2) @ do
        group = lambda t: t.unflatten(1, (k.shape[2], -1)).sum(2)  # query heads -> their K/V head
        return dq.transpose(1, 2), group(dk).transpose(1, 2), group(dv).transpose(1, 2)

    return types.SimpleNamespace(_flash_attn_fwd=fwd, _flash_attn_bwd=bwd)


def test_flash4_custom_ops_trace_whole_and_carry_gradients(monkeypatch):
    """The flash4 backend wraps FA4's forward and backward as torch.library ops: a compiled attention has no
    graph break around them (fullgraph) and its gradients equal SDPA's, grouped K/V included."""
    import sys
    import types

    from dsmoe.model import attention as attention_lib

    package = types.ModuleType("flash_attn")
    package.cute = types.ModuleType("flash_attn.cute")
    package.cute.interface = _fa4_stand_in()
    for name, module in (
        ("flash_attn", package),
        ("flash_attn.cute", package.cute),
        ("flash_attn.cute.interface", package.cute.interface),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(attention_lib, "flash4_runs", lambda q: True)  # FA4 "runs" on this CPU
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 8, requires_grad=True)  # (B, H, T, hd) as the attention module hands it
    k, v = torch.randn(2, 2, 9, 8, requires_grad=True), torch.randn(2, 2, 9, 8, requires_grad=True)
    upstream = torch.randn(2, 4, 9, 8)
    compiled = torch.compile(attention_lib.flash4_attention, fullgraph=True, backend="aot_eager")
    grads = []
    for attend in (sdpa_attention, compiled):
        out = attend(q, k, v, causal=True)
        grads.append((out.detach(), *torch.autograd.grad(out, (q, k, v), upstream)))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decoder_loss_adds_weighted_mi_loss_and_sparse_all_equals_dense():
    torch.manual_seed(0)
    cfg = model_cfg("model.moe.alpha=0.5")
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(idx, idx)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.mlp.mi_loss)
    assert out.mlp.expert_load.shape == (cfg.n_layers, cfg.moe.num_experts) and out.attention is None
    sparse = model(idx, idx, routing=Routing(mlp=RoutingRule("top_k", k=cfg.moe.num_experts)))
    assert (sparse.logits - out.logits).abs().max() <= 1e-5


def test_tied_embeddings_share_storage_and_param_counts():
    model = build(model_cfg())
    assert model.lm_head.weight is model.embed.weight
    untied = build(model_cfg("model.tie_embeddings=false"))
    assert untied.num_params() == model.num_params() + model.embed.weight.numel()
    assert model.num_expert_params() == 2 * 4 * 16 * 32 * 2  # layers x experts x hidden x d x (w_in, w_out)


def test_too_long_input_is_refused():
    model = build(model_cfg())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_counts_every_expert_and_attention(tied):
    cfg = model_cfg(f"model.tie_embeddings={str(tied).lower()}")
    model = build(cfg)
    # every matrix a token goes through: all blocks' weights (every expert) and the LM head once
    dense_part = sum(p.numel() for b in model.blocks for p in b.parameters()) + model.lm_head.weight.numel()
    dense_part += model.final_norm.weight.numel()
    attention = 6 * cfg.n_layers * 16 * cfg.attention.num_heads * cfg.head_dim
    assert model.flops_per_token(16) == 6 * dense_part + attention
    assert model.num_expert_params() < dense_part  # the experts are inside the count, all of them


def kept_and_recomputed(model, idx: torch.Tensor) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(loss, gradients by name) of one forward + backward keeping activations, then recomputing each block
    (model.checkpoint_blocks): what the CPU and GPU checkpointing tests compare."""
    results = []
    for recompute in (False, True):
        model.checkpoint_blocks = recompute
        model.zero_grad(set_to_none=True)
        out = model(idx, idx)
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
    return results


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    cfg = model_cfg(
        "model.attention.heads=0", "model.attention.experts=2", "model.attention.heads_per_expert=2"
    )
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    (loss_ref, grads_ref), (loss, grads) = kept_and_recomputed(model, idx)
    assert grads.keys() == grads_ref.keys() == {n for n, _ in model.named_parameters()}
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)
    with torch.no_grad():  # generation with a cache never recomputes
        model(idx[:, :4], cache=model.new_cache(2))
