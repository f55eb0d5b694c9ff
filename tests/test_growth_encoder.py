"""MSG growth of the MosaicBERT-style encoder (papers/msg.md, dsmoe/growth.py): every operator, alone and
two at once, on post-LN and pre-LN, GeGLU and DS-MoE encoders, keeps the MLM logits of a padded batch at
c = 0 with large random new weights; old ALiBi heads keep their slopes; c = 1 then finish() is a plain
EncoderMLM; and a growth schedule trains through the loop with the un-grown model's loss at each event."""

from __future__ import annotations

import re

import pytest
import torch

from dsmoe import config as config_lib
from dsmoe import growth
from dsmoe.model import EncoderMLM, build
from dsmoe.model.attention import Varlen, alibi_slopes, plan_attention
from dsmoe.model.encoder import IGNORE_INDEX, EncoderBlock, LayerNorm

BASE = [
    "model.backbone=encoder",
    "model.vocab_size=97",
    "model.d_model=32",
    "model.n_layers=2",
    "model.max_seq_len=16",
    "data.seq_len=16",
    "model.attention.heads=4",
    "model.attention.experts=0",
    "model.attention.kv_heads=0",
    "model.moe.num_experts=2",
    "model.moe.expert_hidden=8",
    "model.tie_embeddings=true",
]
VARIANTS = {
    "postln_geglu": ["model.post_norm=true", "model.mlp=dense", "model.moe.activation=geglu"],
    "preln_geglu": ["model.post_norm=false", "model.mlp=dense", "model.moe.activation=geglu"],
    "postln_dsmoe": ["model.post_norm=true", "model.mlp=moe", "model.moe.activation=gelu"],
    "preln_dsmoe": ["model.post_norm=false", "model.mlp=moe", "model.moe.activation=gelu"],
}
BIG = 1.0  # new weights 50x the usual init: preservation must not depend on them


def small_encoder(variant: str, dtype=torch.float32) -> EncoderMLM:
    torch.manual_seed(0)
    cfg = config_lib.load(None, BASE + VARIANTS[variant])
    return build(cfg.model).to(dtype).eval()


