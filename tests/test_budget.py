"""RST budgets (papers/no_train_no_gain.md): table, clock, schedules over the spent budget."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from dsmoe.train.budget import (
    BudgetError,
    RstClock,
    RstEntry,
    RstSchedule,
    RstScheduler,
    RstTable,
    RstTableError,
    StepConfig,
)


def step(kind="train", layers=4, batch=16, micro=16, **kw) -> StepConfig:
    return StepConfig(
        kind=kind, active_layers=layers, batch_size=batch, micro_batch_size=micro, seq_len=128, **kw
    )


def table(source="benchmarks/rst/test.json") -> RstTable:
    """Made-up times (the clock's arithmetic is what is tested; calibrate_rst measures real ones)."""
    entries = [RstEntry(step=step(layers=n), seconds=0.01 * n + 0.003) for n in range(1, 5)]
    entries += [
        RstEntry(step=step("forward", layers=4, batch=32), seconds=0.0137),
        RstEntry(step=step("train", optimizer="lion"), seconds=0.0419),
        RstEntry(step=step("hessian", optimizer="sophia"), seconds=0.0450),
    ]
    t = RstTable(device="cpu test", date="2026-11-30", commit="abc", torch_version="2.13", entries=entries)
    t.source = source
    return t


@pytest.mark.parametrize("shape", ["linear", "cosine", "one_cycle"])
@pytest.mark.parametrize("final", [0.0, 0.1])
def test_lr_reaches_its_final_value_exactly_at_the_budget(shape, final):
    s = RstSchedule(shape=shape, warmup_fraction=0.1, final_ratio=final)
    assert s.multiplier(1.0) == final
    assert s.multiplier(1.7) == final  # overspent (a lump charge) stays final
    assert s.multiplier(0.1) == pytest.approx(1.0)
    decay = [s.multiplier(0.1 + 0.9 * i / 50) for i in range(51)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False)), "decay must not rise"
    assert (
        decay[-2] > final
    )  # it is still decaying just before the end: the budget, not a step count, ends it
    # An optimizer driven by the clock: the step that spends the budget exactly trains at the final LR.
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.5)
    t = table()
    clock = RstClock(t, budget_seconds=10 * t.seconds(step()))
    scheduler = RstScheduler(optimizer, clock, s)
    lrs = []
    while clock.fits(step()):
        clock.charge(step())
        scheduler.sync()  # before the step, as the loop does
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()  # DeepSpeed's, after the update: changes nothing
        assert optimizer.param_groups[0]["lr"] == lrs[-1]
    assert len(lrs) == 10 and lrs[-1] == 0.5 * final and lrs[0] > 0
    assert scheduler.get_last_lr() == [0.5 * final]
    assert "clock" not in scheduler.state_dict()


def test_one_cycle_is_torchs_one_cycle_over_the_budget():
    total, pct = 101, 0.3
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1.0, total_steps=total, pct_start=pct, div_factor=25.0, final_div_factor=1e4
    )
    # OneCycleLR peaks at step pct * total - 1 and ends at step total - 1; step i is at fraction i / (total - 1).
    ours = RstSchedule(
        shape="one_cycle",
        warmup_fraction=(pct * total - 1) / (total - 1),
        initial_ratio=1 / 25,
        final_ratio=1 / 25 / 1e4,
    )
    for i in range(total):
        assert ours.multiplier(i / (total - 1)) == pytest.approx(
            optimizer.param_groups[0]["lr"], rel=1e-9, abs=1e-12
        )
        optimizer.step()
        if i < total - 1:
            reference.step()


def test_rst_accounting_sums_the_tables_entries():
    t = table()
    clock = RstClock(t, budget_seconds=3600)
    executed = [
        [step(layers=4)],
        [step("forward", layers=4, batch=32), step(layers=4)],  # selective backprop: score, then train
        [step(layers=2)],  # layer dropping: two blocks ran
        [step(optimizer="lion")],
        [step("hessian", optimizer="sophia")],
        [step(layers=1)],
    ]
    for passes in executed:
        clock.charge(passes)
    expected = sum(t.seconds(p) for passes in executed for p in passes)
    assert clock.spent_s == pytest.approx(expected, rel=1e-12)
    assert clock.spent_ns == sum(round(t.seconds(p) * 1e9) for passes in executed for p in passes)
    assert clock.charges[step(layers=4)] == 2 and clock.charges[step(layers=2)] == 1
    clock.charge_seconds(12.5, "irreducible-loss model training")
    assert clock.spent_s == pytest.approx(expected + 12.5)
    assert clock.fraction == pytest.approx((expected + 12.5) / 3600)


