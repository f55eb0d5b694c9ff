"""DeepSpeed engine from our config: ZeRO data parallel, bf16/fp32, clipping, AdamW, our LR schedule."""

from __future__ import annotations

import math

import torch

from dsmoe.config import Config
from dsmoe.train.schedule import warmup_cosine
from parallel.groups import ParallelDims


def gradient_accumulation_steps(cfg: Config, dims: ParallelDims) -> int:
    t = cfg.train
    per_step = t.micro_batch_size * dims.dp
    if t.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size x dp = {t.micro_batch_size} x {dims.dp}"
        )
    return t.global_batch_size // per_step


def deepspeed_config(cfg: Config, dims: ParallelDims) -> dict:
    """The DeepSpeed JSON config our settings mean."""
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(cfg, dims),
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # We pass torch's AdamW (fused on CUDA): DeepSpeed's FusedAdam needs a JIT-compiled op on CPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and stacked expert weights), none on norms.

    Each group carries its parameters' names: torch saves them with the optimizer state, which lets
    a checkpoint's fp32 master copies be matched to names (see dsmoe.train.checkpoint).
    """
    decay, no_decay = ([], []), ([], [])
    for name, p in model.named_parameters():
        if p.requires_grad:
            params, names = decay if p.dim() >= 2 else no_decay
            params.append(p)
            names.append(name)
    return [
        {"params": decay[0], "param_names": decay[1], "weight_decay": weight_decay},
        {"params": no_decay[0], "param_names": no_decay[1], "weight_decay": 0.0},
    ]


def initialize(model: torch.nn.Module, cfg: Config, dims: ParallelDims):
    """deepspeed.initialize with our optimizer and config; returns the engine."""
    import deepspeed

    t = cfg.train
    model = model.to(dims.device)
    if t.compile:  # regional compilation: blocks share code and shapes, so they share the compiled graph
        for block in model.blocks:
            block.compile()
    optimizer = AdamW(
        param_groups(model, t.weight_decay),
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=1e-8,
        fused=dims.device.type == "cuda",
    )
    # Our schedule as a torch LambdaLR: DeepSpeed steps it at each optimizer step and checkpoints its state.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, t))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, dims)
    )
    return engine


class AdamW(torch.optim.AdamW):
    """torch AdamW that DeepSpeed can tell to skip a step.

    ZeRO and DeepSpeed's bf16 optimizer skip steps with non-finite gradients themselves and expose
    `overflow`; DeepSpeed's plain fp32 path calls the client optimizer directly and checks nothing. With
    `overflow` set, this optimizer leaves parameters and moments untouched, and DeepSpeed, reading the
    same attribute, counts a skipped step and does not advance the LR schedule, as it does under ZeRO.
    """

    overflow = False

    def step(self, closure=None):
        return None if self.overflow else super().step(closure)


def boundary_step(engine) -> tuple[float | None, bool]:
    """`engine.step()` on the gradient-accumulation boundary: (pre-clipping gradient norm, update applied).

    A step whose gradients are not finite is skipped. On the plain fp32 path we read the norm before
    stepping (gradients are already reduced over data-parallel ranks then) and set AdamW.overflow.
    """
    reported = engine.zero_optimization() or engine.bfloat16_enabled()
    norm, skipped_before = None, engine.skipped_steps
    if not reported:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        engine.optimizer.overflow = not math.isfinite(norm)
    engine.step()
    if reported:
        reported_norm = engine.get_global_grad_norm()
        norm = None if reported_norm is None else float(reported_norm)
    applied = engine.skipped_steps == skipped_before and (norm is None or math.isfinite(norm))
    return norm, applied