def padded_batch(seed: int = 1):
    """Rows of mixed lengths (12, 7, 3 real tokens) with some positions masked for the MLM loss."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 3:] = False
    labels = torch.full_like(ids, IGNORE_INDEX)
    picked = (torch.rand(3, 12, generator=gen) < 0.4) & mask
    picked[:, 0] = True
    labels[picked] = ids[picked]
    return ids, mask, labels


def outputs(model, batch):
    """(B, S, V) logits of every position (zeros at padding), and the MLM loss at the labelled ones."""
    ids, mask, labels = batch
    with torch.no_grad():
        return model(ids, mask).logits, model(ids, mask, labels).loss


OPS = {
    "ffn": lambda m: growth.grow_ffn(m, 20 if m.cfg.mlp == "moe" else 24, BIG),  # GeGLU: 16 -> 24 units
    "experts": lambda m: growth.grow_experts(m, 4, init_std=BIG),
    "heads": lambda m: growth.grow_heads(m, 6, BIG),  # 4 ALiBi heads -> 6
    "layers_stack": lambda m: growth.grow_layers(m, 4, "stack", BIG),
    "layers_interleave": lambda m: growth.grow_layers(m, 3, "interleave", BIG),
    "hidden": lambda m: growth.grow_hidden(m, 48, BIG),
}
CASES = [(op, v) for op in OPS for v in VARIANTS if op != "experts" or "dsmoe" in v]
PAIRS = [("ffn", "hidden"), ("heads", "hidden"), ("layers_stack", "heads"), ("experts", "hidden")]


@pytest.mark.parametrize("op,variant", CASES)
def test_each_operator_preserves_the_mlm_logits(op, variant):
    """fp32, dropout 0, a padded batch: max |MLM logit difference| <= 1e-6 right after growth."""
    model = small_encoder(variant)
    batch = padded_batch()
    logits, loss = outputs(model, batch)
    params_before = sum(p.numel() for p in model.parameters())
    g = OPS[op](model)
    assert sum(p.numel() for p in model.parameters()) > params_before
    grown_logits, grown_loss = outputs(model, batch)
    assert (grown_logits - logits).abs().max() <= 1e-6
    assert abs(grown_loss - loss) <= 1e-6  # the MI losses of new blocks are masked too

    # Old values sit where the transfers say (head growth moves heads: the index says where).
    old = dict(small_encoder(variant).named_parameters())
    for name, p in model.named_parameters():
        t = g.transfers.get(name)
        if t is not None:
            torch.testing.assert_close(t.kept(p.detach()), old[t.old_name].detach(), rtol=0, atol=0)
    g.set_c(0.5)
    assert (outputs(model, batch)[0] - logits).abs().max() > 1e-4  # the new parts do take part


@pytest.mark.parametrize("first,second", PAIRS)
@pytest.mark.parametrize("variant", ["postln_dsmoe", "preln_dsmoe"])
def test_two_operators_at_once_preserve_the_mlm_logits(first, second, variant):
    model = small_encoder(variant)
    batch = padded_batch()
    logits, loss = outputs(model, batch)
    OPS[first](model)
    OPS[second](model)
    grown_logits, grown_loss = outputs(model, batch)
    assert (grown_logits - logits).abs().max() <= 1e-6 and abs(grown_loss - loss) <= 1e-6


@pytest.mark.parametrize("op,variant", [c for c in CASES if "geglu" in c[1] or c[0] == "experts"])
def test_at_c1_finish_leaves_a_plain_encoder_with_the_same_logits(op, variant):
    """fp64, so the comparison sees the masks, not rounding: c = 1 is the plain grown model; finish()
    removes every Growth* class and mask; the model rebuilt from its config computes the same logits
    (the config says the grown shapes, and the rebuilt ALiBi slopes are the ones the grown heads use)."""
    model = small_encoder(variant, torch.float64)
    batch = padded_batch()
    g = OPS[op](model)
    g.set_c(1.0)
    at_one, _ = outputs(model, batch)
    g.finish()
    assert not growth.in_progress(model)
    assert all(type(b) is EncoderBlock for b in model.blocks)
    assert all(type(n) is LayerNorm for n in model.modules() if isinstance(n, torch.nn.LayerNorm))
    finished, finished_loss = outputs(model, batch)
    assert (finished - at_one).abs().max() <= 1e-9
    rebuilt = build(model.cfg).double().eval()
    rebuilt.load_state_dict(model.state_dict())
    rebuilt_logits, rebuilt_loss = outputs(rebuilt, batch)
    assert (rebuilt_logits - finished).abs().max() <= 1e-9 and abs(rebuilt_loss - finished_loss) <= 1e-9


def test_ramp_is_linear_and_gradients_reach_new_weights():
    model = small_encoder("postln_geglu").train()
    g = growth.grow_hidden(model, 48, BIG)
    values = []
    for step in range(10, 15):
        g.set_c(growth.ramp(step, 10, 4))
        values.append(g.c)
    assert values == [0.0, 0.25, 0.5, 0.75, 1.0]
    g.set_c(0.25)
    model(*padded_batch()).loss.backward()
    assert model.blocks[1].mlp.w_in.weight.grad[:, 32:].abs().sum() > 0  # the new input channels learn
    with pytest.raises(ValueError, match="c = 1"):
        g.set_c(0.5)
        g.finish()


@pytest.mark.parametrize("old,new", [(4, 6), (4, 8), (6, 8), (8, 12), (12, 16), (2, 12)])
def test_old_alibi_heads_keep_their_slopes(old, new):
    """Each old head moves to the head position whose standard slope for `new` heads is its own; the
    grown model's attention plan (what every backend reads) gives the old heads their old slopes."""
    positions = growth.alibi_head_positions(old, new)
    assert len(set(positions.tolist())) == old
    assert torch.equal(alibi_slopes(new)[positions], alibi_slopes(old))
    model = small_encoder("preln_geglu")
    model.cfg.attention.heads, model.cfg.attention.head_dim = old, 8
    model = build(model.cfg).eval()
    q_rows_before = model.blocks[0].attn.qkv_proj.weight[: old * 8].detach().clone()
    growth.grow_heads(model, new, BIG)
    varlen = Varlen.from_mask(torch.ones(1, 4, dtype=torch.bool))
    slopes = plan_attention("eager", varlen, model.cfg.attention.num_heads, torch.float32).slopes
    assert model.cfg.attention.num_heads == new and model.blocks[0].attn.n_heads == new
    assert torch.equal(slopes[positions], alibi_slopes(old))
    q_rows_after = model.blocks[0].attn.qkv_proj.weight.detach().view(3, new, 8, -1)[0, positions]
    torch.testing.assert_close(q_rows_after.reshape(old * 8, -1), q_rows_before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ALiBi"):
        growth.alibi_head_positions(new, old)


def test_old_optimizer_moments_survive_hidden_growth():
    """The head's d x d dense grows along both dims: its old block keeps its moments, the rest is zero."""
    model = small_encoder("postln_geglu").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(*padded_batch()).loss.backward()
    optimizer.step()
    names = {id(p): n for n, p in model.named_parameters()}
    exp_avg = {names[id(p)]: s["exp_avg"].clone() for p, s in optimizer.state.items()}
    g = growth.grow_hidden(model, 48, BIG)
    carried = growth.carry_state(g, exp_avg)
    for name, p in model.named_parameters():
        assert carried[name].shape == p.shape
        t = g.transfers[name]
        torch.testing.assert_close(t.kept(carried[name]), exp_avg[t.old_name], rtol=0, atol=0)
        assert (carried[name] != 0).sum() == (exp_avg[t.old_name] != 0).sum()  # nothing else is nonzero
    assert carried["head_dense.weight"].shape == (48, 48)


def tiny_mlm(run_dir, cache_dir, *extra: str) -> config_lib.Config:
    """tests/test_encoder_train.py's tiny_mlm, smaller still and short."""
    from tests.test_encoder_train import tiny_mlm as tiny

    return tiny(
        run_dir,
        cache_dir,
        "train.eval_tokens=2048",
        "model.d_model=32",
        "model.n_layers=1",
        "model.moe.expert_hidden=8",  # GeGLU width 8 x 8 = 64
        "data.seq_len=32",
        "mlm.min_seq_len=8",
        "mlm.eval_seq_lens=[]",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.max_steps=10",
        "train.warmup_steps=1",
        "train.checkpoint_every=100",
        *extra,
    )


# Post-LN GeGLU (tiny_mlm's kind): every dimension, one event after the other, ramps of 1 or 2 steps.
EVENTS = [
    "{step: 2, dim: ffn, size: 128, ramp_steps: 1}",
    "{step: 3, dim: heads, size: 8, ramp_steps: 2}",
    "{step: 5, dim: layers, size: 2, ramp_steps: 1}",
    "{step: 6, dim: hidden, size: 64, ramp_steps: 2}",
]


def schedule(events: list[str]) -> str:
    return f"growth.events=[{', '.join(events)}]"


@pytest.fixture(scope="module")
def grown_mlm_run(tmp_path_factory, cache_dir, single_process_group):
    from dsmoe.run import run

    run_dir = tmp_path_factory.mktemp("grown_mlm") / "run"
    return run_dir, run(tiny_mlm(run_dir, cache_dir, schedule(EVENTS), "train.checkpoint_every=4"))


@pytest.mark.usefixtures("single_process_group")
def test_a_growth_schedule_trains_with_the_ungrown_loss_at_each_event(grown_mlm_run, tmp_path, cache_dir):
    """Through dsmoe.run.run and grow_engine: at each event's step the grown model (c = 0) has the
    loss the run without that event has at the same step; training continues to the end and exports a
    plain encoder of the final shape."""
    from dsmoe.export import load_export
    from dsmoe.run import run

    run_dir, grown = grown_mlm_run
    assert len(grown.losses) == 10 and all(torch.isfinite(torch.tensor(grown.losses)))
    for k, event in enumerate(EVENTS):
        step = int(re.search(r"step: (\d+)", event).group(1))
        without = run(
            tiny_mlm(
                tmp_path / f"without{k}",
                cache_dir,
                schedule(EVENTS[:k]),
                f"train.exit_at_step={step + 1}",
                "train.export_at_end=false",
            )
        )
        assert len(without.losses) == step + 1
        assert without.losses[:step] == pytest.approx(grown.losses[:step], rel=1e-6)
        assert grown.losses[step] == pytest.approx(without.losses[step], rel=1e-5), event
    model = grown.engine.module
    assert (model.cfg.d_model, model.cfg.n_layers, model.cfg.attention.num_heads) == (64, 2, 8)
    assert model.cfg.ffn_hidden == 128 and not growth.in_progress(model)
    exported, cfg, *_ = load_export(run_dir / "export")
    assert cfg.model.d_model == 64 and not cfg.growth.events
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            exported(ids, mask).logits, model.float().eval()(ids, mask).logits, rtol=1e-5, atol=1e-5
        )


