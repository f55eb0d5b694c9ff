"""MSG growth inside a running DeepSpeed run (papers/msg.md; operators in dsmoe/growth.py).

At a growth event the engine's fp32 masters and Adam moments are read by parameter name, the plain model
grows (old values in place, new weights from the event's own seed), the engine is rebuilt around it, and the
masters and moments are set back: old slices keep their moments, new entries start at zero, the Adam step
count, the engine's counters and the LR schedule position carry on.
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
from parallel import engine as engine_lib


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


def grow_engine(engine, cfg: Config, dims, event_index: int, dispatch: str = "tokens"):
    """Apply growth event `event_index` to the engine's model; returns (new engine, Growth at c = 0).

    The model grows as a plain model (the parallel layers of a multi-rank run are rebuilt around it), from
    the exact fp32 masters, not the bf16 copies the engine computed with."""
    if dims.ep > 1 or dims.tp > 1:  # config.py refuses this; full_state would hold only this rank's shards
        raise NotImplementedError("growth under expert or tensor parallelism")
    state = checkpoint.full_state(engine)  # collective under ZeRO: every rank calls it
    counters = checkpoint.engine_counters(engine)
    shape = copy.deepcopy(engine.module.cfg)  # the current (grown so far) shape; no mask is active here
    device = next(engine.module.parameters()).device
    _release(engine)
    del engine
    gc.collect()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        model = build(shape)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])
    event = cfg.growth.events[event_index]
    g = growth.apply_event(model, event, cfg.growth.init_std, growth.event_seed(cfg.train.seed, event_index))
    carried = {name: p.detach().cpu() for name, p in model.named_parameters()}
    for key in checkpoint.MOMENTS:
        old = {name[len(key) + 1 :]: v for name, v in state.items() if name.startswith(f"{key}/")}
        carried.update({f"{key}/{name}": v.cpu() for name, v in growth.carry_state(g, old).items()})
    del state
    gc.collect()
    apply_parallel(model, dims, dispatch, g)
    new_engine = engine_lib.initialize(model, cfg, dims)
    checkpoint.set_state(new_engine, carried, counters)
    g.set_c(g.c)  # masks on the device the engine put the model on
    return new_engine, g
