"""EncoderMLM (MosaicBERT, papers/mosaicbert.md): ALiBi, unpadding, attention backends, GeGLU / DS-MoE,
MLM masking, vocab padding, low-precision LayerNorm, the Base shapes, and what config refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsmoe import config as config_lib
from dsmoe.config import ConfigError
from dsmoe.data.mlm import IGNORE_INDEX, MLMBatches, encoder_vocab_size, eval_batches, special_ids
from dsmoe.data.sampler import PackedSampler
from dsmoe.model import EncoderMLM, Routing, RoutingRule, build
from dsmoe.model.attention import (
    VARLEN_BACKENDS,
    Varlen,
    alibi_bias,
    alibi_slopes,
    flash_attn_varlen,
    plan_attention,
)

ENCODER = [
    "model.backbone=encoder",
    "model.d_model=64",
    "model.n_layers=2",
    "model.max_seq_len=64",
    "model.attention.heads=4",
    "model.attention.experts=0",
    "model.attention.kv_heads=0",
    "model.moe.num_experts=4",
    "model.moe.expert_hidden=32",
    "model.vocab_size=192",
    "data.seq_len=32",
]
FFNS = {
    "geglu": ["model.mlp=dense", "model.moe.activation=geglu"],
    "dsmoe": ["model.mlp=moe", "model.moe.activation=gelu"],
}


def encoder_cfg(*extra: str) -> config_lib.Config:
    return config_lib.load(None, ENCODER + list(extra))


def encoder(*extra: str, seed: int = 0) -> EncoderMLM:
    torch.manual_seed(seed)
    return build(encoder_cfg(*extra).model).eval()


def mixed_batch(B=4, S=24, vocab=180, seed=0):
    """Rows of mixed lengths (one full, one of a single token), right-padded with junk ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (B, S), generator=gen)
    lengths = torch.tensor([S, 1, 13, 7][:B])
    mask = torch.arange(S)[None, :] < lengths[:, None]
    return ids, mask


# ----------------------------------------------------------------------------------------------- ALiBi


@pytest.mark.parametrize("n_heads", [8, 12, 16])
def test_alibi_slopes_follow_the_paper(n_heads):
    expected = {
        8: [2.0**-h for h in range(1, 9)],
        16: [2.0 ** (-h / 2) for h in range(1, 17)],
        # not a power of two: the 8-head slopes, then the first 4 of the 16-head slopes' even entries
        12: [2.0**-h for h in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5],
    }[n_heads]
    torch.testing.assert_close(alibi_slopes(n_heads), torch.tensor(expected), rtol=0, atol=0)


def test_alibi_bias_is_symmetric_with_a_zero_diagonal_and_grows():
    slopes = alibi_slopes(12)
    bias = alibi_bias(slopes, 512)  # built for the batch: any length, past what the model trained at
    assert bias.shape == (12, 512, 512)
    torch.testing.assert_close(bias, bias.transpose(1, 2), rtol=0, atol=0)
    assert bias.diagonal(dim1=1, dim2=2).abs().max() == 0
    assert bias[3, 10, 4] == -slopes[3] * 6
    torch.testing.assert_close(alibi_bias(slopes, 128), bias[:, :128, :128], rtol=0, atol=0)


def test_no_position_parameters_and_extrapolation_past_max_seq_len():
    short, long = encoder("model.max_seq_len=32"), encoder("model.max_seq_len=512")
    names = [n for n, _ in short.named_parameters()]
    assert not any("position" in n or "pos_" in n for n in names), names
    assert short.num_params() == long.num_params()  # no table sized by the length
    ids = torch.randint(180, (2, 128))
    with torch.no_grad():
        logits = short(ids).logits  # 4x the configured max_seq_len
    assert logits.shape == (2, 128, 192) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------ unpadding


def test_varlen_packs_the_real_tokens():
    ids, mask = mixed_batch()
    vl = Varlen.from_mask(mask)
    assert vl.cu_seqlens.dtype == torch.int32 and vl.cu_seqlens.tolist() == [0, 24, 25, 38, 45]
    assert vl.cu_seqlens[-1] == mask.sum() and vl.max_seqlen == 24
    torch.testing.assert_close(vl.unpad(ids), ids[mask])
    torch.testing.assert_close(vl.pad(vl.unpad(ids))[mask], ids[mask])
    assert (vl.pad(vl.unpad(ids))[~mask] == 0).all()


