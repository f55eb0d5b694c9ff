"""Dense -> DS-MoE upcycling that keeps the dense model's function exactly.

A dense MLP of width W = N x F is N experts of width F: expert e takes rows e*F..(e+1)*F of the first
projection (of the gate and the up halves separately under SwiGLU) and the same columns of the second.
DS-MoE weights expert e's output by its router probability p_e; a zero router gives p_e = 1/N for every
token, so the second projection is scaled by N and the layer's output is the dense one. Attention becomes
MoA the same way: experts are groups of consecutive query heads, the output projection is scaled by the
number of attention experts. Training then continues from there (the MI loss and the LM loss move the
routers away from uniform).

Sources: a dense dsmoe model (an export, or a run directory's latest checkpoint) or a transformers
Llama-style checkpoint on disk (Llama, Mistral, Qwen3: pre-norm RMSNorm, RoPE, grouped-query
attention without biases, SwiGLU MLP), read from its safetensors files with no download.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from dsmoe import config as config_lib
from dsmoe.model import DecoderLM, build

LLAMA_STYLE = ("llama", "mistral", "qwen3")


class UpcycleError(ValueError):
    """The source cannot be upcycled as asked (architecture, shapes, divisibility)."""


def moe_config(dense: config_lib.ModelConfig, experts: int, attention_experts: int) -> config_lib.ModelConfig:
    """The DS-MoE config of the same shapes: the dense width split into `experts` experts, the query heads
    into `attention_experts` MoA experts (0: keep plain attention)."""
    if dense.mlp != "dense":
        raise UpcycleError("the source model already has DS-MoE MLPs (model.mlp is 'moe')")
    if dense.attention.experts and attention_experts:
        raise UpcycleError("the source model already has MoA attention")
    width = dense.ffn_hidden
    if experts < 1 or width % experts:
        raise UpcycleError(f"the dense MLP width {width} does not split into {experts} experts")
    heads = dense.attention.num_heads
    if attention_experts and heads % attention_experts:
        raise UpcycleError(f"{heads} query heads do not split into {attention_experts} attention experts")
    cfg = copy.deepcopy(dense)
    cfg.mlp = "moe"
    cfg.moe.num_experts, cfg.moe.expert_hidden = experts, width // experts
    if attention_experts:
        cfg.attention.kv_heads = dense.attention.num_kv_heads
        cfg.attention.heads, cfg.attention.experts = 0, attention_experts
        cfg.attention.heads_per_expert = heads // attention_experts
    return cfg


def upcycle_state_dict(dense_sd: dict, dense: config_lib.ModelConfig, cfg: config_lib.ModelConfig) -> dict:
    """The DS-MoE state dict (for `cfg` from moe_config) with the dense model's function."""
    n, f, swiglu = cfg.moe.num_experts, cfg.moe.expert_hidden, cfg.moe.activation == "swiglu"
    sd = {}
    for name, t in dense_sd.items():
        if name.endswith("mlp.w_in.weight"):  # (W or 2W, D) -> (N, F or 2F, D)
            halves = t.chunk(2) if swiglu else (t,)
            sd[name.removesuffix(".weight")] = torch.cat([h.reshape(n, f, -1) for h in halves], dim=1)
        elif name.endswith("mlp.w_out.weight"):  # (D, W) -> (N, F, D), times N against p_e = 1/N
            sd[name.removesuffix(".weight")] = t.T.reshape(n, f, -1) * n
        elif name.endswith("attn.o_proj.weight") and cfg.attention.experts and not dense.attention.experts:
            sd[name] = t * cfg.attention.experts  # every head's output is weighted by p = 1/E
        else:
            sd[name] = t
    for i in range(cfg.n_layers):  # zero routers: uniform probabilities
        sd[f"blocks.{i}.mlp.router.weight"] = torch.zeros(
            n, cfg.d_model, dtype=dense_sd["embed.weight"].dtype
        )
        if cfg.attention.experts and not dense.attention.experts:
            sd[f"blocks.{i}.attn.router.weight"] = torch.zeros(
                cfg.attention.experts, cfg.d_model, dtype=dense_sd["embed.weight"].dtype
            )
    return sd


