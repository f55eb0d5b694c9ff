"""NTNG's efficient-training methods (papers/no_train_no_gain.md): stacking, layer dropping, selective
backprop, RHO-loss, and the Lion and Sophia-G updates against their reference formulas."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import AttentionConfig, ModelConfig, MoEConfig
from dsmoe.model import build
from dsmoe.model.attention import rope_cos_sin
from dsmoe.model.moe import TRAINING
from dsmoe.train.methods import (
    LayerDropSchedule,
    per_sequence_loss,
    reducible_loss,
    release_dropped_grads,
    rho_select,
    run_blocks,
    sample_active_layers,
    select_highest,
    selective_backprop,
    stack_layers,
    stack_state,
    stacked_layers_at,
)
from dsmoe.train.optim import Lion, SophiaG, sample_gnb_targets


def tiny_model(mlp: str = "moe", layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        d_model=32,
        n_layers=layers,
        vocab_size=64,
        max_seq_len=16,
        mlp=mlp,
        attention=AttentionConfig(heads=0, experts=2, heads_per_expert=2, kv_heads=2),
        moe=MoEConfig(num_experts=2, expert_hidden=16),
    )
    return build(cfg)


def hidden_after_blocks(model, idx: torch.Tensor, blocks) -> torch.Tensor:
    x = model.embed(idx)
    T = idx.shape[1]
    cos, sin = rope_cos_sin(T, model.cfg.head_dim, model.cfg.attention.rope_theta, x.device)
    for block in blocks:
        x = block(x, cos, sin, TRAINING)[0]
    return x


# --- Layer stacking -------------------------------------------------------------------------------------


def test_stacking_copies_each_block_exactly_and_runs_the_old_stack_twice():
    model = tiny_model(layers=3)
    old = copy.deepcopy(model)
    sources = stack_layers(model)
    assert sources == [0, 1, 2, 0, 1, 2] and len(model.blocks) == 6 and model.cfg.n_layers == 6
    torch.manual_seed(1)
    x = torch.randn(2, 8, 32)
    cos, sin = rope_cos_sin(8, model.cfg.head_dim, model.cfg.attention.rope_theta, x.device)
    with torch.no_grad():
        # The definition we preserve: each copied block is its source's function, bit for bit ...
        for new, source in enumerate(sources):
            assert torch.equal(
                model.blocks[new](x, cos, sin, TRAINING)[0], old.blocks[source](x, cos, sin, TRAINING)[0]
            )
        # ... so the stacked model's hidden state is the old stack applied twice.
        idx = torch.randint(0, 64, (2, 8))
        twice = hidden_after_blocks(old, idx, list(old.blocks) + list(old.blocks))
        torch.testing.assert_close(hidden_after_blocks(model, idx, model.blocks), twice, rtol=0, atol=0)
        torch.testing.assert_close(
            model(idx).logits, old.lm_head(old.final_norm(twice)), rtol=0, atol=0
        )  # embedding, norm and head untouched
    # The copies are separate parameters: training one does not move its source.
    names = dict(model.named_parameters())
    assert names["blocks.3.attn.q_proj.weight"] is not names["blocks.0.attn.q_proj.weight"]
    model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))).loss.backward()
    with torch.no_grad():
        names["blocks.3.attn.q_proj.weight"].add_(1.0)
    assert torch.equal(names["blocks.0.attn.q_proj.weight"], old.blocks[0].attn.q_proj.weight)


def test_stacked_optimizer_state_copies_the_sources_moments():
    model = tiny_model(layers=2)
    state = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    state.update({f"exp_avg/{name}": torch.randn_like(p) for name, p in model.named_parameters()})
    stacked = stack_state(state, old_layers=2)
    stack_layers(model)
    assert set(stacked) == {n for n, _ in model.named_parameters()} | {
        f"exp_avg/{n}" for n, _ in model.named_parameters()
    }
    assert torch.equal(stacked["exp_avg/blocks.3.mlp.w_in"], state["exp_avg/blocks.1.mlp.w_in"])
    assert torch.equal(stacked["blocks.2.attn_norm.weight"], state["blocks.0.attn_norm.weight"])
    assert torch.equal(stacked["embed.weight"], state["embed.weight"])


def test_stacking_schedule_doubles_at_the_configured_fractions():
    assert [stacked_layers_at(f, 8, [0.25, 0.5]) for f in (0.0, 0.24, 0.25, 0.49, 0.5, 1.0)] == [
        2,
        2,
        4,
        4,
        8,
        8,
    ]
    with pytest.raises(ValueError, match="halved"):
        stacked_layers_at(0.0, 6, [0.2, 0.4])


# --- Layer dropping -------------------------------------------------------------------------------------


def test_layer_drop_schedule_is_progressive_and_deeper_blocks_drop_more():
    s = LayerDropSchedule(theta_bar=0.5, gamma=100.0)
    assert s.keep_probs(0.0, 4) == [1.0] * 4  # nothing dropped at the start
    late = s.keep_probs(1.0, 4)
    assert late == pytest.approx([1 - 0.5 * (i + 1) / 4 for i in range(4)])  # theta -> theta_bar
    mid = s.keep_probs(0.01, 4)
    theta = 0.5 + 0.5 * math.exp(-1.0)
    assert mid == pytest.approx([1 - (1 - theta) * (i + 1) / 4 for i in range(4)])
    assert all(a > b for a, b in zip(mid, mid[1:], strict=False))
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        for i in sample_active_layers(late, g):
            counts[i] += 1
    torch.testing.assert_close(counts / 4000, torch.tensor(late), atol=0.03, rtol=0)


def test_a_dropped_block_is_skipped_in_forward_and_gets_no_gradient():
    model = tiny_model(layers=3)
    idx, targets = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    with run_blocks(model, [0, 2]) as m:
        out = m(idx, targets)
    assert len(model.blocks) == 3  # restored for everything outside the forward
    expected = model.lm_head(
        model.final_norm(hidden_after_blocks(model, idx, [model.blocks[0], model.blocks[2]]))
    )
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    assert out.mlp.expert_load.shape[0] == 2  # routing statistics of the blocks that ran
    out.loss.backward()
    assert all(p.grad is None for p in model.blocks[1].parameters())
    assert all(p.grad is not None for i in (0, 2) for p in model.blocks[i].parameters())
    with pytest.raises(ValueError, match="out of range"), run_blocks(model, [3]):
        pass


# --- Selective backprop and RHO-loss --------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_selective_backprop_backpropagates_exactly_the_configured_fraction(fraction):
    model = tiny_model(mlp="dense")
    idx, targets = torch.randint(0, 64, (8, 8)), torch.randint(0, 64, (8, 8))
    losses = per_sequence_loss(model(idx).logits, targets)
    losses.retain_grad()
    indices, loss = selective_backprop(losses, fraction)
    loss.backward()
    k = round(8 * fraction)
    assert len(indices) == k
    got_gradient = (losses.grad != 0).nonzero().flatten()
    assert got_gradient.tolist() == indices.tolist()  # exactly the selected sequences ...
    assert set(indices.tolist()) == set(
        torch.topk(losses.detach(), k).indices.tolist()
    )  # ... the highest-loss ones
    # The model's gradient is that of training on the selected sequences alone.
    reference = tiny_model(mlp="dense")
    F.cross_entropy(reference(idx[indices]).logits.flatten(0, 1), targets[indices].flatten()).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_selection_refuses_a_fraction_that_is_not_a_whole_number_of_sequences():
    with pytest.raises(ValueError, match="whole number"):
        select_highest(torch.arange(10.0), 0.25)
    with pytest.raises(ValueError, match="whole number"):
        select_highest(torch.arange(10.0), 0.0)


def test_per_sequence_loss_is_the_lm_loss_before_the_batch_mean():
    model = tiny_model()
    idx, targets = torch.randint(0, 64, (4, 8)), torch.randint(0, 64, (4, 8))
    out = model(idx, targets)
    per_seq = per_sequence_loss(out.logits, targets)
    torch.testing.assert_close(per_seq.mean(), out.lm_loss)
    torch.testing.assert_close(per_seq[1], F.cross_entropy(out.logits[1], targets[1]))


def test_rho_loss_selects_by_reducible_not_training_loss():
    train = torch.tensor([5.0, 4.0, 3.0, 2.0], requires_grad=True)
    irreducible = torch.tensor(
        [4.9, 1.0, 2.9, 0.5]
    )  # sequence 0: high loss, but noise the holdout model can't learn
    assert reducible_loss(train, irreducible).tolist() == pytest.approx([0.1, 3.0, 0.1, 1.5])
    indices, loss = rho_select(train, irreducible, 0.5)
    assert indices.tolist() == [1, 3]
    loss.backward()
    assert train.grad.tolist() == [
        0.0,
        0.5,
        0.0,
        0.5,
    ]  # the training loss of the selected, irreducible detached
    with pytest.raises(ValueError, match="shapes differ"):
        reducible_loss(train, irreducible[:3])


# Batch selection over data-parallel ranks: a forward batch of 16 in micro-batches of 2 on 2 ranks. Rank r's
# micro-batch m holds samples (2m + r) * 2 and the next (PackedSampler.micro_batch); every highest score
# sits in rank 0's share, so selecting per rank would train on other sequences than one device does.
FORWARD, MICRO, RANKS = 16, 2, 2
RANK0 = [(2 * m) * MICRO + i for m in range(FORWARD // (MICRO * RANKS)) for i in range(MICRO)]


def forward_batch_scores() -> torch.Tensor:
    scores = torch.arange(FORWARD, dtype=torch.float32)
    scores[RANK0] += 100.0
    return scores


def selection_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of the gloo test below: score its micro-batches, gather, select, take its share."""
    import os
    from pathlib import Path
    from types import SimpleNamespace

    import torch.distributed as dist

    from dsmoe.train.budgeted import gather_scores, rank_share

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dims = SimpleNamespace(batch_rank=rank, batch_ranks=world, data_group=None)
    mine = [(m * world + rank) * MICRO + i for m in range(FORWARD // (MICRO * world)) for i in range(MICRO)]
    gathered = gather_scores(forward_batch_scores()[mine], dims, MICRO)
    chosen = select_highest(gathered, 0.5)
    torch.save(
        {"gathered": gathered, "chosen": chosen, "share": rank_share(chosen, dims, MICRO)},
        Path(out) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_batch_selection_is_global_over_data_parallel_ranks(tmp_path):
    """Every rank gathers the whole forward batch's scores and picks the same top half, the sequences one
    device picks; the ranks then train on equal, disjoint parts of it (dealt as a training batch)."""
    import torch.multiprocessing as mp

    from dsmoe.train.budgeted import gather_scores, rank_share
    from tests.parallel_worker import free_port

    scores = forward_batch_scores()
    one_device = select_highest(scores, 0.5)
    assert one_device.tolist() == RANK0  # per-rank selection would give rank 1 four of its own
    single = SimpleNamespace(batch_rank=0, batch_ranks=1, data_group=None)
    assert torch.equal(gather_scores(scores, single, MICRO), scores)
    assert rank_share(one_device, single, MICRO).flatten().tolist() == RANK0
    mp.start_processes(
        selection_rank, args=(RANKS, free_port(), str(tmp_path)), nprocs=RANKS, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(RANKS)]
    for r in ranks:
        assert torch.equal(r["gathered"], scores) and torch.equal(r["chosen"], one_device)
        assert r["share"].shape == (FORWARD // 2 // (MICRO * RANKS), MICRO)  # equal counts
    # rank r's micro-batch m: chosen[(m * ranks + r) * micro ...], as PackedSampler deals a training batch
    dealt = torch.stack([r["share"] for r in ranks], dim=1).flatten()
    assert dealt.tolist() == one_device.tolist()


def test_a_scoring_batch_the_ranks_cannot_split_is_refused_at_start(small_cfg, tmp_path):
    """global_batch_size / fraction sequences are scored in micro-batches on every data-parallel rank: a
    layout that does not divide them is refused when the config loads (parallel.dp set) or the run
    starts (dp from the world size), naming the options to change, not at the first step."""
    from dsmoe.config import ConfigError
    from dsmoe.train.budgeted import scoring_micro_batches

    table = tmp_path / "t.json"  # never read: the checks come first
    budget = [f"train.budget.rst_hours={1 / 3600!r}", f"train.budget.reference={table}"]
    # 8 / 0.8 = 10 sequences: micro-batches of 2 on 4 ranks split the training batch, not the scoring one
    method = ["train.method.name=selective_backprop", "train.method.fraction=0.8", "train.micro_batch_size=2"]
    with pytest.raises(ConfigError, match=r"train.method.fraction.*parallel.dp \(4\)"):
        small_cfg(*budget, *method, "parallel.dp=4")
    cfg = small_cfg(*budget, *method)
    assert scoring_micro_batches(cfg, SimpleNamespace(batch_ranks=1)) == 5
    with pytest.raises(
        ConfigError, match=r"10 must be a multiple of train.micro_batch_size x the data-parallel"
    ):
        scoring_micro_batches(cfg, SimpleNamespace(batch_ranks=4))


# --- Lion and Sophia-G ----------------------------------------------------------------------------------


def toy_problem(seed: int = 0):
    torch.manual_seed(seed)
    params = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5))]
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]
    return params, grads


