"""MSG growth inside a running DeepSpeed run (papers/msg.md; operators in dsmoe/growth.py).

At a growth event the engine's fp32 masters and Adam moments are read by parameter name, the plain model
grows (old values in place, new weights from the event's own seed), the engine is rebuilt around it, and the
masters and moments are set back: old slices keep their moments, new entries start at zero, the Adam step
count, the engine's counters and the LR schedule position carry on.
"""

from __future__ import annotations

import gc

import torch
from torch import nn

from dsmoe import growth
from dsmoe.config import Config
from dsmoe.train import checkpoint
from parallel import engine as engine_lib


def _release(engine) -> nn.Module:
    """Detach the model from its engine: DeepSpeed's module hooks removed, every parameter a fresh tensor
    (its gradient hooks belonged to the old optimizer). Returns the plain model, in fp32."""
    module = engine.module
    for attr in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        handle = getattr(engine, attr, None)
        if handle is not None:
            handle.remove()
    engine.destroy()
    tied = module.cfg.tie_embeddings
    for name, p in list(module.named_parameters()):
        owner, _, attr = name.rpartition(".")
        setattr(
            module.get_submodule(owner) if owner else module, attr, nn.Parameter(p.detach().float().clone())
        )
    if tied:
        module.lm_head.weight = module.embed.weight
    return module


def grow_engine(engine, cfg: Config, dims, event_index: int):
    """Apply growth event `event_index` to the engine's model; returns (new engine, Growth at c = 0)."""
    state = checkpoint.full_state(engine)  # collective under ZeRO: every rank calls it
    counters = checkpoint.engine_counters(engine)
    module = _release(engine)
    del engine
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(state[name])  # the exact fp32 masters, not the bf16 copies the engine computed with
    event = cfg.growth.events[event_index]
    g = growth.apply_event(module, event, cfg.growth.init_std, growth.event_seed(cfg.train.seed, event_index))
    carried = {name: p.detach().cpu() for name, p in module.named_parameters()}
    for key in checkpoint.MOMENTS:
        old = {name[len(key) + 1 :]: v for name, v in state.items() if name.startswith(f"{key}/")}
        carried.update({f"{key}/{name}": v.cpu() for name, v in growth.carry_state(g, old).items()})
    del state
    gc.collect()
    new_engine = engine_lib.initialize(module, cfg, dims)
    checkpoint.set_state(new_engine, carried, counters)
    return new_engine, g
