"""MSG growth inside a running DeepSpeed run (papers/msg.md; operators in dsmoe/growth.py).

At a growth event the engine's fp32 masters and Adam moments are read by parameter name (under expert or
tensor parallelism every rank's pieces are joined, parallel/layout.py), a plain model of the current shape
is built from them and grows (old values in place, new weights from the event's own seed, the same on every
rank), the run's parallel layout is applied to it again and the engine rebuilt around it, and the masters
and moments are set back, each rank its own pieces: old slices keep their moments, new entries start at
zero, the Adam step count, the engine's counters and the LR schedule position carry on.
"""

from __future__ import annotations

import copy
import gc

import torch

import parallel
from dsmoe import growth
from dsmoe.config import Config
from dsmoe.model import build
from dsmoe.train import checkpoint
from dsmoe.train import engine as engine_lib
from dsmoe.train.feature import Feature


def _release(engine) -> None:
    """Let the engine go: DeepSpeed's module hooks removed, its optimizer and buffers freed."""
    for attr in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        handle = getattr(engine, attr, None)
        if handle is not None:
            handle.remove()
    engine.destroy()


def apply_parallel(model, dims, dispatch: str, active: growth.Growth | None) -> None:
    """parallel.apply, with the masks of a growth under way moved onto the parallel modules that replace
    the plain ones (same paths), so a ramp runs the same under data parallelism as on one process."""
    paths = {id(m): name for name, m in model.named_modules()}
    parallel.apply(model, dims, dispatch)
    if active is not None:
        modules = dict(model.named_modules())
        active.masks = [(modules.get(paths.get(id(m)), m), attr, new) for m, attr, new in active.masks]
        active.set_c(active.c)


def _join_pieces(state: dict[str, torch.Tensor], dims, activation: str) -> dict[str, torch.Tensor]:
    """The whole model's tensors from every (tp, ep) position's pieces (one data-parallel replica's).
    Every rank ends up with all of them on its CPU: growth is rare, and each rank grows the same model."""
    import torch.distributed as dist

    mine = (dims.tp_rank, dims.ep_rank, state if dims.dp_rank == 0 else None)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    pieces: dict[str, dict] = {}
    for tp_rank, ep_rank, theirs in gathered:
        for name, t in (theirs or {}).items():
            pieces.setdefault(name, {})[(tp_rank, ep_rank)] = t
    return checkpoint.join_pieces(pieces, dims.tp, dims.ep, activation)


def rebuild_engine(engine, cfg: Config, dims, dispatch: str, transform, clock=None):
    """Change the shape of the engine's model mid-run; returns (new engine, what `transform` returned).

    Reads the exact fp32 masters and moments (joined over the layout's pieces), builds a plain model of the
    current shape holding the masters, and calls `transform(model, state)`, which changes that model in
    place and returns (moments of the new model as '<moment>/<name>' (CPU), a Growth whose masks must follow
    the model, or None). The run's parallel layout is applied again, a new engine built, and each rank's
    pieces of the new masters and moments set, with the engine's counters and LR position carried on.
    Growth events use it (grow_engine); so can other shape changes (NTNG's layer stacking, stack_engine).
    `clock`: the run's RST clock, when its LR follows a budget (dsmoe.train.engine.initialize)."""
    activation = cfg.model.moe.activation
    sharded = dims.ep > 1 or dims.tp > 1
    state = checkpoint.full_state(engine)  # collective under ZeRO: every rank calls it
    if sharded:
        state = _join_pieces(state, dims, activation)
    counters = checkpoint.engine_counters(engine)
    shape = copy.deepcopy(engine.module.cfg)  # the current shape; no growth mask is active here
    device = next(engine.module.parameters()).device
    _release(engine)
    del engine
    gc.collect()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        model = build(shape)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])
    moments, active = transform(model, state)
    carried = {name: p.detach().cpu() for name, p in model.named_parameters()}
    carried.update(moments)
    del state, moments
    if sharded:
        carried = checkpoint.local_pieces(carried, dims, activation)
    gc.collect()
    apply_parallel(model, dims, dispatch, active)
    new_engine = engine_lib.initialize(model, cfg, dims, clock)
    checkpoint.set_state(new_engine, carried, counters)
    return new_engine, active


def grow_engine(engine, cfg: Config, dims, event_index: int, dispatch: str = "tokens"):
    """Apply growth event `event_index` to the engine's model; returns (new engine, Growth at c = 0)."""
    event = cfg.growth.events[event_index]

    def grow(model, state):
        g = growth.apply_event(
            model, event, cfg.growth.init_std, growth.event_seed(cfg.train.seed, event_index)
        )
        moments = {}
        for key in sorted({name.split("/", 1)[0] for name in state if "/" in name}):  # the optimizer's
            old = {name[len(key) + 1 :]: v for name, v in state.items() if name.startswith(f"{key}/")}
            moments.update({f"{key}/{name}": v.cpu() for name, v in growth.carry_state(g, old).items()})
        return moments, g

    return rebuild_engine(engine, cfg, dims, dispatch, grow)


def stack_engine(engine, cfg: Config, dims, dispatch: str = "tokens", clock=None):
    """NTNG's layer stacking in a running engine: double the depth, new block L + i a copy of block i with
    its fp32 master and every optimizer moment (dsmoe.train.methods.stack_layers / stack_state); the
    optimizer's step count and the LR position carry on. Returns the new engine."""
    from dsmoe.train.methods import stack_layers, stack_state

    def stack(model, state):
        old = len(model.blocks)
        stack_layers(model)
        stacked = stack_state(state, old)
        return {name: v.cpu() for name, v in stacked.items() if "/" in name}, None

    new_engine, _ = rebuild_engine(engine, cfg, dims, dispatch, stack, clock)
    return new_engine


class Growth(Feature):
    """MSG growth as a training feature (dsmoe/train/feature.py): a resumed run gets the shapes and masks its
    checkpoint was saved with; each step sets the running event's ramp c (its masks go at c = 1, before any
    next event); at an event's step the engine is rebuilt around the grown model (new parts at c = 0)."""

    def model_built(self, trainer, model) -> None:
        if trainer.resume_from:
            trainer.active_growth = growth.replay(
                model, trainer.cfg.growth, trainer.steps_done, trainer.cfg.train.seed
            )

    def before_step(self, trainer, step: int) -> None:
        active = trainer.active_growth
        if active is not None:
            e = active.event
            active.set_c(growth.ramp(step, e.step, e.ramp_steps))
            if active.c == 1.0:
                active.finish()
                trainer.active_growth = None
        for index, event in enumerate(trainer.cfg.growth.events):
            if event.step == step:
                trainer.engine, trainer.active_growth = grow_engine(
                    trainer.engine, trainer.cfg, trainer.dims, index, trainer.dispatch
                )
                if trainer.dims.is_main:
                    print(
                        f"step {step}: grew {event.dim} to {event.size} "
                        f"({trainer.engine.module.num_params() / 1e6:.2f}M params), ramp over {event.ramp_steps} steps",
                        flush=True,
                    )
