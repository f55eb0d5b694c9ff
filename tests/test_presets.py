"""The paper-scale presets: they load, and their parameter counts against the paper's Table 1.

How we count: every parameter of the model, with the (untied) input embedding and LM head left out
("non-embedding"). The paper's dense-1B figure (1017M) is a GQA model counted that way. Its DS-MoE
totals are 2-5% above our non-embedding counts of the same shapes, and no embedding convention closes
the gap for all three sizes (one 50304 x d table would overshoot by 0.7-5.4%); the note on the MoA
issue gives the breakdown.
"""

from __future__ import annotations

import pytest
import torch

from dsmoe import config as config_lib
from dsmoe.model import build

PAPER_TOTAL_M = {"1b": 1067, "3b": 2846, "6b": 6343}


def analytic_non_embedding(cfg: config_lib.ModelConfig) -> int:
    d, a, m = cfg.d_model, cfg.attention, cfg.moe
    hd = d // a.num_heads
    attention = 2 * d * a.num_heads * hd + 2 * d * a.num_kv_heads * hd + d * a.experts  # q, o; k, v; router
    mlp = 2 * m.num_experts * m.expert_hidden * d + d * m.num_experts  # w_in, w_out; router
    return cfg.n_layers * (attention + mlp + 2 * d) + d  # + two RMSNorms per layer, final norm


def non_embedding(cfg: config_lib.ModelConfig) -> int:
    with torch.device("meta"):
        model = build(cfg)
    return model.num_params() - model.embed.weight.numel() - model.lm_head.weight.numel()


@pytest.mark.parametrize("size", ["1b", "3b", "6b"])
def test_preset_loads_and_counts(size):
    cfg = config_lib.load(f"configs/dsmoe_{size}.yaml")
    assert cfg.model.attention.experts > 0 and cfg.model.mlp == "moe"
    counted = non_embedding(cfg.model)
    assert counted == analytic_non_embedding(cfg.model)
    # Our count sits 2-5% under the paper's total for the same shapes (see the module docstring).
    assert 0.95 < counted / (PAPER_TOTAL_M[size] * 1e6) < 0.98


def test_dense_1b_matches_the_papers_count():
    cfg = config_lib.load(
        "configs/dsmoe_1b.yaml",
        ["model.mlp=dense", "model.attention.experts=0", "model.attention.heads=32"],
    )
    assert cfg.model.ffn_hidden == 8192
    assert abs(non_embedding(cfg.model) / 1017e6 - 1) < 0.005


def test_dense_1b_config_is_dsmoe_1b_without_routers():
    dense = config_lib.load("configs/dense_1b.yaml").model
    moe = config_lib.load("configs/dsmoe_1b.yaml").model
    assert (dense.mlp, dense.attention.experts, dense.ffn_hidden) == ("dense", 0, moe.ffn_hidden)
    assert (dense.attention.num_heads, dense.attention.num_kv_heads, dense.head_dim) == (
        moe.attention.num_heads,
        moe.attention.num_kv_heads,
        moe.head_dim,
    )
    assert (dense.d_model, dense.n_layers, dense.vocab_size) == (moe.d_model, moe.n_layers, moe.vocab_size)
    assert abs(non_embedding(dense) / 1017e6 - 1) < 0.005