def test_lion_update_matches_its_formula():
    params, grads = toy_problem()
    lr, beta1, beta2, wd = 0.01, 0.9, 0.99, 0.1
    optimizer = Lion(params, lr=lr, betas=(beta1, beta2), weight_decay=wd)
    theta = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        for i, g in enumerate(step_grads):  # Chen et al. 2023, Algorithm 2 (decoupled weight decay)
            c = beta1 * m[i] + (1 - beta1) * g
            theta[i] = theta[i] - lr * (torch.sign(c) + wd * theta[i])
            m[i] = beta2 * m[i] + (1 - beta2) * g
        for p, t in zip(params, theta, strict=True):
            torch.testing.assert_close(p.detach(), t, rtol=0, atol=1e-6)
    assert [float(optimizer.state[p]["step"]) for p in params] == [4.0, 4.0]  # torch's AdamW layout
    optimizer.overflow = True  # DeepSpeed's skip: nothing moves
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_sophia_g_update_matches_its_formula_with_clipping():
    params, grads = toy_problem(1)
    lr, beta1, beta2, rho, wd, tokens, eps = 0.01, 0.965, 0.99, 0.04, 0.1, 64, 1e-15
    optimizer = SophiaG(
        params, lr=lr, betas=(beta1, beta2), rho=rho, weight_decay=wd, gnb_batch_tokens=tokens
    )
    theta = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    h = [torch.zeros_like(p) for p in params]
    clipped = unclipped = 0
    for step, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        for i, g in enumerate(step_grads):  # Liu et al. 2023, Algorithm 3; gamma * h_t = rho * B * h
            m[i] = beta1 * m[i] + (1 - beta1) * g
            theta[i] = theta[i] * (1 - lr * wd)
            ratio = torch.clamp(m[i].abs() / (rho * tokens * h[i] + eps), max=1.0)
            clipped += int((ratio == 1.0).sum())
            unclipped += int((ratio < 1.0).sum())
            theta[i] = theta[i] - lr * torch.sign(m[i]) * ratio
        for p, t in zip(params, theta, strict=True):
            torch.testing.assert_close(p.detach(), t, rtol=0, atol=1e-6)
        # A Hessian pass after each step: GNB gradients g_hat, h = beta2 h + (1 - beta2) g_hat^2.
        g_hat = [0.3 * (step + 1) * torch.randn_like(p) for p in params]
        for p, g in zip(params, g_hat, strict=True):
            p.grad = g.clone()
        if step % 2:
            optimizer.hessian_pass = True  # through step(), as under DeepSpeed
            optimizer.step()
            assert not optimizer.hessian_pass
        else:
            optimizer.update_hessian()
        for i, g in enumerate(g_hat):
            h[i] = beta2 * h[i] + (1 - beta2) * g * g
            torch.testing.assert_close(optimizer.state[params[i]]["hessian"], h[i], rtol=1e-6, atol=0)
        for p, t in zip(params, theta, strict=True):
            torch.testing.assert_close(p.detach(), t, rtol=0, atol=1e-6)  # the Hessian pass moved nothing
    assert clipped > 0 and unclipped > 0, "the toy problem must exercise both sides of the clip"
    assert float(optimizer.state[params[0]]["step"]) == 4.0  # updates only: Hessian passes not counted