@pytest.mark.usefixtures("single_process_group")
def test_a_run_stopped_mid_ramp_resumes_on_the_same_curve(grown_mlm_run, tmp_path, cache_dir):
    """Saved at step 4, half-way through the heads ramp (c = 1/2): the resumed run replays the schedule's
    shapes and masks (growth.replay on the encoder) and continues the uninterrupted loss curve."""
    from dsmoe.run import run

    _, grown = grown_mlm_run
    common = [schedule(EVENTS), "train.checkpoint_every=4", "train.export_at_end=false"]
    first = run(tiny_mlm(tmp_path / "run", cache_dir, *common, "train.exit_at_step=4"))
    assert first.interrupted and first.losses == pytest.approx(grown.losses[:4], rel=1e-6)
    resumed = run(tiny_mlm(tmp_path / "run", cache_dir, *common))
    assert resumed.losses == pytest.approx(grown.losses[4:], rel=1e-5)


@pytest.mark.parametrize(
    "events,extra,key",
    [
        ("[{step: 2, dim: experts, size: 12}]", [], "growth.events[0].dim"),  # GeGLU is dense
        ("[{step: 2, dim: attention_experts, size: 2}]", [], "growth.events[0].dim"),  # no MoA
        ("[{step: 2, dim: heads, size: 2}]", [], "growth.events[0].size"),  # not larger
    ],
)
def test_a_bad_encoder_schedule_names_the_key(tmp_path, cache_dir, events, extra, key):
    with pytest.raises(config_lib.ConfigError, match=re.escape(f"'{key}'")):
        tiny_mlm(tmp_path, cache_dir, f"growth.events={events}", *extra)


