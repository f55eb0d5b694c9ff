"""A training run under an RST budget with one of NTNG's methods (papers/no_train_no_gain.md): what the loop
asks before, during and after each step. The pure parts are dsmoe/train/budget.py (table, clock, schedules)
and dsmoe/train/methods.py; this module decides each step's passes, charges them, and runs the parts that
are not a plain training step (scoring forwards, the irreducible-loss model, Sophia-G's Hessian pass).

Every step's plan is a pure function of (step, the spent budget, the model's depth), so a run stops at the
same step whichever machine runs it, and a resumed run continues its budget (the clock is checkpointed).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsmoe.config import Config, ConfigError
from dsmoe.train.budget import RstClock, RstTable, RstTableError, StepConfig
from dsmoe.train.feature import Feature
from dsmoe.train.methods import (
    LayerDropSchedule,
    per_sequence_loss,
    reducible_loss,
    run_blocks,
    sample_active_layers,
    select_highest,
    stacked_layers_at,
)

SECONDS_PER_HOUR = 3600.0
BATCH_SELECTION = ("selective_backprop", "rho_loss")


def scoring_batch_size(cfg: Config) -> int:
    """Batch selection's forward batch: global_batch_size / fraction sequences (config load checks it is whole)."""
    return round(cfg.train.global_batch_size / cfg.train.method.fraction)


def scoring_micro_batches(cfg: Config, dims) -> int:
    """Micro-batches of the scoring forward each data-parallel rank runs per step (batch selection: the
    forward batch of global_batch_size / fraction sequences split like a training batch); the loop calls it
    at start, so a layout the forward batch does not split over is refused before any work. 0: the method
    scores nothing."""
    t, m = cfg.train, cfg.train.method
    if m.name not in BATCH_SELECTION:
        return 0
    forward_batch = scoring_batch_size(cfg)
    per_pass = t.micro_batch_size * dims.batch_ranks
    if forward_batch % per_pass:
        raise ConfigError(
            f"train.method.name={m.name}: the scoring batch train.global_batch_size / train.method.fraction = "
            f"{t.global_batch_size} / {m.fraction} = {forward_batch} must be a multiple of train.micro_batch_size "
            f"x the data-parallel ranks ({t.micro_batch_size} x {dims.batch_ranks} = {per_pass}): change "
            "train.method.fraction, train.global_batch_size, train.micro_batch_size or the number of ranks"
        )
    return forward_batch // per_pass


def gather_scores(scores_local: torch.Tensor, dims, micro_batch_size: int) -> torch.Tensor:
    """(forward batch,) scores of the whole forward batch in sample order, the same on every rank, from
    each rank's scores of its micro-batches (rank r's micro-batch m holds samples (m * ranks + r) * micro
    onwards, PackedSampler.micro_batch), gathered over the data-parallel group."""
    local_MS = scores_local.reshape(-1, micro_batch_size)  # (micro-batches, micro)
    if dims.batch_ranks == 1:
        return local_MS.flatten()
    gathered = [torch.empty_like(local_MS) for _ in range(dims.batch_ranks)]
    dist.all_gather(gathered, local_MS.contiguous(), group=dims.data_group)
    return torch.stack(gathered, dim=1).flatten()  # (micro-batches, ranks, micro) -> sample order


def rank_share(chosen: torch.Tensor, dims, micro_batch_size: int) -> torch.Tensor:
    """(micro-batches, micro) this rank's part of the chosen samples (ascending offsets, global_batch_size
    of them), dealt as PackedSampler.micro_batch deals a training batch: every rank gets as many."""
    return chosen.reshape(-1, dims.batch_ranks, micro_batch_size)[:, dims.batch_rank]


@dataclass
class StepPlan:
    """What one step executes: the blocks that run, and the passes charged to the clock."""

    depth: int
    """Blocks the model has (layer stacking grows it)."""
    active: list[int]
    """Indices of the blocks that run (layer dropping skips some)."""
    passes: list[StepConfig] = field(default_factory=list)
    hessian: bool = False
    """Sophia-G: a Gauss-Newton-Bartlett pass after this step's update."""