def reference_attention(block, h, bias):
    """Padded attention of one block: (B, S, D) with an ALiBi + key-padding bias (B, H, S, S)."""
    B, S, _ = h.shape
    H, hd = block.attn.n_heads, block.attn.head_dim
    q, k, v = block.attn.qkv_proj(h).view(B, S, 3, H, hd).permute(2, 0, 3, 1, 4)  # (B, H, S, hd) each
    probs = (q @ k.transpose(-1, -2) / math.sqrt(hd) + bias).softmax(-1)
    return block.attn.o_proj((probs @ v).transpose(1, 2).reshape(B, S, H * hd))


def reference_ffn(block, h):
    """GeGLU by its formula, or DS-MoE as the router-weighted sum of every expert's output."""
    if getattr(block.mlp, "routed", False):
        probs = torch.softmax(h @ block.mlp.router.weight.T, -1)
        outs = [block.mlp.expert_forward(h, e) for e in range(block.mlp.num_experts)]
        return sum(probs[..., e : e + 1] * out for e, out in enumerate(outs))
    gate, value = block.mlp.w_in(h).chunk(2, -1)
    return block.mlp.w_out(F.gelu(gate) * value)


def padded_reference(model: EncoderMLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The encoder written the plain padded way from the model's weights: every layer on (B, S, D), attention
    with an ALiBi + key-padding bias; only the logits at real tokens are meaningful."""
    cfg, S = model.cfg, ids.shape[1]
    bias = alibi_bias(alibi_slopes(cfg.attention.num_heads), S)[None]
    bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
    x = model.embed_norm(model.embed(ids))
    for block in model.blocks:
        if cfg.post_norm:
            x = block.attn_norm(x + reference_attention(block, x, bias))
            x = block.mlp_norm(x + reference_ffn(block, x))
        else:
            x = x + reference_attention(block, block.attn_norm(x), bias)
            x = x + reference_ffn(block, block.mlp_norm(x))
    if model.final_norm is not None:
        x = model.final_norm(x)
    return model.lm_head(model.head_norm(F.gelu(model.head_dense(x))))


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("ffn", ["geglu", "dsmoe"])
def test_unpadded_logits_equal_the_padded_reference_and_each_row_alone(norm, ffn):
    model = encoder(*FFNS[ffn], f"model.post_norm={str(norm == 'post').lower()}")
    ids, mask = mixed_batch()
    with torch.no_grad():
        ours = model(ids, mask).logits  # (B, S, V), unpadded inside
        reference = padded_reference(model, ids, mask)
        torch.testing.assert_close(ours[mask], reference[mask], rtol=1e-5, atol=1e-5)
        assert (ours[~mask] == 0).all()
        for b in range(len(ids)):  # padding never reaches a real token: each row alone gives the same
            n = int(mask[b].sum())
            torch.testing.assert_close(ours[b, :n], model(ids[b : b + 1, :n]).logits[0], rtol=1e-5, atol=1e-5)


def test_the_mlm_head_runs_at_masked_positions_only():
    model = encoder(*FFNS["geglu"])
    ids, mask = mixed_batch()
    labels = torch.full_like(ids, IGNORE_INDEX)
    predicted = torch.tensor([[0, 5], [1, 0], [2, 12], [3, 3]])
    labels[predicted[:, 0], predicted[:, 1]] = ids[predicted[:, 0], predicted[:, 1]]
    calls = []
    model.lm_head.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    out = model(ids, mask, labels)
    assert calls == [4] and out.logits.shape == (4, 192) and out.masked_tokens == 4
    full = model(ids, mask).logits[predicted[:, 0], predicted[:, 1]]
    torch.testing.assert_close(out.logits, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.lm_loss, F.cross_entropy(full, labels[labels != IGNORE_INDEX]))


# ------------------------------------------------------------------------------------------- backends


def available_backends() -> list[str]:
    names = ["sdpa", "flex"]  # flex: forward only on CPU (torch has no FlexAttention backward there)
    return names + (["flash"] if flash_attn_varlen() is not None and torch.cuda.is_available() else [])


@pytest.mark.parametrize("backend", available_backends())
def test_every_available_backend_agrees_with_the_reference(backend):
    device = "cuda" if backend == "flash" else "cpu"
    dtype = torch.bfloat16 if backend == "flash" else torch.float32
    _, mask = mixed_batch()
    vl = Varlen.from_mask(mask.to(device))
    T, H, hd = len(vl.indices), 12, 16  # 12 heads: the non-power-of-two slope rule
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(T, H, hd, generator=gen).to(device, dtype) for _ in range(3))
    grad = backend != "flex" or device == "cuda"
    with torch.set_grad_enabled(grad):
        for t in (q, k, v):
            t.requires_grad_(grad)
        reference = VARLEN_BACKENDS["eager"](q, k, v, plan_attention("eager", vl, H, dtype))
        out = VARLEN_BACKENDS[backend](q, k, v, plan_attention(backend, vl, H, dtype))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out, reference, rtol=tol, atol=tol)
    if grad:
        g = torch.randn_like(out)
        ref_grads = torch.autograd.grad(reference, (q, k, v), g)
        for ours, ref in zip(torch.autograd.grad(out, (q, k, v), g), ref_grads, strict=True):
            torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


def test_the_model_gives_the_same_logits_on_every_cpu_backend():
    ids, mask = mixed_batch()
    logits = {}
    for backend in ("eager", "sdpa", "flex"):
        model = encoder(*FFNS["geglu"], f"model.attention.backend={backend}")
        with torch.no_grad():
            logits[backend] = model(ids, mask).logits[mask]
    for backend in ("sdpa", "flex"):
        torch.testing.assert_close(logits[backend], logits["eager"], rtol=1e-5, atol=1e-5)


def test_the_cuda_kernel_options_run_the_torch_paths_on_a_cpu():
    """A GPU run's config (attention 'triton', GeGLU 'triton') loaded on a CPU, as an export is: SDPA and the
    torch GeGLU run, with the logits and the gradients of a model configured for them."""
    ids, mask = mixed_batch()
    labels = torch.where(mask, ids, -100)
    results = []
    for extra in (["model.attention.backend=triton", "model.geglu_kernel=triton"], []):
        model = encoder(*FFNS["geglu"], *extra).train()
        out = model(ids, mask, labels)
        out.loss.backward()
        results.append(
            (out.logits.detach(), model.blocks[0].mlp.w_in.weight.grad, model.attention_backend("cpu"))
        )
    assert (
        type(encoder(*FFNS["geglu"], "model.geglu_kernel=triton").blocks[0].mlp).__name__ == "TritonGeGLUMLP"
    )
    assert results[0][2] == results[1][2] == "sdpa"
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)


def test_flex_refuses_training_on_cpu_with_the_reason():
    model = encoder(*FFNS["geglu"], "model.attention.backend=flex").train()
    with pytest.raises(RuntimeError, match="no FlexAttention backward on CPU"):
        model(*mixed_batch())


# ------------------------------------------------------------------------------------------ FFN, LN


def test_geglu_ffn_is_gelu_gate_times_value():
    model = encoder(*FFNS["geglu"])
    mlp = model.blocks[0].mlp
    assert mlp.w_in.weight.shape == (2 * 128, 64) and mlp.w_out.weight.shape == (64, 128)  # D->2I, I->D
    x = torch.randn(5, 64)
    gate, value = (x @ mlp.w_in.weight.T).chunk(2, -1)
    torch.testing.assert_close(mlp(x)[0], (F.gelu(gate) * value) @ mlp.w_out.weight.T + mlp.w_out.bias)


def test_dsmoe_encoder_with_every_expert_kept_is_the_dense_forward():
    model = encoder(*FFNS["dsmoe"])
    ids, mask = mixed_batch()
    with torch.no_grad():
        dense = model(ids, mask).logits[mask]
        top_all = model(ids, mask, routing=Routing(mlp=RoutingRule("top_k", k=4))).logits[mask]
        top1 = model(ids, mask, routing=Routing(mlp=RoutingRule("top_k", k=1)))
    torch.testing.assert_close(top_all, dense, rtol=1e-5, atol=1e-5)
    assert top1.mlp.active_fraction.mean() == 0.25


@pytest.mark.parametrize("mode", ["autocast", "bf16 weights"])
def test_layernorm_stays_in_bf16(mode):
    model = encoder(*FFNS["geglu"])
    seen = []
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    ids, mask = mixed_batch()
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, mask)
    else:
        model.to(torch.bfloat16)(ids, mask)
    norms = sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert len(seen) == norms == 7  # embedding, 2 per block, final (pre-LN), head
    assert all(out == torch.bfloat16 for _, out in seen), seen
    # under autocast the embedding's output is fp32 (embeddings do not autocast); every other norm's input
    # comes from a bf16 computation and stays bf16
    assert all(inp == torch.bfloat16 for inp, _ in seen[1:]), seen


def test_mosaicbert_base_has_the_papers_shapes_and_size():
    cfg = config_lib.load("configs/mosaicbert_base.yaml")
    cfg.model.vocab_size = encoder_vocab_size(30522)
    assert cfg.model.vocab_size == 30528  # BERT's 30522 (+ mask and pad, already among BERT's ids) -> x64
    with torch.device("meta"):
        model = build(cfg.model)
    m = cfg.model
    assert (m.d_model, m.n_layers, m.attention.num_heads, m.ffn_hidden) == (768, 12, 12, 3072)
    ffn = model.blocks[0].mlp
    assert ffn.w_in.weight.numel() + ffn.w_out.weight.numel() == 3 * 768 * 3072  # GLU: 3 D I
    assert 136e6 < model.num_params() < 138e6, model.num_params()  # the paper: about 137M


# --------------------------------------------------------------------------------------- MLM batches


def test_masking_rates_and_the_80_10_10_rule():
    tokens = np.random.default_rng(0).integers(0, 500, 200_000).astype(np.uint16)
    mlm = config_lib.MLMConfig(probability=0.30, min_seq_len=16)
    batches = MLMBatches(PackedSampler(tokens, 128, seed=3), 500, mlm, seed=3)
    ids, mask, labels = batches.batch(0, 512)
    predicted = labels != IGNORE_INDEX
    assert not (predicted & ~mask).any() and not (mask[:, 1:] & ~mask[:, :-1]).any()  # right-padded
    assert abs(predicted.sum() / mask.sum() - 0.30) < 0.003
    lengths = mask.sum(1)
    assert lengths.min() >= 16 and lengths.max() <= 128 and lengths.float().std() > 20  # mixed lengths
    mask_id, pad_id = special_ids(500)
    assert (ids[~mask] == pad_id).all()
    became_mask = (ids[predicted] == mask_id).float().mean()
    unchanged = (ids[predicted] == labels[predicted]).float().mean()
    assert abs(became_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02
    # a pure function of the sample: another split of the same samples gives the same rows
    again = MLMBatches(PackedSampler(tokens, 128, seed=3), 500, mlm, seed=3).batch(256, 256)
    for a, b in zip(again, (ids[256:], mask[256:], labels[256:]), strict=True):
        assert torch.equal(a, b)

    held_out = eval_batches(tokens, 128, 0.15, 500, max_tokens=65536)
    predicted = torch.cat([lab != IGNORE_INDEX for _, _, lab in held_out])
    assert abs(predicted.float().mean() - 0.15) < 0.003


def test_vocab_is_padded_to_a_multiple_of_64():
    for tokenizer_vocab in (512, 4096, 30522, 50257):
        size = encoder_vocab_size(tokenizer_vocab)
        assert size % 64 == 0 and tokenizer_vocab + 2 <= size < tokenizer_vocab + 2 + 64
    assert encoder(*FFNS["geglu"]).embed.weight.shape[0] % 64 == 0


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, key",
    [
        (ENCODER + ["parallel.ep=2", "model.mlp=moe"], "parallel.ep"),
        (ENCODER + ["parallel.tp=2"], "parallel.tp"),
        (ENCODER + ["model.attention.experts=2", "model.attention.heads=0"], "model.attention.experts"),
        (ENCODER + ["model.mlp=moe", "model.moe.activation=geglu"], "model.moe.activation"),
        (ENCODER + ["mlm.probability=0"], "mlm.probability"),
        (["model.post_norm=true"], "model.post_norm"),
        (["model.attention.backend=flex"], "model.attention.backend"),
        (["model.mlp=dense", "model.moe.activation=geglu"], "model.moe.activation"),
    ],
)
def test_config_refuses_what_the_backbone_does_not_support(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_lib.load(None, overrides)


def test_the_mosaicbert_recipe_from_config():
    from dsmoe.train.schedule import lr_multiplier

    t = config_lib.load("configs/tiny_mlm.yaml").train
    assert (t.schedule, t.adam_eps, t.beta2) == ("linear", 1e-6, 0.98)
    values = [lr_multiplier(step, t) for step in range(t.max_steps)]
    assert values[t.warmup_steps - 1] == 1.0 and values[0] == 1 / t.warmup_steps
    assert math.isclose(values[-1], t.min_lr_ratio)  # 0.02 x peak at the last step
    decay = np.diff(values[t.warmup_steps :])
    assert np.allclose(decay, decay[0])  # a straight line


def test_new_options_leave_decoder_cache_keys_alone():
    key = config_lib.identity(config_lib.load(None))
    assert not any(word in key for word in ("adam_eps", "schedule", "mlm", "post_norm", "dropout"))
    encoder_key = config_lib.identity(config_lib.load("configs/tiny_mlm.yaml"))
    assert '"mlm"' in encoder_key and '"schedule": "linear"' in encoder_key