def test_gnb_estimator_is_unbiased_for_the_gauss_newton_diagonal():
    """Softmax regression logits = W x: E[g_hat^2] over sampled labels is diag(p) - p^2 times x^2."""
    torch.manual_seed(0)
    W = torch.randn(5, 3, requires_grad=True)
    x = torch.randn(3)
    logits = (W @ x).expand(20000, 5)  # one input, many independent label draws
    targets = sample_gnb_targets(logits.unsqueeze(0), torch.Generator().manual_seed(1)).squeeze(0)
    per_draw = F.cross_entropy(logits, targets, reduction="none")
    # Gradient per draw of CE w.r.t. W is (p - e_y) x^T; average its square over the draws.
    p = F.softmax(W @ x, dim=0).detach()
    onehot = F.one_hot(targets, 5).float()
    g_sq = (((p - onehot)[:, :, None] * x[None, None, :]) ** 2).mean(0)
    expected = (p * (1 - p))[:, None] * x[None, :] ** 2
    torch.testing.assert_close(g_sq, expected, rtol=0.05, atol=1e-3)
    grad = torch.autograd.grad(per_draw[:1].sum(), W)[0]
    torch.testing.assert_close(grad, (p - onehot[0])[:, None] * x[None, :])  # the closed form used above


@pytest.mark.usefixtures("single_process_group")
@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("name", ["lion", "sophia"])
def test_deepspeed_owns_the_step_of_our_optimizers(stage, name):
    """Through deepspeed.initialize (plain fp32 and ZeRO-1's flat partitions) the update is the formula's."""
    import deepspeed

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    reference = copy.deepcopy(model)
    make = {
        "lion": lambda ps: Lion(ps, lr=0.01, weight_decay=0.1),
        "sophia": lambda ps: SophiaG(ps, lr=0.01, weight_decay=0.1, gnb_batch_tokens=8),
    }[name]
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=make(model.parameters()),
        config={
            "train_batch_size": 8,
            "train_micro_batch_size_per_gpu": 8,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,
            "steps_per_print": 2**31 - 1,
        },
    )
    plain = make(reference.parameters())
    inner = engine.basic_optimizer
    assert isinstance(inner, Lion | SophiaG)
    for step in range(3):
        x, y = torch.randn(8, 4), torch.randn(8, 3)
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
        F.mse_loss(reference(x), y).backward()
        plain.step()
        plain.zero_grad()
        if name == "sophia":  # a GNB-style pass through the engine: h updated, parameters unmoved
            inner.hessian_pass = True
            engine.backward(engine(x).square().mean())
            engine.step()
            reference(x).square().mean().backward()
            plain.update_hessian()
            plain.zero_grad()
        for p, q in zip(engine.module.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6, msg=f"step {step}")