def test_growth_presets_end_at_their_targets_shapes():
    """configs/tiny_mlm_growth.yaml grows to configs/tiny_mlm.yaml's model; mosaicbert_base_growth's
    events (the paper's BERT-base plan) end at configs/mosaicbert_base.yaml's shape."""
    import dataclasses

    grown = config_lib.load("configs/tiny_mlm_growth.yaml", ["model.vocab_size=128"])
    target = config_lib.load("configs/tiny_mlm.yaml", ["model.vocab_size=128"]).model
    final = growth.final_model_config(grown)
    final.attention.head_dim = target.attention.head_dim = target.head_dim  # 32 either way
    assert dataclasses.asdict(final) == dataclasses.asdict(target)

    base = config_lib.load("configs/mosaicbert_base_growth.yaml").model
    target = config_lib.load("configs/mosaicbert_base.yaml").model
    sizes = {e.dim: e.size for e in config_lib.load("configs/mosaicbert_base_growth.yaml").growth.events}
    assert (base.n_layers, base.d_model, base.ffn_hidden, base.attention.heads) == (3, 512, 768, 8)
    assert sizes == {"ffn": 3072, "hidden": 768, "heads": 12, "layers": 12}
    assert (target.n_layers, target.d_model, target.ffn_hidden, target.attention.heads) == (12, 768, 3072, 12)
    assert base.attention.head_dim == target.head_dim


@pytest.mark.slow
def test_encoder_growth_under_two_data_parallel_ranks_follows_one_rank(tmp_path, cache_dir):
    """`deepspeed --num_gpus 2` (ZeRO-2) growing the tiny encoder's FFN, width, heads and depth against one
    rank taking the whole batch (full rows, so both take the same token-weighted mean): same loss curve."""
    from dsmoe.train.logging import read_metrics
    from tests.test_launcher import launch

    events = (
        "growth.events=[{step: 2, dim: ffn, size: 512, ramp_steps: 2}, {step: 5, dim: hidden, size: 128,"
        " ramp_steps: 2}, {step: 8, dim: heads, size: 4, ramp_steps: 2}, {step: 11, dim: layers, size: 4, ramp_steps: 2}]"
    )
    common = [
        "--config", "configs/tiny_mlm_growth.yaml", "train.max_steps=14", "train.warmup_steps=2",
        "train.checkpoint_every=7", "train.eval_tokens=2048", "mlm.min_seq_len=0", "mlm.eval_seq_lens=[]",
        "train.wandb=false", "train.progress=false", "data.seq_len=64", f"data.cache_dir={cache_dir}", events,
    ]  # fmt: skip
    launch(1, [*common, f"train.run_dir={tmp_path / 'one'}"], "torchrun")
    two = launch(
        2,
        [*common, f"train.run_dir={tmp_path / 'two'}", "train.micro_batch_size=16", "parallel.zero_stage=2"],
    )
    assert "world 2" in two.stdout and "grew layers to 4" in two.stdout
    curve_one = [m["loss"] for m in read_metrics(tmp_path / "one")]
    curve_two = [m["loss"] for m in read_metrics(tmp_path / "two")]
    assert len(curve_one) == len(curve_two) == 14
    torch.testing.assert_close(curve_two, curve_one, rtol=1e-5, atol=1e-5)