def test_a_static_configuration_stops_at_the_same_step_on_a_slower_machine():
    """Two real training runs, one slowed down 4x, under the same budget: same step count, different wall."""
    t = table()
    config = step(layers=2)
    budget = 7.5 * t.seconds(config)  # 7 steps fit, the 8th does not

    def train(delay_s: float) -> tuple[int, float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
        if delay_s:
            model.register_forward_hook(lambda *_: time.sleep(delay_s))  # a slower machine
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        clock, steps, started = RstClock(t, budget), 0, time.perf_counter()
        while clock.fits(config):
            clock.charge(config)
            x = torch.randn(16, 8)
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
        return steps, time.perf_counter() - started

    (fast_steps, _), (slow_steps, slow_wall) = train(0.0), train(0.02)
    assert fast_steps == slow_steps == 7
    assert slow_wall >= 7 * 0.02  # it did run slower (by the sleeps at least), and stopped at the same step


def test_exact_multiples_of_a_step_fit_exactly():
    t = table()
    config = step(layers=3)  # 0.033 s: not exact in binary floating point
    clock = RstClock(t, budget_seconds=1000 * t.seconds(config))
    n = 0
    while clock.fits(config):
        clock.charge(config)
        n += 1
    assert n == 1000 and clock.fraction == 1.0


def test_a_budget_that_cannot_fit_one_step_is_a_clear_error():
    t = table()
    clock = RstClock(t, budget_seconds=0.02)
    clock.require_one_step(step(layers=1))  # 0.013 s fits
    with pytest.raises(
        BudgetError, match=r"budget of 0\.020 s RST cannot pay for one step \(0\.043 s on cpu test"
    ) as e:
        clock.require_one_step([step(layers=4)], budget_key="train.budget.rst_hours")
    assert "train.budget.rst_hours" in str(e.value) and "4 active layers" in str(e.value)
    with pytest.raises(BudgetError, match="positive"):
        RstClock(t, budget_seconds=0)


def test_a_configuration_the_table_lacks_names_it_and_the_table():
    t = table(source="benchmarks/rst/h100_tiny.json")
    with pytest.raises(RstTableError) as e:
        t.seconds(step(layers=4, batch=64, micro=16))
    message = str(e.value)
    assert "benchmarks/rst/h100_tiny.json" in message
    assert "batch 64 in micro-batches of 16" in message and "tools/research/calibrate_rst.py" in message
    with pytest.raises(RstTableError, match="no entry"):
        RstClock(t, 10).charge(step(routing="sparse"))


def test_table_round_trips_and_bad_files_are_named(tmp_path):
    t = table()
    t.model = {"d_model": 64, "n_layers": 4, "mlp": "moe"}
    path = t.save(tmp_path / "rst.json")
    loaded = RstTable.load(path)
    assert loaded == t and loaded.source == str(path)
    assert loaded.seconds(step("forward", batch=32)) == 0.0137
    loaded.check_model({"d_model": 64, "n_layers": 2, "mlp": "moe"})  # depth is per entry
    with pytest.raises(RstTableError, match="d_model: table 64, this run's model 128"):
        loaded.check_model({"d_model": 128, "n_layers": 4, "mlp": "moe"})
    t.model = {"d_model": 64, "moe": {"training": "dense", "expert_hidden": 64}}
    t.check_model({"d_model": 64, "moe": {"training": "sparse", "expert_hidden": 64}})  # routing is per entry
    with pytest.raises(RstTableError, match="moe.expert_hidden: table 64, this run's model 32"):
        t.check_model({"d_model": 64, "moe": {"training": "dense", "expert_hidden": 32}})
    # an option added after calibration: fine at its default (what the table's model ran), refused otherwise
    t.check_model({"d_model": 64, "moe": {"expert_hidden": 64}, "geglu_kernel": "torch"})
    with pytest.raises(RstTableError, match="geglu_kernel: table None, this run's model 'triton'"):
        t.check_model({"d_model": 64, "moe": {"expert_hidden": 64}, "geglu_kernel": "triton"})
    with pytest.raises(RstTableError, match="not found"):
        RstTable.load(tmp_path / "missing.json")
    data = json.loads(path.read_text())
    data["entries"][0]["seconds"] = -1
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(RstTableError, match="bad.json.*positive"):
        RstTable.load(tmp_path / "bad.json")
    del data["entries"][0]["seq_len"]
    (tmp_path / "bad2.json").write_text(json.dumps(data))
    with pytest.raises(RstTableError, match="bad2.json: malformed"):
        RstTable.load(tmp_path / "bad2.json")


def test_clock_state_resumes_and_refuses_another_budget():
    t = table()
    clock = RstClock(t, 5.0)
    clock.charge([step(), step("forward", batch=32)])
    clock.charge_seconds(0.5, "holdout model")
    resumed = RstClock(t, 5.0)
    resumed.load_state_dict(json.loads(json.dumps(clock.state_dict())))  # survives JSON (client state)
    assert resumed.spent_ns == clock.spent_ns and resumed.charges == clock.charges
    assert resumed.fraction == clock.fraction
    with pytest.raises(BudgetError, match="same budget"):
        RstClock(t, 6.0).load_state_dict(clock.state_dict())


def test_the_main_models_fraction_starts_after_what_was_charged_before_it():
    """RHO-loss: the irreducible-loss model's cost is charged, then start_main; the schedules' fraction
    runs from 0 at the main model's start to 1 at the budget's end, and survives a resume."""
    clock = RstClock(table(), 4.0)
    clock.charge_seconds(1.0, "irreducible-loss model")
    clock.start_main()
    assert clock.fraction == 0.0
    clock.charge_seconds(1.5, "main steps")
    assert clock.fraction == 0.5 and clock.spent_s == 2.5
    resumed = RstClock(table(), 4.0)
    resumed.load_state_dict(json.loads(json.dumps(clock.state_dict())))
    assert resumed.fraction == 0.5
    clock.charge_seconds(1.5, "main steps")
    assert clock.fraction == 1.0


@pytest.mark.usefixtures("single_process_group")
def test_calibrate_rst_times_every_configuration_of_a_config(small_cfg, tmp_path, monkeypatch):
    """tools/research/calibrate_rst.py on the small test model: real engine steps, a table the clock reads."""
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "research" / "calibrate_rst.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as when run as a script (it adds tools/ for _cli.py)
    spec = importlib.util.spec_from_file_location("calibrate_rst", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg = small_cfg("model.vocab_size=512")
    args = argparse.Namespace(
        repeats=2,
        warmup=1,
        layers=None,
        forward_batches=[1.5, 2],  # 12 and 16 sequences: a fraction 2/3 or 1/2 scores them
        optimizers=["adamw", "sophia"],
        routings=None,
        statistic="median",
    )
    table = tool.calibrate(cfg, args, "test")
    saved = RstTable.load(table.save(tmp_path / "rst.json"))
    kinds = sorted((e.step.kind, e.step.optimizer, e.step.active_layers) for e in saved.entries)
    assert kinds == [
        ("forward", "none", 1),
        ("forward", "none", 1),
        ("forward", "none", 2),
        ("forward", "none", 2),
        ("hessian", "sophia", 1),
        ("hessian", "sophia", 2),
        ("train", "adamw", 1),
        ("train", "adamw", 2),
        ("train", "sophia", 1),
        ("train", "sophia", 2),
    ]
    assert all(len(e.samples) == 2 and min(e.samples) <= e.seconds <= max(e.samples) for e in saved.entries)
    assert saved.commit and saved.torch_version == torch.__version__ and saved.model["d_model"] == 64
    train = StepConfig(kind="train", active_layers=2, batch_size=8, micro_batch_size=4, seq_len=32)
    forward = StepConfig(kind="forward", active_layers=2, batch_size=16, micro_batch_size=4, seq_len=32)
    clock = RstClock(saved, budget_seconds=60)
    clock.charge([forward, train])
    assert clock.spent_s == pytest.approx(saved.seconds(forward) + saved.seconds(train), abs=1e-9)
    assert saved.seconds(
        StepConfig(kind="forward", active_layers=1, batch_size=12, micro_batch_size=4, seq_len=32)
    )
    with pytest.raises(SystemExit, match="--forward-batches 1.25: .* multiple of train.micro_batch_size 4"):
        tool.scoring_size(1.25, 8, 4)  # 10 sequences: not whole micro-batches


@pytest.mark.usefixtures("single_process_group")
@pytest.mark.parametrize("layout", [(0, False), (1, True)])
def test_rst_scheduler_drives_the_deepspeed_engines_lr(layout, tmp_path):
    """As dsmoe/train/engine.py passes its LambdaLR: the loop charges and syncs before each step, DeepSpeed
    steps the scheduler after the update, and the LR each step trains at is the schedule's at its end."""
    import deepspeed

    stage, bf16 = layout
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    t = table()
    config = step(layers=2)
    clock = RstClock(t, budget_seconds=4 * t.seconds(config))
    schedule = RstSchedule(shape="cosine", warmup_fraction=0.25)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=RstScheduler(optimizer, clock, schedule),
        config={
            "train_batch_size": 2,
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": bf16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
        },
    )
    trained_at = []
    while clock.fits(config):
        clock.charge(config)
        scheduler.sync()
        trained_at.append(engine.get_lr()[0])
        x = torch.randn(2, 4, dtype=torch.bfloat16 if bf16 else torch.float32)
        engine.backward(engine(x).float().square().mean())
        engine.step()
        assert engine.get_lr()[0] == trained_at[-1]  # DeepSpeed's scheduler.step() changed nothing
    expected = [0.1 * schedule.multiplier(f) for f in (0.25, 0.5, 0.75, 1.0)]
    assert trained_at == pytest.approx(expected, abs=1e-12) and trained_at[-1] == 0.0
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")  # DeepSpeed checkpoints it
