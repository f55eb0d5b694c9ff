"""MSG growth (papers/msg.md): every operator, alone and two at once, preserves the function at c = 0 with
large random new weights; c = 1 then finish() is the plain grown model; old values move unchanged."""

from __future__ import annotations

import pytest
import torch

from dsmoe import config as config_lib
from dsmoe import growth
from dsmoe.model import build

BASE = [
    "model.vocab_size=97",
    "model.d_model=32",
    "model.n_layers=2",
    "model.max_seq_len=16",
    "data.seq_len=16",
    "model.attention.kv_heads=2",
    "model.moe.num_experts=3",
    "model.moe.expert_hidden=8",
]
BACKBONES = {
    "dsmoe_moa_gelu": [
        "model.attention.heads=0",
        "model.attention.experts=2",
        "model.attention.heads_per_expert=2",
        "model.moe.activation=gelu",
    ],
    "dense_swiglu": [
        "model.mlp=dense",
        "model.attention.experts=0",
        "model.attention.heads=4",
        "model.moe.activation=swiglu",
    ],
    "dsmoe_swiglu": ["model.attention.experts=0", "model.attention.heads=4", "model.moe.activation=swiglu"],
}
BIG = 1.0  # new weights 50x the usual init: preservation must not depend on them


def small_model(backbone: str):
    torch.manual_seed(0)
    cfg = config_lib.load(None, BASE + BACKBONES[backbone])
    model = build(cfg.model).double()  # fp64: the comparison sees the operators, not rounding
    model.eval()
    return model


def outputs(model, idx):
    with torch.no_grad():
        out = model(idx, idx.roll(-1, 1))
    return out.logits, out.loss


OPS = {
    "ffn": lambda m: (
        growth.grow_ffn(m, m.cfg.moe.expert_hidden * (2 if m.cfg.mlp == "moe" else 3) + 4, BIG)
        if m.cfg.mlp == "moe"
        else growth.grow_ffn(m, m.cfg.ffn_hidden + 6, BIG)
    ),
    "experts": lambda m: growth.grow_experts(m, m.cfg.moe.num_experts + 2, init_std=BIG),
    "attention_experts": lambda m: growth.grow_experts(
        m, m.cfg.attention.experts + 1, attention=True, init_std=BIG
    ),
    "heads": lambda m: growth.grow_heads(m, 6, BIG),  # 4 heads over 2 K/V heads -> 6 over 3
    "layers_stack": lambda m: growth.grow_layers(m, 4, "stack", BIG),
    "layers_interleave": lambda m: growth.grow_layers(m, 3, "interleave", BIG),
    "hidden": lambda m: growth.grow_hidden(m, 48, BIG),
}


def applicable(op: str, backbone: str) -> bool:
    if op == "experts":
        return backbone != "dense_swiglu"
    if op == "attention_experts":
        return backbone == "dsmoe_moa_gelu"
    if op == "heads":
        return backbone != "dsmoe_moa_gelu"
    return True


CASES = [(op, b) for op in OPS for b in BACKBONES if applicable(op, b)]
PAIRS = [
    ("ffn", "hidden"),
    ("heads", "hidden"),
    ("layers_stack", "experts"),
    ("hidden", "attention_experts"),
    ("experts", "ffn"),
]


@pytest.mark.parametrize("op,backbone", CASES)
def test_each_operator_preserves_the_function(op, backbone):
    model = small_model(backbone)
    idx = torch.randint(0, 97, (2, 12))
    logits, loss = outputs(model, idx)
    params_before = sum(p.numel() for p in model.parameters())
    g = OPS[op](model)
    assert sum(p.numel() for p in model.parameters()) > params_before
    grown_logits, grown_loss = outputs(model, idx)
    assert (grown_logits - logits).abs().max() <= 1e-6
    assert abs(grown_loss - loss) <= 1e-6  # the MI losses of new parts are masked too

    # Old values sit where the transfers say; new parameters have none.
    old = dict(small_model(backbone).named_parameters())
    for name, p in model.named_parameters():
        t = g.transfers.get(name)
        if t is None:
            continue
        kept = p.detach() if t.dim is None else p.detach().index_select(t.dim, t.index)
        torch.testing.assert_close(kept, old[t.old_name].detach(), rtol=0, atol=0)

    # Half-way the model differs; at c = 1 removing the masks changes nothing; the result is a plain model.
    g.set_c(0.5)
    assert (outputs(model, idx)[0] - logits).abs().max() > 1e-4
    g.set_c(1.0)
    at_one, _ = outputs(model, idx)
    g.finish()
    finished, _ = outputs(model, idx)
    assert (finished - at_one).abs().max() <= 1e-9
    rebuilt = build(model.cfg).double()
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    assert (outputs(rebuilt, idx)[0] - finished).abs().max() <= 1e-9  # cfg describes the grown shapes


