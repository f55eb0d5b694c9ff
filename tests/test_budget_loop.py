"""RST budgets and NTNG's methods through the real training loop (dsmoe/train/loop.py, budgeted.py)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from dsmoe.config import ConfigError
from dsmoe.run import run
from dsmoe.train.budget import BudgetError, RstClock, RstEntry, RstTable, RstTableError, StepConfig
from dsmoe.train.logging import read_metrics

pytestmark = pytest.mark.usefixtures("single_process_group")

# small_cfg: 2 layers, global batch 8 in micro-batches of 4, seq_len 32.
LAYERS, BATCH, MICRO, SEQ = 2, 8, 4, 32


def write_table(path, layers=LAYERS, scale=1.0) -> RstTable:
    """Made-up reference times (distinct per configuration, so sums identify the passes): the loop's
    accounting is under test, tools/research/calibrate_rst.py measures real ones."""

    def entry(kind, active, batch, optimizer, seconds):
        step = StepConfig(
            kind=kind,
            active_layers=active,
            batch_size=batch,
            micro_batch_size=MICRO,
            seq_len=SEQ,
            optimizer=optimizer,
        )
        return RstEntry(step=step, seconds=seconds * scale)

    entries = []
    for n in range(1, 2 * layers + 1):
        for k, opt in enumerate(("adamw", "lion", "sophia")):
            entries.append(entry("train", n, BATCH, opt, 0.1 * n + 0.01 * k + 0.003))
        entries.append(entry("hessian", n, BATCH, "sophia", 0.07 * n + 0.001))
        entries.append(entry("forward", n, 2 * BATCH, "none", 0.03 * n + 0.0007))
    table = RstTable(
        device="made-up test device", date="2026-11-30", commit="test", torch_version="x", entries=entries
    )
    table.save(path)
    return table


def budget_args(table_path, seconds, *extra):
    return [
        f"train.budget.rst_hours={seconds / 3600!r}",
        f"train.budget.reference={table_path}",
        "train.export_at_end=false",
        *extra,
    ]


def test_budget_stops_where_the_next_step_does_not_fit_and_lr_ends_at_its_final_value(small_cfg, tmp_path):
    table = write_table(tmp_path / "t.json")
    per_step = table.seconds(
        StepConfig(active_layers=2, batch_size=BATCH, micro_batch_size=MICRO, seq_len=SEQ)
    )  # 0.203 s
    # 5 steps spend exactly 1.015 s: the fifth step ends at the budget and trains at the final LR.
    cfg = small_cfg(*budget_args(tmp_path / "t.json", 5 * per_step, "train.budget.warmup_fraction=0.2"))
    result = run(cfg)
    assert result.steps == 5
    logged = read_metrics(tmp_path / "run")
    assert [m["rst_s"] for m in logged] == pytest.approx([per_step * (i + 1) for i in range(5)], abs=1e-9)
    assert logged[-1]["lr"] == 0.0  # final_lr_ratio 0, exactly at the budget
    assert logged[0]["lr"] == pytest.approx(cfg.train.lr)  # warmup over 20% of the budget: done at step 1
    assert all(m["wall_s"] > 0 for m in logged)
    assert result.budget["rst_s"] == pytest.approx(5 * per_step) and result.budget["finished"]
    # a little more budget, not enough for a sixth step: the same 5 steps, and the last still trains at the
    # schedule's final value (the leftover 0.9 step goes unused)
    assert (
        run(small_cfg(*budget_args(tmp_path / "t.json", 5.9 * per_step), run_dir=tmp_path / "b")).steps == 5
    )
    assert read_metrics(tmp_path / "b")[-1]["lr"] == 0.0


def test_rho_loss_main_schedule_spans_the_budget_left_after_the_irreducible_model(small_cfg, tmp_path):
    """The irreducible-loss model's steps are charged first (2 x 0.103 s, 12% of the budget); the main
    model then warms up from its own first step and decays to the final LR exactly at the budget's end,
    as a baseline given the budget that is left would."""
    table = write_table(tmp_path / "t.json")
    cost = lambda kind, layers, batch=BATCH: table.seconds(  # noqa: E731
        StepConfig(kind=kind, active_layers=layers, batch_size=batch, micro_batch_size=MICRO, seq_len=SEQ)
    )
    irreducible = 2 * cost("train", 1)
    per_step = cost("forward", 2, 2 * BATCH) + cost("forward", 1, 2 * BATCH) + cost("train", 2)
    rho = (
        "train.method.name=rho_loss",
        "train.method.irreducible_steps=2",
        "train.method.irreducible_layers=1",
        "train.budget.warmup_fraction=0.4",
    )
    cfg = small_cfg(*budget_args(tmp_path / "t.json", irreducible + 5 * per_step, *rho))
    result = run(cfg)
    assert result.steps == 5
    # steps end at 1/5 .. 5/5 of the main model's budget: warmup over 0.4, then linear to 0
    lrs = [m["lr"] / cfg.train.lr for m in read_metrics(tmp_path / "run")]
    assert lrs == pytest.approx([0.5, 1.0, 2 / 3, 1 / 3, 0.0], abs=1e-9)
    assert lrs[-1] == 0.0
    assert result.budget["rst_s"] == pytest.approx(irreducible + 5 * per_step, abs=1e-9)


def test_a_budget_below_one_step_is_a_clear_error(small_cfg, tmp_path):
    write_table(tmp_path / "t.json")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(BudgetError, match="cannot pay for one step"):
        run(small_cfg(*budget_args(tmp_path / "t.json", 0.1)))
    # the run's checkpoint-on-SIGTERM handler is not left behind (processes forked later inherited it)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_budget_config_errors_name_the_key(small_cfg, tmp_path):
    with pytest.raises(ConfigError, match="train.budget.reference"):
        small_cfg("train.budget.rst_hours=1.0")
    with pytest.raises(ConfigError, match="train.method.name"):
        small_cfg("train.method.name=layer_drop")
    with pytest.raises(ConfigError, match="train.optimizer"):  # Sophia's Hessian passes are budget-planned
        small_cfg("train.optimizer=sophia")
    write_table(tmp_path / "t.json")
    budget = budget_args(tmp_path / "t.json", 10.0)
    with pytest.raises(ConfigError, match="train.precision"):
        small_cfg(*budget, "train.method.name=layer_drop", "train.precision=bf16")
    with pytest.raises(ConfigError, match="train.method.name"):
        small_cfg(*budget, "train.method.name=selective_backprop", "parallel.tp=2")
    with pytest.raises(ConfigError, match="train.method.nme"):
        small_cfg("train.method.nme=layer_drop")
    with pytest.raises(ConfigError, match="train.optimizer"):
        small_cfg("train.optimizer=sgd")
    with pytest.raises(ConfigError, match="train.method.fraction"):
        small_cfg(
            *budget_args(tmp_path / "t.json", 1.0, "train.method.name=rho_loss", "train.method.fraction=0.3")
        )


def test_a_slower_machine_stops_at_the_same_step(small_cfg, tmp_path, monkeypatch):
    """RST charges the table's time, not the machine's: a run whose every step takes longer in wall time
    stops at the same step with the same losses (what lets the comparison run concurrently on one GPU)."""
    write_table(tmp_path / "t.json")
    args = budget_args(tmp_path / "t.json", 1.2, "train.method.name=layer_drop")
    fast = run(small_cfg(*args, run_dir=tmp_path / "fast"))
    from dsmoe.train import engine as engine_lib

    real = engine_lib.boundary_step

    def slow(engine):
        time.sleep(0.3)  # well above the wall-time noise of a loaded 2-core machine
        return real(engine)

    monkeypatch.setattr(engine_lib, "boundary_step", slow)
    slowed = run(small_cfg(*args, run_dir=tmp_path / "slow"))
    assert slowed.steps == fast.steps > 1
    assert slowed.losses == fast.losses
    assert slowed.budget["rst_s"] == fast.budget["rst_s"] and slowed.budget["wall_s"] > fast.budget["wall_s"]


@pytest.mark.parametrize(
    "optimizer",
    [("train.optimizer=lion",), ("train.optimizer=sophia", "train.sophia_hessian_interval=2")],
    ids=["lion", "sophia"],
)
def test_resume_keeps_the_budget(small_cfg, tmp_path, optimizer):
    """Stopped at step 3 and resumed: the same steps, losses and LRs as one run, with the optimizer's own
    moments (Lion: exp_avg; Sophia-G: exp_avg and the Hessian EMA) restored."""
    write_table(tmp_path / "t.json")
    args = budget_args(tmp_path / "t.json", 1.5, *optimizer, "train.lr=1e-3")
    full = run(small_cfg(*args, run_dir=tmp_path / "full"))
    first = run(small_cfg(*args, "train.exit_at_step=3", run_dir=tmp_path / "cut"))
    assert first.steps == 3
    resumed = run(small_cfg(*args, run_dir=tmp_path / "cut"))
    assert resumed.steps == full.steps and resumed.budget["rst_s"] == full.budget["rst_s"]
    assert first.losses + resumed.losses == full.losses
    logged = read_metrics(tmp_path / "cut")
    assert [m["lr"] for m in logged] == [m["lr"] for m in read_metrics(tmp_path / "full")]
    with pytest.raises(BudgetError, match="same budget"):
        run(small_cfg(*budget_args(tmp_path / "t.json", 3.0), *optimizer, run_dir=tmp_path / "cut"))


@pytest.mark.parametrize(
    "method",
    [
        ("train.method.name=layer_stacking", "train.method.stack_at=[0.5]"),
        ("train.method.name=layer_drop",),
        ("train.method.name=selective_backprop",),
        (
            "train.method.name=rho_loss",
            "train.method.irreducible_steps=2",
            "train.method.irreducible_layers=1",
        ),
        ("train.optimizer=lion", "train.lr=1e-3"),
        ("train.optimizer=sophia", "train.sophia_hessian_interval=2"),
    ],
    ids=lambda m: m[0].split("=")[1],
)
def test_each_method_trains_and_charges_its_passes(small_cfg, tmp_path, method):
    from dsmoe.train.budgeted import BudgetedRun
    from parallel import groups

    table = write_table(tmp_path / "t.json")
    cfg = small_cfg(*budget_args(tmp_path / "t.json", 2.0, *method))
    possible = {p.describe() for p in BudgetedRun(cfg, groups.init(cfg.parallel)).possible_passes()}
    result = run(cfg)
    assert result.steps >= 3 and all(torch.isfinite(torch.tensor(result.losses)))
    charges = result.budget["charges"]
    assert set(charges) <= possible  # what the start-up table check looked up covers every charge
    by_desc = {e.step.describe(): e.seconds for e in table.entries}
    charged = sum(by_desc[d] * n for d, n in charges.items())
    assert result.budget["rst_s"] == pytest.approx(charged, abs=1e-9)  # the clock is the table's sum
    name = method[0].split("=")[1]
    kinds = {d.split(" ")[0] for d in charges}
    if name in ("selective_backprop", "rho_loss"):
        assert "forward" in kinds
    if name == "sophia":
        assert "hessian" in kinds
    if name == "layer_stacking":
        assert len(result.engine.module.blocks) == 2 and any("1 active layers" in d for d in charges)
    if name == "layer_drop":
        assert any("1 active layers" in d for d in charges)  # block 1 was dropped at least once


def table_without(path, drop) -> RstTable:
    """write_table's table less the entries `drop(step)` names."""
    full = write_table(path)
    table = RstTable(
        device=full.device,
        date=full.date,
        commit=full.commit,
        torch_version=full.torch_version,
        entries=[e for e in full.entries if not drop(e.step)],
    )
    table.save(path)
    return table


