"""Reference system time (RST) budgets (papers/no_train_no_gain.md): the calibrated table, the clock that
charges each executed pass, and learning-rate schedules over the spent fraction of the budget.

A run on any hardware adds, for every pass it executes, the time that pass took on one reference device
(`RstTable`, written by tools/research/calibrate_rst.py), and stops before a step that no longer fits the budget.
Step cost then depends only on the step's configuration, never on the machine: two runs of a static
configuration stop at the same step wherever they run. Charges are summed in integer nanoseconds, so the
total is exact and independent of summation order.

Every schedule is a function of the budget fraction spent when a step *ends*: the step that spends the
budget exactly trains at the final learning rate (NTNG's fully-decayed baseline: the LR decays to its
final value at the end of the budget, not at some step count). The fraction is of the main model's budget:
what is left after costs charged before its first step (RHO-loss's irreducible-loss model), so its warmup
starts at its first step however much an auxiliary model spent.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from dsmoe.config import ConfigError

PASS_KINDS = ("train", "forward", "hessian")
TABLE_FORMAT = 1


class RstTableError(ConfigError):
    """An RST table is missing, malformed, or lacks the configuration a run executes."""


class BudgetError(ConfigError):
    """An RST budget is impossible (not positive, or too small for a single step)."""


@dataclass(frozen=True, kw_only=True)
class StepConfig:
    """One kind of pass a method can execute, as the reference device runs it (the key of a table entry).

    kind 'train': one optimizer step over batch_size sequences in micro-batches of micro_batch_size
    (forward + backward each, then the optimizer step). 'forward': a no-grad forward over batch_size
    sequences (the scoring passes of selective backprop and RHO-loss). 'hessian': Sophia-G's
    Gauss-Newton-Bartlett pass (forward, labels sampled from the logits, backward, Hessian EMA update).
    """

    kind: Literal["train", "forward", "hessian"] = "train"
    active_layers: int
    """Transformer blocks that run (layer dropping, stacking, and RHO-loss's smaller irreducible-loss model
    change it)."""
    batch_size: int
    micro_batch_size: int
    seq_len: int
    routing: Literal["dense", "sparse"] = "dense"
    """DS-MoE training: every expert (dense) or top-K experts per token (model.moe.training=sparse)."""
    optimizer: str = "adamw"
    """adamw | lion | sophia; 'none' for forward passes, which take no optimizer step."""

    def __post_init__(self):
        if self.kind not in PASS_KINDS:
            raise ValueError(f"StepConfig.kind must be one of {', '.join(PASS_KINDS)}, got {self.kind!r}")
        if self.kind == "forward" and self.optimizer != "none":
            object.__setattr__(self, "optimizer", "none")  # a forward pass costs the same under any optimizer
        for name in ("active_layers", "batch_size", "micro_batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"StepConfig.{name} must be positive, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"StepConfig.batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )

    def describe(self) -> str:
        return (
            f"{self.kind} pass: {self.active_layers} active layers, batch {self.batch_size} in micro-batches of "
            f"{self.micro_batch_size}, seq_len {self.seq_len}, {self.routing} routing, optimizer {self.optimizer}"
        )


@dataclass(kw_only=True)
class RstEntry:
    """The reference time of one step configuration: the median of the timed repeats."""

    step: StepConfig
    seconds: float
    samples: list[float] = field(default_factory=list)
    """Every timed repeat (seconds), for judging the spread."""


@dataclass(kw_only=True)
class RstTable:
    """Reference times of every step configuration a run may execute, measured on one device."""

    device: str
    date: str
    commit: str
    torch_version: str
    entries: list[RstEntry]
    command: str = ""
    precision: str = "fp32"
    model: dict = field(default_factory=dict)
    """The model config the table was measured with (dsmoe.config.ModelConfig as a dict)."""
    timing: str = ""
    """How the entries were timed (engine, warmup, repeats, statistic)."""
    source: str = field(default="(in memory)", compare=False)
    """The file it was loaded from (not saved): error messages name it."""

    def __post_init__(self):
        seen: dict[StepConfig, float] = {}
        for entry in self.entries:
            if entry.step in seen:
                raise RstTableError(f"{self.source}: two entries for {entry.step.describe()}")
            if not (math.isfinite(entry.seconds) and entry.seconds > 0):
                raise RstTableError(
                    f"{self.source}: {entry.step.describe()} has reference time {entry.seconds!r}; "
                    "every entry must be a positive number of seconds"
                )
            seen[entry.step] = entry.seconds
        self._seconds = seen

    def seconds(self, step: StepConfig) -> float:
        """The reference time of `step`; a configuration the table lacks is an error naming both."""
        try:
            return self._seconds[step]
        except KeyError:
            near = [e.step.describe() for e in self.entries if e.step.kind == step.kind][:6]
            raise RstTableError(
                f"the RST table {self.source} (device {self.device}) has no entry for the {step.describe()}; "
                f"calibrate it (tools/research/calibrate_rst.py) with this configuration. Entries of that kind: "
                + ("; ".join(near) if near else "none")
            ) from None

    def __contains__(self, step: StepConfig) -> bool:
        return step in self._seconds

    def nanoseconds(self, step: StepConfig) -> int:
        return round(self.seconds(step) * 1e9)

    def check_model(self, model: dict, what: str = "this run's model") -> None:
        """Refuse a table measured for another model shape: its times would not be this model's.

        n_layers and moe.training are per entry (active_layers, routing); vocab_size is resolved from the
        tokenizer at run time. An option the table does not name (added to ModelConfig after it was
        calibrated) matches when the run leaves it at its default, which is what the table's model ran."""
        from dsmoe.config import ModelConfig

        ours, theirs = _flatten(self.model), _flatten(model)
        if not ours:
            return
        defaults = _flatten(dataclasses.asdict(ModelConfig()))
        diffs = [
            f"{k}: table {ours.get(k)!r}, {what} {theirs.get(k)!r}"
            for k in sorted(ours.keys() | theirs.keys())
            if k not in ("n_layers", "vocab_size", "moe.training")
            and ours.get(k, defaults.get(k)) != theirs.get(k)
        ]
        if diffs:
            raise RstTableError(
                f"the RST table {self.source} was calibrated for another model ({'; '.join(diffs)}); "
                "calibrate one for this model"
            )

    def to_dict(self) -> dict:
        out = {"format": TABLE_FORMAT}
        for f in dataclasses.fields(self):
            if f.name in ("source", "entries"):
                continue
            out[f.name] = getattr(self, f.name)
        out["entries"] = [
            {**dataclasses.asdict(e.step), "seconds": e.seconds, "samples": e.samples} for e in self.entries
        ]
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> RstTable:
        """Read a table written by `save`; a missing file or malformed entry names the file."""
        path = Path(path)
        if not path.is_file():
            raise RstTableError(
                f"RST table not found: {path}; write one with tools/research/calibrate_rst.py on the reference device"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RstTableError(f"{path}: not valid JSON: {e}") from None
        if data.get("format") != TABLE_FORMAT:
            raise RstTableError(
                f"{path}: unknown RST table format {data.get('format')!r} (expected {TABLE_FORMAT})"
            )
        step_fields = {f.name for f in dataclasses.fields(StepConfig)}
        try:
            entries = [
                RstEntry(
                    step=StepConfig(**{k: v for k, v in raw.items() if k in step_fields}),
                    seconds=float(raw["seconds"]),
                    samples=list(raw.get("samples", [])),
                )
                for raw in data["entries"]
            ]
            meta = {k: data[k] for k in ("device", "date", "commit", "torch_version")}
        except (KeyError, TypeError, ValueError) as e:
            raise RstTableError(f"{path}: malformed RST table ({type(e).__name__}: {e})") from None
        extra = {k: data[k] for k in ("command", "precision", "model", "timing") if k in data}
        return cls(**meta, **extra, entries=entries, source=str(path))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


class RstClock:
    """Reference time spent by a run: each executed pass adds its table entry; the run stops before a
    step that would overrun the budget. State (spent time, charges per configuration) is checkpointable."""

    def __init__(self, table: RstTable, budget_seconds: float):
        if not (math.isfinite(budget_seconds) and budget_seconds > 0):
            raise BudgetError(f"the RST budget must be a positive number of seconds, got {budget_seconds!r}")
        self.table = table
        self.budget_ns = round(budget_seconds * 1e9)
        self.spent_ns = 0
        self.charges: Counter[StepConfig] = Counter()
        self.extra: dict[str, int] = {}
        """Lump charges (ns) for costs measured elsewhere, e.g. training RHO-loss's irreducible-loss model."""
        self.main_start_ns = 0
        """Spent before the main model's first step (start_main): its schedule spans the rest."""

    @property
    def budget_s(self) -> float:
        return self.budget_ns / 1e9

    @property
    def spent_s(self) -> float:
        return self.spent_ns / 1e9

    @property
    def fraction(self) -> float:
        """Share of the main model's budget spent, in [0, 1]: what the schedules and methods read. That
        budget is what start_main left, so the warmup begins at the main model's first step and the decay
        still ends exactly at the budget's end."""
        main_ns = max(1, self.budget_ns - self.main_start_ns)  # an exhausted budget: require_one_step says so
        return min(1.0, max(0, self.spent_ns - self.main_start_ns) / main_ns)

    def start_main(self) -> None:
        """Mark the main model's start: what was spent so far (an auxiliary model's training) is outside
        its schedule."""
        self.main_start_ns = self.spent_ns

    def cost_ns(self, passes: list[StepConfig] | StepConfig) -> int:
        passes = [passes] if isinstance(passes, StepConfig) else passes
        return sum(self.table.nanoseconds(p) for p in passes)

    def fits(self, passes: list[StepConfig] | StepConfig) -> bool:
        """Whether the passes of the next step fit in what is left of the budget."""
        return self.spent_ns + self.cost_ns(passes) <= self.budget_ns

    def charge(self, passes: list[StepConfig] | StepConfig) -> float:
        """Add the reference time of the passes one step executes; returns that step's seconds."""
        passes = [passes] if isinstance(passes, StepConfig) else passes
        cost = self.cost_ns(passes)
        self.spent_ns += cost
        self.charges.update(passes)
        return cost / 1e9

    def charge_seconds(self, seconds: float, what: str) -> None:
        """Charge reference time measured elsewhere (an auxiliary model's whole training, say)."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise BudgetError(f"cannot charge {seconds!r} s of RST for {what}")
        ns = round(seconds * 1e9)
        self.spent_ns += ns
        self.extra[what] = self.extra.get(what, 0) + ns

    def require_one_step(
        self, passes: list[StepConfig] | StepConfig, budget_key: str = "train.budget"
    ) -> None:
        """Fail before any work when the budget cannot pay for even one step of `passes`."""
        cost = self.cost_ns(passes)
        if cost > self.budget_ns - self.spent_ns:
            what = "; ".join(p.describe() for p in ([passes] if isinstance(passes, StepConfig) else passes))
            already = f" after {self.spent_s:.3f} s already charged" if self.spent_ns else ""
            raise BudgetError(
                f"{budget_key}: the budget of {self.budget_s:.3f} s RST{already} cannot pay for one step "
                f"({cost / 1e9:.3f} s on {self.table.device} per {self.table.source}: {what}); raise the budget "
                "or make the step smaller"
            )

    def state_dict(self) -> dict:
        return {
            "budget_ns": self.budget_ns,
            "spent_ns": self.spent_ns,
            "charges": [[dataclasses.asdict(step), n] for step, n in self.charges.items()],
            "extra": dict(self.extra),
            "main_start_ns": self.main_start_ns,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["budget_ns"] != self.budget_ns:
            raise BudgetError(
                f"the checkpoint was trained under an RST budget of {state['budget_ns'] / 1e9:.3f} s, this run has "
                f"{self.budget_s:.3f} s: the schedules would jump; resume with the same budget"
            )
        self.spent_ns = int(state["spent_ns"])
        self.charges = Counter({StepConfig(**step): n for step, n in state["charges"]})
        self.extra = dict(state["extra"])
        self.main_start_ns = int(state.get("main_start_ns", 0))  # absent: saved before it existed


SCHEDULES = ("linear", "cosine", "one_cycle")


@dataclass(frozen=True, kw_only=True)
class RstSchedule:
    """Learning-rate multiplier as a function of the spent budget fraction f in [0, 1].

    linear / cosine: linear warmup from 0 to 1 over [0, warmup_fraction], then linear or cosine decay to
    final_ratio at f = 1. one_cycle: Smith's one-cycle as torch's OneCycleLR shapes it, over RST: cosine
    from initial_ratio up to 1 at warmup_fraction, then cosine down to final_ratio at f = 1.
    """

    shape: Literal["linear", "cosine", "one_cycle"] = "linear"
    warmup_fraction: float = 0.0
    final_ratio: float = 0.0
    """NTNG's baseline decays fully: 0."""
    initial_ratio: float = 0.04
    """one_cycle only: the starting multiplier (OneCycleLR's 1 / div_factor, 1/25)."""

    def __post_init__(self):
        if self.shape not in SCHEDULES:
            raise ValueError(f"schedule shape must be one of {', '.join(SCHEDULES)}, got {self.shape!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 <= self.final_ratio <= 1.0 or not 0.0 <= self.initial_ratio <= 1.0:
            raise ValueError("final_ratio and initial_ratio must be in [0, 1]")

    def multiplier(self, fraction: float) -> float:
        f = min(max(fraction, 0.0), 1.0)
        w = self.warmup_fraction
        if f >= 1.0:
            return self.final_ratio  # exactly, whatever rounding the formulas below would give
        if f < w:
            if self.shape == "one_cycle":
                return _cosine_between(self.initial_ratio, 1.0, f / w)
            return f / w
        progress = (f - w) / (1.0 - w)
        if self.shape == "linear":
            return 1.0 + (self.final_ratio - 1.0) * progress
        return _cosine_between(1.0, self.final_ratio, progress)


def _cosine_between(start: float, end: float, progress: float) -> float:
    """Cosine annealing from start (progress 0) to end (progress 1)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class RstScheduler(torch.optim.lr_scheduler.LRScheduler):
    """The optimizer's LR as base_lr x schedule(clock.fraction).

    The LR is a pure function of the clock, so stepping the scheduler any number of times gives the same
    value: the loop charges a step and calls `sync()` before the step runs (the step then trains at the
    fraction it ends at), and DeepSpeed's own scheduler.step() after the update changes nothing. Its
    state_dict leaves the clock out: the clock's state is checkpointed with the run's own state.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, clock: RstClock, schedule: RstSchedule):
        self.clock, self.schedule = clock, schedule
        self.last_step = False
        """Set by sync(last=True): the run's last step trains at the schedule's end, budget spent or not."""
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        m = self.schedule.multiplier(1.0 if self.last_step else self.clock.fraction)
        return [base * m for base in self.base_lrs]

    def sync(self, last: bool = False) -> None:
        """Set the LR from the clock now (what step() does, without torch's call-order bookkeeping, which
        would warn about a scheduler stepped before its optimizer). `last`: no further step fits the budget,
        so this one takes the schedule's final value (the leftover budget, less than a step, goes unused)."""
        self.last_step = last
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k not in ("clock", "schedule")}