def routing_of(cfg: Config) -> str:
    return cfg.model.moe.training if cfg.model.mlp == "moe" else "dense"


class BudgetedRun:
    """The budget and method state of one run (rank-identical: every rank plans the same steps)."""

    def __init__(self, cfg: Config, dims, saved: dict | None = None):
        self.cfg, self.dims = cfg, dims
        t, b = cfg.train, cfg.train.budget
        self.method = t.method
        self.table = RstTable.load(b.reference)
        self.table.check_model(_model_dict(cfg))
        self.clock = RstClock(self.table, b.rst_hours * SECONDS_PER_HOUR)
        self.wall_before = 0.0
        self.started = time.perf_counter()
        self.depth = cfg.model.n_layers
        if self.method.name == "layer_stacking":
            self.depth = cfg.model.n_layers // 2 ** len(self.method.stack_at)
        if saved:
            self.clock.load_state_dict(saved["clock"])
            self.wall_before = float(saved["wall_s"])
            self.depth = int(saved["depth"])
        self.irreducible = None
        """RHO-loss's irreducible-loss model (a plain module, eval mode)."""
        self.drop = LayerDropSchedule(theta_bar=self.method.theta_bar, gamma=self.method.gamma)
        self.check_table()

    # --- accounting -------------------------------------------------------------------------------------

    def _pass(self, kind: str, layers: int, batch: int, optimizer: str | None = None) -> StepConfig:
        t = self.cfg.train
        return StepConfig(
            kind=kind,
            active_layers=layers,
            batch_size=batch,
            micro_batch_size=t.micro_batch_size,
            seq_len=self.cfg.data.seq_len,
            routing=routing_of(self.cfg),
            optimizer=optimizer or t.optimizer,
        )

    @property
    def scoring_batch(self) -> int:
        return scoring_batch_size(self.cfg)

    @property
    def irreducible_layers(self) -> int:
        return self.method.irreducible_layers or self.cfg.model.n_layers

    def plan(self, step: int) -> StepPlan:
        """The passes of optimizer step `step` (0-based), at the budget spent before it."""
        t, m = self.cfg.train, self.method
        fraction = self.clock.fraction
        depth = self.depth
        if m.name == "layer_stacking":
            depth = max(depth, stacked_layers_at(fraction, self.cfg.model.n_layers, m.stack_at))
        active = list(range(depth))
        if m.name == "layer_drop":
            generator = torch.Generator().manual_seed(t.seed * 1_000_003 + step)
            active = sample_active_layers(self.drop.keep_probs(fraction, depth), generator) or [0]
        passes = []
        if m.name in BATCH_SELECTION:
            passes.append(self._pass("forward", depth, self.scoring_batch))
        if m.name == "rho_loss":
            passes.append(self._pass("forward", self.irreducible_layers, self.scoring_batch))
        passes.append(self._pass("train", len(active), t.global_batch_size))
        hessian = t.optimizer == "sophia" and (step + 1) % t.sophia_hessian_interval == 0
        if hessian:
            passes.append(self._pass("hessian", depth, t.global_batch_size))
        return StepPlan(depth=depth, active=active, passes=passes, hessian=hessian)

    def reachable_depths(self) -> list[int]:
        """Every depth the model can have from now to the budget's end: layer stacking doubles it up to
        model.n_layers (plan() takes the same steps, stacked_layers_at); other methods keep it."""
        if self.method.name != "layer_stacking":
            return [self.depth]
        depths = [self.depth]
        while depths[-1] < self.cfg.model.n_layers:
            depths.append(2 * depths[-1])
        return depths

    def possible_passes(self) -> set[StepConfig]:
        """Every pass this run can charge, from now to the budget's end (plan()'s passes at every reachable
        depth, and RHO-loss's irreducible-loss steps): all of them, not those of a sample of steps, so a
        table that lacks one is refused before any work instead of failing mid-run."""
        t, m = self.cfg.train, self.method
        passes = set()
        if m.name == "rho_loss":
            passes.add(self._pass("train", self.irreducible_layers, t.global_batch_size, "adamw"))
            passes.add(self._pass("forward", self.irreducible_layers, self.scoring_batch))
        # Layer dropping: once theta < 1 every block's keep probability is in (0, 1), so any number of
        # blocks may run (none runs as block 0 alone); with theta_bar 1 or gamma 0 no block is ever dropped.
        drops = m.name == "layer_drop" and m.theta_bar < 1.0 and m.gamma > 0.0
        for depth in self.reachable_depths():
            for active in range(1, depth + 1) if drops else [depth]:
                passes.add(self._pass("train", active, t.global_batch_size))
            if m.name in BATCH_SELECTION:
                passes.add(self._pass("forward", depth, self.scoring_batch))
            if t.optimizer == "sophia":
                passes.add(self._pass("hessian", depth, t.global_batch_size))
        return passes

    def check_table(self) -> None:
        """Refuse a table that lacks any pass the run can execute, naming each and how to calibrate it."""
        missing = sorted(
            (p for p in self.possible_passes() if p not in self.table),
            key=lambda p: (p.kind, p.active_layers, p.batch_size, p.optimizer, p.routing),
        )
        if not missing:
            return
        t = self.cfg.train
        hint = ["--layers " + " ".join(str(n) for n in sorted({p.active_layers for p in missing}))]
        optimizers = sorted({p.optimizer for p in missing} - {"none"})
        if optimizers:
            hint.append("--optimizers " + " ".join(optimizers))
        forwards = sorted({p.batch_size for p in missing if p.kind == "forward"})
        if forwards:  # calibrate_rst times scoring batches as multiples of the global batch
            hint.append("--forward-batches " + " ".join(f"{b / t.global_batch_size:g}" for b in forwards))
        if any(p.routing == "sparse" for p in missing):
            hint.append("--routings sparse")
        raise RstTableError(
            f"the RST table {self.table.source} (device {self.table.device}) lacks {len(missing)} step "
            f"configuration(s) that train.method.name={self.method.name} with train.optimizer={t.optimizer} "
            f"can execute in this run: {'; '.join(p.describe() for p in missing)}. Calibrate them on the "
            f"reference device with tools/research/calibrate_rst.py and this run's config ({' '.join(hint)}), or "
            "point train.budget.reference at a table that has them"
        )

    def fits(self, plan: StepPlan) -> bool:
        return self.clock.fits(plan.passes)

    def charge(self, plan: StepPlan, engine, step: int) -> None:
        """Pay for step `step` before it runs and set its LR: that of the budget fraction it ends at, or the
        schedule's final value when no further step fits (plans are pure functions of the clock and step)."""
        self.clock.charge(plan.passes)
        engine.lr_scheduler.sync(last=not self.fits(self.plan(step + 1)))

    def wall_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def state(self) -> dict:
        return {"clock": self.clock.state_dict(), "wall_s": self.wall_s(), "depth": self.depth}

    # --- data and methods -------------------------------------------------------------------------------

    def train_tokens(self, tokens):
        """The tokens the main model trains on: RHO-loss holds out the end of the training split."""
        if self.method.name != "rho_loss":
            return tokens
        return tokens[: len(tokens) - self._holdout_len(tokens)]

    def _holdout_len(self, tokens) -> int:
        return int(len(tokens) * self.method.holdout_fraction)

    def train_irreducible(self, tokens, charge: bool) -> None:
        """RHO-loss: train the irreducible-loss model (same shape, irreducible_layers blocks) on the held-out
        end of the training tokens for irreducible_steps AdamW steps of the run's batch, through its own
        DeepSpeed engine; each step is charged to the clock (`charge`: not when a resumed run rebuilds it,
        its cost is already in the checkpointed clock). Deterministic from the run's seed."""
        from dsmoe.data import PackedSampler
        from dsmoe.model import build
        from dsmoe.train import engine as engine_lib

        cfg = copy.deepcopy(self.cfg)
        t, m = cfg.train, self.method
        cfg.model.n_layers = self.irreducible_layers
        t.optimizer, t.max_steps = "adamw", m.irreducible_steps
        t.warmup_steps = min(t.warmup_steps, m.irreducible_steps // 10)
        holdout = tokens[len(tokens) - self._holdout_len(tokens) :]
        sampler = PackedSampler(holdout, cfg.data.seq_len, t.seed + 7)
        passes = [self._pass("train", self.irreducible_layers, t.global_batch_size, "adamw")]
        if charge:
            self.clock.require_one_step(passes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed + 7)
            engine = engine_lib.initialize(build(cfg.model), cfg, self.dims)
            gas = engine_lib.gradient_accumulation_steps(cfg, self.dims)
            for step in range(m.irreducible_steps):
                for micro in range(gas):
                    x, y = sampler.micro_batch(
                        step,
                        micro,
                        self.dims.batch_rank,
                        self.dims.batch_ranks,
                        t.micro_batch_size,
                        t.global_batch_size,
                    )
                    engine.backward(engine(x.to(self.dims.device), y.to(self.dims.device)).loss)
                    if micro < gas - 1:
                        engine.step()
                    else:
                        engine_lib.boundary_step(engine)
                if charge:
                    self.clock.charge(passes)
        if charge:  # the main model's schedule spans what is left (resumed: the clock already knows)
            self.clock.start_main()
        self.irreducible = engine.module.eval()
        engine.destroy()

    @torch.no_grad()
    def _scores(self, module, rows: list, active: list[int] | None = None) -> torch.Tensor:
        """(rows,) per-sequence losses of `module` over the micro-batches `rows` (no gradient)."""
        was_training = module.training
        out = []
        with run_blocks(module, active if active is not None else range(len(module.blocks))):
            for x, y in rows:
                out.append(per_sequence_loss(module(x.to(self.dims.device)).logits, y.to(self.dims.device)))
        module.train(was_training)
        return torch.cat(out)

    def batches(self, step: int, sampler, engine, gas: int) -> list:
        """This rank's training micro-batches of step `step`: the plain ones, or for batch selection the
        highest-scoring `fraction` of the step's whole forward batch of global_batch_size / fraction
        sequences (selective backprop: by the current loss; RHO-loss: by the loss minus the irreducible
        loss). Selection is global, as on the one reference device: each rank scores its share of the
        forward batch, the scores are gathered, every rank picks the same top sequences, and each trains on
        an equal part of them (re-read from the sampler), so any data-parallel layout trains on the same
        sequences."""
        t, d = self.cfg.train, self.dims
        if self.method.name not in BATCH_SELECTION:
            return [
                sampler.micro_batch(
                    step, micro, d.batch_rank, d.batch_ranks, t.micro_batch_size, t.global_batch_size
                )
                for micro in range(gas)
            ]
        big = self.scoring_batch
        rows = [
            sampler.micro_batch(step, micro, d.batch_rank, d.batch_ranks, t.micro_batch_size, big)
            for micro in range(scoring_micro_batches(self.cfg, d))
        ]
        scores = self._scores(engine.module, rows)
        if self.method.name == "rho_loss":
            scores = reducible_loss(scores, self._scores(self.irreducible, rows))
        chosen = select_highest(gather_scores(scores, d, t.micro_batch_size), self.method.fraction).cpu()
        mine = rank_share(chosen, d, t.micro_batch_size)  # (gas, micro) offsets in the forward batch
        return [sampler.samples((step * big + offsets).tolist()) for offsets in mine]

    def hessian_pass(self, engine, batches: list) -> None:
        """Sophia-G's Gauss-Newton-Bartlett pass over this step's batch: the cross-entropy against labels
        sampled from the model's own softmax, backpropagated, and handed to the optimizer's Hessian EMA
        (engine step with hessian_pass set: DeepSpeed reduces the gradients, the parameters stay). Not
        clipped: the estimate is of the curvature, not a step."""
        from dsmoe.train import engine as engine_lib
        from dsmoe.train.optim import sample_gnb_targets

        generator = torch.Generator(device=self.dims.device).manual_seed(
            self.cfg.train.seed * 1_000_003 + engine.global_steps
        )
        clip, engine.dsmoe_clip = engine.dsmoe_clip, 0.0
        try:
            for micro, (x, _) in enumerate(batches):
                logits = engine(x.to(self.dims.device)).logits
                targets = sample_gnb_targets(logits, generator)
                engine.backward(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()))
                if micro < len(batches) - 1:
                    engine.step()
                else:
                    engine.basic_optimizer.hessian_pass = True
                    engine_lib.boundary_step(engine)
        finally:
            engine.dsmoe_clip = clip
            engine.basic_optimizer.hessian_pass = (
                False  # a skipped (non-finite) pass must not eat the next step
            )