@pytest.mark.parametrize("first,second", PAIRS)
def test_two_operators_at_once_preserve_the_function(first, second):
    model = small_model("dense_swiglu" if "heads" in (first, second) else "dsmoe_moa_gelu")
    idx = torch.randint(0, 97, (2, 12))
    logits, loss = outputs(model, idx)
    OPS[first](model)
    OPS[second](model)
    grown_logits, grown_loss = outputs(model, idx)
    assert (grown_logits - logits).abs().max() <= 1e-6 and abs(grown_loss - loss) <= 1e-6


@pytest.mark.parametrize("op", OPS)
def test_fp32_preservation_bound(op):
    """The issue's bound in fp32: max |logit difference| <= 1e-6 right after growth."""
    torch.manual_seed(0)
    backbone = "dsmoe_swiglu" if op == "heads" else "dsmoe_moa_gelu"
    model = build(config_lib.load(None, BASE + BACKBONES[backbone]).model).eval()
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        before = model(idx).logits
        OPS[op](model)
        after = model(idx).logits
    assert (after - before).abs().max() <= 1e-6


def test_ramp_is_linear_and_gradients_reach_new_weights():
    assert [growth.ramp(s, 10, 4) for s in range(9, 16)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    model = small_model("dsmoe_moa_gelu")
    model.train()
    g = growth.grow_layers(model, 3, "stack", BIG)
    g.set_c(0.25)
    idx = torch.randint(0, 97, (2, 12))
    model(idx, idx).loss.backward()
    assert model.blocks[2].mlp.w_in.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="c = 1"):
        g.finish()


@pytest.mark.parametrize("op", ["ffn", "experts", "attention_experts", "layers_interleave", "hidden"])
def test_old_optimizer_moments_survive_growth_unchanged(op):
    """Adam state after one step, carried through growth: old slices equal, new entries start at zero."""
    model = small_model("dsmoe_moa_gelu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 97, (2, 12))
    model(idx, idx).loss.backward()
    optimizer.step()
    names = {id(p): n for n, p in model.named_parameters()}
    exp_avg = {names[id(p)]: s["exp_avg"].clone() for p, s in optimizer.state.items()}
    g = OPS[op](model)
    carried = growth.carry_state(g, exp_avg)
    assert set(carried) == {n for n, _ in model.named_parameters()}
    new_entries = 0
    for name, p in model.named_parameters():
        assert carried[name].shape == p.shape
        t = g.transfers.get(name)
        if t is None:
            assert carried[name].abs().sum() == 0  # a new parameter starts fresh
            new_entries += p.numel()
            continue
        old = exp_avg[t.old_name].float()
        kept = carried[name] if t.dim is None else carried[name].index_select(t.dim, t.index)
        torch.testing.assert_close(kept, old, rtol=0, atol=0)
        new_entries += p.numel() - old.numel()
    grown_numel = sum(p.numel() for p in model.parameters())
    assert new_entries == grown_numel - sum(v.numel() for v in exp_avg.values())


def test_new_experts_at_c0_give_finite_gradients():
    """A new expert's probability is exactly 0 at c = 0; the MI loss's entropy must still differentiate."""
    model = small_model("dsmoe_moa_gelu")
    model.train()
    growth.grow_experts(model, 5, init_std=BIG)
    growth.grow_experts(model, 3, attention=True, init_std=BIG)
    idx = torch.randint(0, 97, (2, 12))
    model(idx, idx).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
