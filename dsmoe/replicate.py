"""DS-MoE's result table in miniature (papers/dsmoe.md): the model variants, their recipe, and the sweeps.

At each scale we train, on the same tokens, schedule and seed:
  dense          a plain decoder: GQA attention and a dense GeLU MLP
  smoe           the sparse-trained MoE baseline at the same total size: same attention as dense, MLP split
                 into N experts, each token trains its top K (Switch load-balancing loss, no MI loss)
  smoe_2x        the same SMoE with 2N experts: about twice the MLP parameters, the same active ones
  dsmoe          DS-MoE: MoA attention and N MLP experts, dense training, MI loss at the paper's weights
  dsmoe_alpha0   the same without the MI loss
  dsmoe_alpha2x  the same at twice the paper's MI weights
Dense, SMoE and DS-MoE have the same total parameters up to the routers: an MoA layer of E experts x h
query heads sharing the K/V heads holds exactly the weights of GQA with E*h query heads and the same K/V
heads, and N experts of width w hold those of one MLP of width N*w.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsmoe.model import Routing, RoutingRule

# The paper's MI-loss weights for DS-MoE-1B (the config defaults): MoA layers, MLP layers.
PAPER_ALPHA = {"attention": 3.5e-4, "mlp": 6.3e-4}

VARIANTS = ("dense", "smoe", "smoe_2x", "dsmoe", "dsmoe_alpha0", "dsmoe_alpha2x")
RUN_ORDER = ("dense", "dsmoe", "smoe", "dsmoe_alpha0", "smoe_2x", "dsmoe_alpha2x")
LABELS = {
    "dense": "Dense",
    "smoe": "SMoE",
    "smoe_2x": "SMoE-2x",
    "dsmoe": "DS-MoE",
    "dsmoe_alpha0": "DS-MoE, alpha 0",
    "dsmoe_alpha2x": "DS-MoE, alpha x2",
}
ALPHA_SCALE = {"dsmoe": 1.0, "dsmoe_alpha0": 0.0, "dsmoe_alpha2x": 2.0}

# Threshold sweep, on N * p_i (the paper's normalised rule; its utilisation analysis uses 0.48).
THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.48, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0)
TARGET_MLP_ACTIVE = 0.45  # the paper's claim: near-dense quality with <= 45% of the MLP experts computed


@dataclass(frozen=True)
class Scale:
    name: str
    d_model: int
    n_layers: int
    attention_experts: int
    heads_per_expert: int
    kv_heads: int
    num_experts: int
    expert_hidden: int
    smoe_top_k: int
    """Experts per token of the SMoE baselines: a quarter of N, near DS-MoE's operating point."""
    seq_len: int
    global_batch_size: int
    micro_batch_size: int
    train_tokens: int
    lr: float
    vocab_size: int = 8192

    @property
    def steps(self) -> int:
        return max(1, self.train_tokens // (self.global_batch_size * self.seq_len))


SCALES = {
    # CPU smoke test of the whole pipeline (seconds per run)
    "tiny": Scale("tiny", 64, 2, 2, 2, 2, 4, 32, 1, 32, 8, 8, 8 * 32 * 6, 3e-3, 512),
    # ~27M total (5M of it embedding): d 512, 8 layers, 8 query heads of 64 in 4 MoA experts, 16 experts x 128
    "25m": Scale("25m", 512, 8, 4, 2, 2, 16, 128, 4, 512, 64, 64, 12_000_000, 1.5e-3),
    # ~104M total: d 768, 16 layers, 12 query heads in 6 MoA experts, 32 experts x 96
    "100m": Scale("100m", 768, 16, 6, 2, 2, 32, 96, 8, 512, 64, 64, 12_000_000, 8e-4),
}


def overrides(scale: Scale, variant: str) -> list[str]:
    """Config overrides (over configs/tiny.yaml) for one variant at one scale; data and run dir come apart."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    heads = scale.attention_experts * scale.heads_per_expert
    common = [
        f"model.d_model={scale.d_model}",
        f"model.n_layers={scale.n_layers}",
        f"model.max_seq_len={scale.seq_len}",
        f"model.attention.kv_heads={scale.kv_heads}",
        f"model.moe.expert_hidden={scale.expert_hidden}",
        "model.moe.activation=gelu",
        f"data.seq_len={scale.seq_len}",
        f"train.global_batch_size={scale.global_batch_size}",
        f"train.micro_batch_size={scale.micro_batch_size}",
        f"train.max_steps={scale.steps}",
        f"train.warmup_steps={max(1, scale.steps // 10)}",
        f"train.lr={scale.lr}",
        f"train.checkpoint_every={max(1, scale.steps // 4)}",  # a killed slice loses at most a quarter
        "train.keep_checkpoints=1",
        "train.export_at_end=false",
        "train.progress=false",
    ]
    plain_attention = ["model.attention.experts=0", f"model.attention.heads={heads}"]
    moa = [
        "model.attention.heads=0",
        f"model.attention.experts={scale.attention_experts}",
        f"model.attention.heads_per_expert={scale.heads_per_expert}",
    ]
    if variant == "dense":
        return common + plain_attention + ["model.mlp=dense", f"model.moe.num_experts={scale.num_experts}"]
    if variant.startswith("smoe"):
        n = scale.num_experts * (2 if variant == "smoe_2x" else 1)
        return (
            common
            + plain_attention
            + [
                "model.mlp=moe",
                "model.moe.training=sparse",
                f"model.moe.num_experts={n}",
                f"model.moe.train_top_k={scale.smoe_top_k}",
                "model.moe.alpha=0",  # the SMoE balances with the Switch loss alone
            ]
        )
    a = ALPHA_SCALE[variant]
    return (
        common
        + moa
        + [
            "model.mlp=moe",
            "model.moe.training=dense",
            f"model.moe.num_experts={scale.num_experts}",
            f"model.moe.alpha={PAPER_ALPHA['mlp'] * a:g}",
            f"model.attention.alpha={PAPER_ALPHA['attention'] * a:g}",
        ]
    )


def top_k_values(num_experts: int) -> list[int]:
    """K for the top-K sweep: every K up to 16 experts, then a geometric-ish set up to N."""
    if num_experts <= 16:
        return list(range(1, num_experts + 1))
    ks = {1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, num_experts}
    return sorted(k for k in ks if k <= num_experts)


def sweep(num_experts: int) -> list[tuple[str, Routing]]:
    """The sparsity curve's rules: top-K on the MLP only (the paper keeps every attention expert there), and
    the threshold rule on MLP and MoA together (as in the paper's main table)."""
    rules = [(f"top_k={k}", Routing(mlp=RoutingRule("top_k", k=k))) for k in top_k_values(num_experts)]
    rules += [
        (f"threshold={eps:g}", Routing(RoutingRule("threshold", eps=eps), RoutingRule("threshold", eps=eps)))
        for eps in THRESHOLDS
    ]
    return rules


def operating_point(points: list[dict]) -> dict | None:
    """The threshold point that computes the most MLP experts while staying within TARGET_MLP_ACTIVE (the
    smallest threshold that is sparse enough): chosen by the active share, never by perplexity."""
    ok = [p for p in points if p["rule"].startswith("threshold") and p["mlp_active"] <= TARGET_MLP_ACTIVE]
    return max(ok, key=lambda p: p["mlp_active"]) if ok else None


def curve_tokens(vals: dict[str, np.ndarray], per_domain: int) -> np.ndarray:
    """The first `per_domain` held-out tokens of every domain: the sweep sees each domain equally."""
    return np.concatenate([v[:per_domain] for _, v in sorted(vals.items())])