def _model_dict(cfg: Config) -> dict:
    from dsmoe import config as config_lib

    return config_lib.to_dict(cfg)["model"]


class BudgetedTraining(Feature):
    """No Train No Gain as a training feature (dsmoe/train/feature.py): the reference-time budget decides when
    the run ends and the LR schedule; its method stacks layers, drops them, selects batches or adds Sophia's
    Hessian pass. Every rank plans the same steps (BudgetedRun)."""

    def setup(self, trainer) -> None:
        cfg, dims = trainer.cfg, trainer.dims
        scoring_micro_batches(cfg, dims)  # a batch-selection scoring batch the layout cannot split
        saved = trainer.resumed.get("budget") if trainer.resumed else None
        self.run = BudgetedRun(cfg, dims, saved)
        trainer.clock, trainer.max_steps, trainer.use_loader = self.run.clock, None, False  # batches: ours
        self.plan: StepPlan | None = None

    def before_model(self, trainer) -> None:
        trainer.model_cfg.n_layers = self.run.depth  # layer stacking starts shallow
        if (
            trainer.cfg.train.method.name == "rho_loss"
        ):  # the irreducible-loss model first (its cost is charged)
            self.run.train_irreducible(trainer.token_data.train, charge=not trainer.resume_from)
        trainer.train_tokens = self.run.train_tokens(trainer.token_data.train)

    def started(self, trainer) -> None:
        self.plan = self.run.plan(trainer.start_step)
        if trainer.start_step == 0:
            self.run.clock.require_one_step(self.plan.passes)
        trainer.finished = not self.run.fits(self.plan)

    def before_step(self, trainer, step: int) -> None:
        from dsmoe.train.grow import stack_engine

        while self.plan.depth > self.run.depth:  # layer stacking: double the depth as often as the plan says
            trainer.engine = stack_engine(
                trainer.engine, trainer.cfg, trainer.dims, trainer.dispatch, self.run.clock
            )
            self.run.depth = len(trainer.engine.module.blocks)
            if trainer.dims.is_main:
                print(f"step {step}: stacked to {self.run.depth} layers", flush=True)
        self.run.charge(self.plan, trainer.engine, step)

    def batches(self, trainer, step: int) -> list:  # batch selection scores a larger batch first
        return self.run.batches(step, trainer.sampler, trainer.engine, trainer.gas)

    def active_blocks(self, trainer, step: int) -> list[int] | None:  # layer dropping
        return self.plan.active if len(self.plan.active) < self.plan.depth else None

    def after_update(self, trainer, step: int, batches: list) -> None:
        if self.plan.hessian:  # Sophia-G's curvature estimate, after the update
            self.run.hessian_pass(trainer.engine, batches)

    def after_step(self, trainer, step: int, record: dict) -> None:
        clock = self.run.clock
        record.update(rst_s=clock.spent_s, wall_s=self.run.wall_s(), active_layers=len(self.plan.active))
        self.plan = self.run.plan(step + 1)
        trainer.finished = not self.run.fits(self.plan)

    def state(self) -> dict:
        return {"budget": self.run.state()}

    def finish(self, trainer) -> None:
        c, result = self.run.clock, trainer.result
        result.budget = dict(
            rst_s=c.spent_s,
            budget_s=c.budget_s,
            wall_s=self.run.wall_s(),
            finished=trainer.finished,
            charges={p.describe(): n for p, n in c.charges.items()},
            clock=c.state_dict(),
        )
        if trainer.dims.is_main:
            print(
                f"RST budget: {c.spent_s:.2f} s of {c.budget_s:.2f} s spent in {result.steps} steps"
                + (" (finished)" if trainer.finished else "")
                + f"; wall {result.budget['wall_s']:.1f} s",
                flush=True,
            )