@pytest.mark.parametrize(
    "method, drop, named",
    [  # each lacks a configuration step 0 does not execute: the old check (step 0's plan) let it start
        (
            ("train.method.name=layer_stacking", "train.method.stack_at=[0.5]"),
            lambda s: s.kind == "train" and s.active_layers == 2,
            ["train pass: 2 active layers"],
        ),
        (
            ("train.method.name=layer_drop",),
            lambda s: s.kind == "train" and s.active_layers == 1,
            ["train pass: 1 active layers"],
        ),
        (
            ("train.optimizer=sophia", "train.sophia_hessian_interval=2"),
            lambda s: s.kind == "hessian",
            ["hessian pass: 2 active layers"],
        ),
        (
            ("train.method.name=rho_loss", "train.method.irreducible_layers=1"),
            lambda s: s.kind == "forward" and s.active_layers == 2,
            ["forward pass: 2 active layers, batch 16", "--forward-batches 2"],
        ),
    ],
    ids=["layer_stacking", "layer_drop", "sophia", "rho_loss"],
)
def test_a_table_lacking_any_configuration_the_run_can_execute_is_refused_before_training(
    small_cfg, tmp_path, method, drop, named
):
    """Every configuration the method can reach over the whole run is looked up at start (stacked depths,
    every active-layer count of layer dropping, scoring and Hessian passes), not only step 0's."""
    table_without(tmp_path / "t.json", drop)
    cfg = small_cfg(*budget_args(tmp_path / "t.json", 2.0, *method))
    with pytest.raises(RstTableError, match="tools/research/calibrate_rst.py") as error:
        run(cfg)
    for text in [str(tmp_path / "t.json"), "--layers", *named]:
        assert text in str(error.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step


@pytest.mark.parametrize(
    "method, expected",
    [
        ((), {("train", 2, "adamw")}),
        (
            ("train.method.name=layer_stacking", "train.method.stack_at=[0.5]"),
            {("train", 1, "adamw"), ("train", 2, "adamw")},
        ),
        (("train.method.name=layer_drop",), {("train", 1, "adamw"), ("train", 2, "adamw")}),
        (("train.method.name=layer_drop", "train.method.theta_bar=1.0"), {("train", 2, "adamw")}),
        (
            ("train.method.name=rho_loss", "train.method.irreducible_layers=1"),
            {("train", 2, "adamw"), ("train", 1, "adamw"), ("forward", 2, "none"), ("forward", 1, "none")},
        ),
        (("train.optimizer=sophia",), {("train", 2, "sophia"), ("hessian", 2, "sophia")}),
    ],
    ids=["baseline", "layer_stacking", "layer_drop", "layer_drop_never", "rho_loss", "sophia"],
)
def test_possible_passes_are_exactly_what_the_method_can_execute(small_cfg, tmp_path, method, expected):
    from dsmoe.train.budgeted import BudgetedRun
    from parallel import groups

    write_table(tmp_path / "t.json")
    cfg = small_cfg(*budget_args(tmp_path / "t.json", 2.0, *method))
    passes = BudgetedRun(cfg, groups.init(cfg.parallel)).possible_passes()
    assert {(p.kind, p.active_layers, p.optimizer) for p in passes} == expected


def test_a_layer_stacking_checkpoint_before_full_depth_exports_and_resumes(small_cfg, tmp_path):
    """Saved while the model has 1 of its 2 blocks: the export is the 1-block model it was (its depth is in
    the checkpoint's budget state), and the resumed run stacks at the same step as one uncut run."""
    from dsmoe.export import export, load_export, load_from_run
    from dsmoe.model import Routing

    write_table(tmp_path / "t.json")
    args = budget_args(
        tmp_path / "t.json", 2.0, "train.method.name=layer_stacking", "train.method.stack_at=[0.5]"
    )
    full = run(small_cfg(*args, run_dir=tmp_path / "full"))
    first = run(small_cfg(*args, "train.exit_at_step=3", run_dir=tmp_path / "cut"))
    assert first.steps == 3 and len(first.engine.module.blocks) == 1
    model, cfg, _, _ = load_export(export(tmp_path / "cut", tmp_path / "export", Routing()))
    assert cfg.model.n_layers == 1 and len(model.blocks) == 1 and cfg.train.method.name == "none"
    trained, _, _, step = load_from_run(tmp_path / "cut")
    assert step == 3 and len(trained.blocks) == 1
    idx = torch.randint(0, cfg.model.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, trained(idx).logits, rtol=0, atol=0)
        engine_logits = first.engine.module.float().eval()(idx).logits
    torch.testing.assert_close(model(idx).logits, engine_logits, rtol=1e-6, atol=1e-6)
    resumed = run(small_cfg(*args, run_dir=tmp_path / "cut"))
    assert len(resumed.engine.module.blocks) == len(full.engine.module.blocks) == 2
    assert resumed.steps == full.steps and resumed.budget["rst_s"] == full.budget["rst_s"]
    assert first.losses + resumed.losses == full.losses
    logged = read_metrics(tmp_path / "cut")
    assert [m["active_layers"] for m in logged] == [
        m["active_layers"] for m in read_metrics(tmp_path / "full")
    ]
    assert [m["lr"] for m in logged] == [m["lr"] for m in read_metrics(tmp_path / "full")]


def test_the_launcher_trains_a_method_under_a_budget_and_exports(tmp_path, cache_dir):
    """`python launchers/train.py` (configs/tiny.yaml under the small overrides) with a budget and selective
    backprop: it stops where the budget ends, checkpoints that step, exports and evaluates."""
    import os
    import subprocess
    import sys

    from tests.conftest import small_overrides

    write_table(tmp_path / "t.json")
    args = small_overrides(tmp_path / "run", cache_dir) + [
        f"train.budget.rst_hours={1.0 / 3600!r}",
        f"train.budget.reference={tmp_path / 't.json'}",
        "train.method.name=selective_backprop",
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline")
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "launchers/train.py", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # per step: forward over 16 sequences (0.0607 s) + train step (0.203 s) = 0.2637 s: 3 steps fit in 1 s
    assert "RST budget: 0.79 s of 1.00 s spent in 3 steps (finished)" in proc.stdout
    assert "held-out perplexity" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "step_00000003").is_dir()


def test_stack_engine_copies_every_block_with_its_weights_and_optimizer_moments(small_cfg, tmp_path):
    """Layer stacking inside a running engine (grow.stack_engine): block L + i starts as block i, fp32
    master and the optimizer's own moments (Lion: exp_avg only), and the LR and step count carry on."""
    import re

    from dsmoe.train import checkpoint
    from dsmoe.train.grow import stack_engine

    write_table(tmp_path / "t.json")
    cfg = small_cfg(*budget_args(tmp_path / "t.json", 0.5, "train.optimizer=lion", "train.lr=1e-3"))
    result = run(cfg)
    assert result.steps == 2
    result.engine.lr_scheduler.sync()  # the LR at the clock's position (the last step trained at the final LR)
    before, lr = checkpoint.full_state(result.engine), result.engine.get_lr()
    clock = RstClock(RstTable.load(tmp_path / "t.json"), 0.5)  # the run's clock at its end
    clock.load_state_dict(result.budget["clock"])
    engine = stack_engine(result.engine, cfg, result.engine.dsmoe_dims, clock=clock)
    after = checkpoint.full_state(engine)
    assert len(engine.module.blocks) == 2 * LAYERS and checkpoint.moments_of(engine) == ("exp_avg",)
    copies = 0
    for name, value in before.items():
        assert torch.equal(after[name], value), name
        match = re.match(r"^((?:exp_avg/)?)blocks\.(\d+)\.(.+)$", name)
        if match:
            twin = f"{match[1]}blocks.{int(match[2]) + LAYERS}.{match[3]}"
            assert torch.equal(after[twin], value), twin
            copies += 1
    assert copies > 0 and any(k.startswith("exp_avg/blocks.") for k in before)
    assert len(after) == len(before) + copies  # nothing else appeared
    assert engine.get_lr() == lr and checkpoint.engine_counters(engine)["adam_step"] == 2.0