@pytest.mark.usefixtures("single_process_group")
@pytest.mark.parametrize("layout", [("0", "fp32"), ("2", "bf16")])
def test_layer_dropping_runs_through_the_deepspeed_engine(small_cfg, layout):
    """run_blocks around the engine's forward: the loss is the shallower model's, and a dropped block's
    gradient is zero (DeepSpeed fills unused gradients on its fp32 paths) or absent."""
    from dsmoe.train import engine as engine_lib
    from parallel import groups

    stage, precision = layout
    cfg = small_cfg(
        "model.n_layers=3",
        "model.vocab_size=512",
        f"parallel.zero_stage={stage}",
        f"train.precision={precision}",
    )
    cfg.train.global_batch_size = cfg.train.micro_batch_size  # one micro-batch per step
    torch.manual_seed(0)
    engine = engine_lib.initialize(build(cfg.model), cfg, groups.init(cfg.parallel))
    reference = copy.deepcopy(engine.module).float()
    idx, targets = torch.randint(0, 512, (4, 32)), torch.randint(0, 512, (4, 32))
    with run_blocks(engine.module, [0, 2]):
        out = engine(idx, targets)
    with torch.no_grad(), run_blocks(reference, [0, 2]):
        expected = reference(idx, targets).loss
    torch.testing.assert_close(out.loss.float(), expected, rtol=2e-2 if precision == "bf16" else 1e-6, atol=0)
    engine.backward(out.loss)
    dropped = [p.grad for p in engine.module.blocks[1].parameters()]
    assert all(g is None or not g.any() for g in dropped)
    before = [p.detach().clone() for p in engine.module.blocks[1].parameters()]
    kept_before = [p.detach().clone() for p in engine.module.blocks[0].parameters()]
    if precision == "fp32":  # the loop's path (methods run fp32, ZeRO 0): the dropped block is not updated
        release_dropped_grads(engine.module, [0, 2])
    _, applied = engine_lib.boundary_step(engine)
    assert applied
    if precision == "fp32":
        for p, q in zip(engine.module.blocks[1].parameters(), before, strict=True):
            assert torch.equal(
                p.detach(), q
            )  # without release_dropped_grads AdamW moves it (zero grad, decay)
        assert any(
            not torch.equal(p.detach(), q)
            for p, q in zip(engine.module.blocks[0].parameters(), kept_before, strict=True)
        )
    engine.destroy()
