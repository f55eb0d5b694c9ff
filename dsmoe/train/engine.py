"""DeepSpeed engine from our config: ZeRO data parallel, bf16/fp32, clipping, AdamW, our LR schedule."""

from __future__ import annotations

import math

import torch

from dsmoe.config import Config, ConfigError, ParallelConfig
from dsmoe.model.moe import DSMoE
from dsmoe.model.transformer import CrossEntropy
from dsmoe.train.schedule import lr_multiplier
from parallel.groups import DeepSpeedMPU, ParallelDims


def gradient_accumulation_steps(cfg: Config, dims: ParallelDims) -> int:
    t = cfg.train
    per_step = t.micro_batch_size * dims.batch_ranks
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size x "
            f"the ranks that split the batch (dp x ep = {dims.dp} x {dims.ep}) = {t.micro_batch_size} x "
            f"{dims.batch_ranks}: lower train.micro_batch_size or raise train.global_batch_size"
        )
    return t.global_batch_size // per_step


def we_clip(cfg: Config) -> bool:
    """On DeepSpeed's plain fp32 path we clip ourselves: DeepSpeed's clip_grad_norm_ there averages the
    ranks' local norms, which is not the global norm once experts are split over ranks."""
    return cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32"


def deepspeed_config(cfg: Config, dims: ParallelDims) -> dict:
    """The DeepSpeed JSON config our settings mean."""
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(cfg, dims),
        "gradient_clipping": 0.0 if we_clip(cfg) else t.grad_clip,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_optimization": zero_config(cfg.parallel),
        # We pass torch's AdamW (fused on CUDA): DeepSpeed's FusedAdam needs a JIT-compiled op on CPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device at the start and end of every micro-batch
        # (py-spy on one H100: a quarter of the host's time in a DS-MoE-1B step waited there), so the GPU
        # drains and idles while the host launches the next micro-batch. Our loop times steps itself.
        "timers": {"throughput": {"enabled": False}},
        **({"data_types": {"grad_accum_dtype": "fp32"}} if cfg.parallel.zero_fp32_grad_accumulation else {}),
    }


def zero_config(p: ParallelConfig) -> dict:
    """DeepSpeed's zero_optimization section for our parallel.zero_* settings (its defaults where unset)."""
    zero: dict = {"stage": p.zero_stage}
    if p.zero_stage == 0:
        return zero
    if p.zero_bucket_elements:
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = p.zero_bucket_elements
    if p.zero_overlap_comm is not None:
        zero["overlap_comm"] = p.zero_overlap_comm
    zero["contiguous_gradients"] = p.zero_contiguous_gradients
    return zero


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and stacked expert weights), none on norms; expert-parallel weights apart.

    Each group carries its parameters' names: torch saves them with the optimizer state, which lets
    a checkpoint's fp32 master copies be matched to names (see dsmoe.train.checkpoint). Expert-parallel
    weights (marked allreduce=False by parallel.expert) go into groups marked as DeepSpeed's MoE groups
    ('moe': True, 'name': their expert group), which it reduces and partitions over the expert-data group.
    """
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2
        expert_group = None if getattr(p, "allreduce", True) else p.group_name
        key = (decay, expert_group)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0}
            if expert_group is not None:
                groups[key].update(moe=True, name=expert_group)
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    order = sorted(groups, key=lambda k: (k[1] is not None, k[1] or "", not k[0]))
    return [groups[k] for k in order]


FUSED_HEAD_LOSS_FROM_VOCAB = 32768  # train.head_loss auto: fused from here (real tokenizers' vocabularies)


def liger_linear_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor):
    """Liger Kernel's fused linear cross-entropy (Triton, CUDA only), for train.head_loss liger: the same job
    as dsmoe.model.head_loss in its own kernels (measured against ours in benchmarks/head_loss_*.md)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(h_ND, weight_VD, targets_N, ignore_index=-100)


def fused_head_loss(cfg: Config, dims: ParallelDims):
    """train.head_loss resolved to the fused head + loss function, or None for the plain logits path. Fused
    needs the whole head on one rank (tp 1): tensor parallelism shards the logits over the vocabulary."""
    from dsmoe.model.head_loss import linear_cross_entropy

    mode = cfg.train.head_loss
    if dims.tp > 1 or mode == "logits":
        return None
    if mode == "liger":
        return liger_linear_cross_entropy
    if mode == "fused" or cfg.model.vocab_size >= FUSED_HEAD_LOSS_FROM_VOCAB:
        return linear_cross_entropy
    return None