def build_upcycled(dense_sd: dict, dense: config_lib.ModelConfig, experts: int, attention_experts: int):
    """(DS-MoE model, its model config) from a dense model's state dict and config."""
    cfg = moe_config(dense, experts, attention_experts)
    model = build(cfg)
    sd = upcycle_state_dict(dense_sd, dense, cfg)
    if cfg.tie_embeddings:
        sd.setdefault("lm_head.weight", sd["embed.weight"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UpcycleError(
            f"the dense weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval(), cfg


# ------------------------------------------------------------------------------ transformers sources


def llama_style_config(hf: dict) -> config_lib.ModelConfig:
    """Our dense ModelConfig for a transformers Llama-style config.json (refusing what we cannot express)."""
    kind = hf.get("model_type", "?")
    if kind not in LLAMA_STYLE:
        raise UpcycleError(
            f"model_type {kind!r} is not Llama-style ({', '.join(LLAMA_STYLE)}): dsmoe's blocks are pre-norm RMSNorm "
            "with RoPE, bias-free grouped-query attention and a SwiGLU MLP (GPT-2's LayerNorm, learned positions "
            "and biased GeLU MLP do not map onto them)"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise UpcycleError(f"hidden_act {hf['hidden_act']!r}: only SwiGLU (silu) MLPs map onto ours")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UpcycleError(f"{kind}: attention or MLP biases have no place in dsmoe's bias-free projections")
    if hf.get("rope_scaling"):
        raise UpcycleError(f"rope_scaling {hf['rope_scaling']} is not supported (plain RoPE only)")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise UpcycleError(f"head_dim {head_dim} x {heads} heads != hidden_size {d}: dsmoe needs them equal")
    cfg = config_lib.ModelConfig()
    cfg.d_model, cfg.n_layers, cfg.vocab_size = d, hf["num_hidden_layers"], hf["vocab_size"]
    cfg.max_seq_len = hf.get("max_position_embeddings", cfg.max_seq_len)
    cfg.norm_eps = hf.get("rms_norm_eps", 1e-6)
    cfg.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    cfg.mlp = "dense"
    cfg.moe.activation = "swiglu"
    cfg.moe.num_experts, cfg.moe.expert_hidden = 1, hf["intermediate_size"]  # dense width = 1 x intermediate
    a = cfg.attention
    a.heads, a.experts, a.kv_heads = heads, 0, hf.get("num_key_value_heads", heads)
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    a.rope_theta = float(rope)
    a.qk_norm = kind == "qwen3"
    return cfg


def llama_style_state_dict(path: Path, cfg: config_lib.ModelConfig) -> dict:
    """Our dense DecoderLM's state dict from a Llama-style checkpoint's safetensors files."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UpcycleError(f"{path} holds no *.safetensors weights (save the model with safe_serialization)")
    hf = {}
    for file in files:
        hf.update(load_file(str(file)))
    hf = {k.removeprefix("model."): v.float() for k, v in hf.items()}
    sd = {"embed.weight": hf.pop("embed_tokens.weight"), "final_norm.weight": hf.pop("norm.weight")}
    if "lm_head.weight" in hf:
        sd["lm_head.weight"] = hf.pop("lm_head.weight")
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        sd[q + "attn_norm.weight"] = hf.pop(p + "input_layernorm.weight")
        sd[q + "mlp_norm.weight"] = hf.pop(p + "post_attention_layernorm.weight")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[q + f"attn.{proj}.weight"] = hf.pop(p + f"self_attn.{proj}.weight")
        if cfg.attention.qk_norm:
            sd[q + "attn.q_norm.weight"] = hf.pop(p + "self_attn.q_norm.weight")
            sd[q + "attn.k_norm.weight"] = hf.pop(p + "self_attn.k_norm.weight")
        gate, up = hf.pop(p + "mlp.gate_proj.weight"), hf.pop(p + "mlp.up_proj.weight")
        sd[q + "mlp.w_in.weight"] = torch.cat([gate, up])
        sd[q + "mlp.w_out.weight"] = hf.pop(p + "mlp.down_proj.weight")
    leftover = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise UpcycleError(f"{path}: weights dsmoe has no place for: {leftover[:8]}")
    return sd


def load_dense(source: str | Path) -> tuple[dict, config_lib.Config, Path | None]:
    """(state dict, config, tokenizer.json or None) of a dense source: our export, our run, or transformers."""
    from dsmoe.export import is_export, load_export, load_from_run

    path = Path(source)
    if is_export(path):
        model, cfg, _, tokenizer = load_export(path)
        return model.state_dict(), cfg, tokenizer
    if (path / "checkpoints").is_dir():
        model, cfg, tokenizer, _ = load_from_run(path)
        return model.state_dict(), cfg, tokenizer
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UpcycleError(
            f"{path}: not a dsmoe export or run, nor a transformers checkpoint (no config.json)"
        )
    cfg = config_lib.Config()
    cfg.model = llama_style_config(json.loads(config_file.read_text()))
    cfg.data.seq_len = min(cfg.data.seq_len, cfg.model.max_seq_len)
    tokenizer = path / "tokenizer.json"
    return llama_style_state_dict(path, cfg.model), cfg, tokenizer if tokenizer.is_file() else None


def dense_model(sd: dict, model_cfg: config_lib.ModelConfig) -> DecoderLM:
    model = build(model_cfg)
    if model_cfg.tie_embeddings:
        sd = {**sd, "lm_head.weight": sd["embed.weight"]}
    model.load_state_dict(sd)
    return model.eval()
