"""The model's configuration: plain dataclasses that depend on nothing but the standard library.

They live beside the model, not in dsmoe/config.py (which loads YAML through OmegaConf and checks a whole
run's settings), so that the model package imports only torch: an export carries these files as transformers
remote code (dsmoe/remote_code.py), loadable where dsmoe is not installed. dsmoe.config re-exports them as the
`model` section of a run's config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(kw_only=True)
class AttentionConfig:
    heads: int = 0
    """Query heads per layer; head_dim = model.d_model / heads. 0: experts x heads_per_expert (MoA)."""
    kv_heads: int = 0
    """Key/value heads (grouped-query attention), shared by all attention experts; 0: as many as heads."""
    experts: int = 0
    """Mixture of attention heads (MoA, papers/dsmoe.md): 0 is plain attention; N > 0 makes N experts, each
    owning heads_per_expert query heads and its slice of the output projection, all sharing K/V."""
    heads_per_expert: int = 1
    """Query heads of one attention expert (DS-MoE-1B: 2; 3B and 6B: 4)."""
    head_dim: int = 0
    """Width of one head; 0: model.d_model / query heads. Set it when heads x head_dim != d_model (Qwen3;
    a model whose hidden size grew while its heads kept their width)."""
    alpha: float = 3.5e-4
    """Weight of the mutual-information loss of MoA layers (paper, DS-MoE-1B: 3.5e-4)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    qk_norm: bool = False
    """RMSNorm over head_dim on queries and keys before RoPE (Qwen3's QK-norm)."""
    backend: str = "auto"
    """'sdpa' (PyTorch scaled_dot_product_attention), 'eager' (plain reference), or 'auto' (sdpa). The
    decoder also takes 'flash4' (FlashAttention-4, flash-attn-4's CuTeDSL kernels: CUDA, Hopper or newer,
    bf16; benchmarks/bench_layers.py times it beside SDPA's kernels). The encoder also takes 'flash'
    (flash-attn varlen with ALiBi slopes), 'flex' (FlexAttention with an ALiBi
    score_mod and a document mask) and 'triton' (our varlen ALiBi kernels, dsmoe/model/alibi_triton.py, on
    CUDA; SDPA on other devices); its 'auto' takes flash-attn when installed, else our Triton kernels on CUDA
    (FlexAttention where triton is missing), else SDPA (dsmoe.model.attention.resolve_backend)."""

    @property
    def num_heads(self) -> int:
        return self.heads or self.experts * self.heads_per_expert

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads or self.num_heads


@dataclass(kw_only=True)
class MoEConfig:
    num_experts: int = 8
    """N: experts per MLP layer; the router is a softmax over all of them (papers/dsmoe.md)."""
    expert_hidden: int = 128
    """Hidden width of one expert; the MLP's total width is num_experts * expert_hidden."""
    activation: Literal["gelu", "swiglu", "geglu"] = "gelu"
    """Expert activation: GeLU as in the paper, SwiGLU as an option. 'geglu' (GELU(gate) * value,
    MosaicBERT's FFN) is the encoder's dense FFN (model.mlp: dense)."""
    alpha: float = 6.3e-4
    """Weight of the mutual-information loss for MLP layers (paper, DS-MoE-1B: 6.3e-4)."""
    training: Literal["dense", "sparse"] = "dense"
    """'dense': DS-MoE (every expert trains on every token); 'sparse': the sparse-trained MoE baseline
    (SMoE): each token trains only its top `train_top_k` experts, with the Switch load-balancing loss."""
    train_top_k: int = 2
    """Experts per token when training sparse (dropless: no capacity limit)."""
    train_renormalize: bool = True
    """Sparse training: weight the K selected experts by their probabilities renormalised to sum to 1
    (Mixtral's gate). False keeps the raw probabilities (DS-MoE's inference rule), which scales the MLP
    output by about K/N while the router is still uniform."""
    balance_alpha: float = 0.01
    """Weight of the Switch load-balancing loss when training sparse (Fedus et al. 2021)."""


@dataclass(kw_only=True)
class ModelConfig:
    backbone: Literal["decoder", "encoder"] = "decoder"
    """'decoder': causal LM (DecoderLM); 'encoder': MosaicBERT-style masked LM (EncoderMLM: ALiBi, unpadded,
    bidirectional; papers/mosaicbert.md)."""
    d_model: int = 256
    n_layers: int = 4
    vocab_size: int = 0
    """0: take the tokenizer's vocabulary, padded up to a multiple of 64 (matmul-friendly)."""
    max_seq_len: int = 256
    mlp: Literal["moe", "dense"] = "moe"
    """'moe': DS-MoE layers; 'dense': a plain MLP of the same total width (num_experts * expert_hidden)."""
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    post_norm: bool = False
    """Encoder: BERT's post-LN, x = LN(x + f(x)) (MosaicBERT); false: pre-LN with a final norm. The decoder
    is always pre-norm."""
    dropout: float = 0.0
    """Encoder: dropout on the embeddings and on each sublayer's output (BERT: 0.1). Attention-probability
    dropout is always 0: the fused kernels (flash-attn with ALiBi) need it off (papers/mosaicbert.md)."""
    geglu_kernel: Literal["torch", "triton"] = "torch"
    """Encoder, dense GeGLU FFN: 'torch' (GELU(gate) * value in torch ops, fused by torch.compile) or
    'triton' (one fused Triton kernel each way, dsmoe/model/alibi_triton.py) on CUDA, the torch ops
    elsewhere."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim or self.d_model // self.attention.num_heads

    @property
    def is_encoder(self) -> bool:
        return self.backbone == "encoder"

    @property
    def ffn_hidden(self) -> int:
        """Total MLP width; a dense MLP uses the same width as all experts together."""
        return self.moe.num_experts * self.moe.expert_hidden


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from its dict (an export's config.json, `dsmoe.model`); keys it does not know are an error."""
    nested = {"attention": AttentionConfig, "moe": MoEConfig}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"model config: unknown keys {unknown}")
    values = {k: (nested[k](**v) if k in nested else v) for k, v in data.items()}
    return ModelConfig(**values)