def initialize(model: torch.nn.Module, cfg: Config, dims: ParallelDims, clock=None):
    """deepspeed.initialize with our optimizer and config; returns the engine.

    train.optimizer picks AdamW (ours) or dsmoe.train.optim's Lion / Sophia-G (client optimizers: DeepSpeed
    still owns the step). With an RST clock (dsmoe.train.budget.RstClock) the LR follows the budget
    schedule of train.budget instead of the step schedule."""
    import deepspeed

    t = cfg.train
    model = model.to(dims.device)
    model.checkpoint_blocks = t.activation_checkpointing  # DecoderLM recomputes blocks in backward
    model.fused_head_loss = fused_head_loss(cfg, dims)
    if t.compile:  # regional compilation: blocks share code and shapes, so they share the compiled graph
        autotune = t.compile_mode != "default"
        for block in model.blocks:  # the encoder's packed token count changes with every batch
            # max-autotune: GeLU x p as torch ops, which inductor may fuse into the up GEMM's epilogue
            if autotune and isinstance(block.mlp, DSMoE):  # (expert parallelism's layer has no Triton path)
                block.mlp.fused = False
            block.compile(dynamic=True if cfg.model.is_encoder else None, mode=t.compile_mode)
        if cfg.model.is_encoder:  # the MLM head and its loss too (masked counts change every batch)
            model.compile_head()
        elif type(model.cross_entropy) is CrossEntropy:  # not tp's vocab-parallel one
            model.cross_entropy.compile()  # one pass over the logits: the fp32 upcast fuses into the loss
    groups_ = param_groups(model, t.weight_decay)
    if t.optimizer == "adamw":
        optimizer = AdamW(
            groups_, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps, fused=dims.device.type == "cuda"
        )
    else:
        from dsmoe.train.optim import build_optimizer

        extra = {}
        if t.optimizer == "sophia":
            extra = dict(
                rho=t.sophia_rho,
                hessian_interval=t.sophia_hessian_interval,
                gnb_batch_tokens=t.global_batch_size * cfg.data.seq_len,
            )
        optimizer = build_optimizer(t.optimizer, groups_, lr=t.lr, betas=(t.beta1, t.beta2), **extra)
    if clock is None:
        # Our schedule as a torch LambdaLR: DeepSpeed steps it at each optimizer step and checkpoints its state.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, t))
    else:
        from dsmoe.train.budget import RstSchedule, RstScheduler

        b = t.budget
        shape = RstSchedule(shape=b.schedule, warmup_fraction=b.warmup_fraction, final_ratio=b.final_lr_ratio)
        scheduler = RstScheduler(optimizer, clock, shape)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, dims),
        mpu=DeepSpeedMPU(dims) if dims.world_size > 1 else None,
    )
    engine.dsmoe_dims, engine.dsmoe_clip = dims, t.grad_clip if we_clip(cfg) else 0.0
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


def global_grad_norm(module: torch.nn.Module, dims: ParallelDims) -> float:
    """L2 norm of the whole model's gradient, each parameter counted once across the layout.

    Call after DeepSpeed's data-parallel reduction (every replica then holds the same gradients): sum the
    squares over the tp x ep ranks of one replica, dividing a tensor's by the number of those ranks that
    hold a copy of it (replicated over tp unless tensor-parallel, over ep unless an expert weight).
    """
    total = torch.zeros((), dtype=torch.float64, device=dims.device)
    for p in module.parameters():
        if p.grad is None:
            continue
        copies = (1 if getattr(p, "tensor_model_parallel", False) else dims.tp) * (
            1 if getattr(p, "allreduce", True) is False else dims.ep
        )
        total += p.grad.detach().double().pow(2).sum() / copies
    if dims.tp * dims.ep > 1:
        torch.distributed.all_reduce(total, group=dims.model_group)
    return float(total.sqrt())


def boundary_step(engine) -> tuple[float | None, bool]:
    """`engine.step()` on the gradient-accumulation boundary: (pre-clipping gradient norm, update applied).

    A step whose gradients are not finite is skipped. On the plain fp32 path we compute the global norm
    (gradients are already reduced over data-parallel ranks then), clip, and set AdamW.overflow.
    """
    reported = engine.zero_optimization() or engine.bfloat16_enabled()
    norm, skipped_before = None, engine.skipped_steps
    if not reported:
        norm = global_grad_norm(engine.module, engine.dsmoe_dims)
        engine.optimizer.overflow = not math.isfinite(norm)
        if engine.dsmoe_clip > 0 and math.isfinite(norm):
            scale = min(1.0, engine.dsmoe_clip / (norm + 1e-6))
            for p in engine.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
    engine.step()
    if reported:
        reported_norm = engine.get_global_grad_norm()
        norm = None if reported_norm is None else float(reported_norm)
    applied = engine.skipped_steps == skipped_before and (norm is None or math.isfinite(norm))
    return norm, applied
