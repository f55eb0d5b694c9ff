"""The training run: data -> model -> DeepSpeed engine -> steps -> checkpoints -> export and evaluation.

`run(cfg)` is what `launchers/train.py` calls on every rank. Running it again with the same run_dir
resumes from the last complete checkpoint and continues the same loss curve.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from dsmoe import config as config_lib
from dsmoe.config import Config, ConfigError
from dsmoe.data import PackedSampler, open_token_data, pad_vocab, prepare
from dsmoe.model import build
from dsmoe.model.attention import resolve_backend
from dsmoe.train import checkpoint
from dsmoe.train.logging import RunLogger
from parallel import engine as engine_lib
from parallel import groups

# Sections a resumed run must share with the checkpoint it resumes; train.* may change (e.g. max_steps).
RESUME_MUST_MATCH = ("model", "data", "parallel")


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    """Loss of each step this invocation ran."""
    summary: dict | None = None
    engine: object = None
    """The DeepSpeed engine, for callers that continue in-process (tests, notebooks)."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_resume_config(saved: dict, current: Config, run_dir: Path) -> None:
    """A resumed run must train the same model on the same data with the same layout."""
    now = config_lib.to_dict(current)
    diffs = []
    for section in RESUME_MUST_MATCH:
        a, b = _flatten(saved.get(section, {}), section + "."), _flatten(now[section], section + ".")
        diffs += [
            f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}"
            for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)
        ]
    if diffs:
        raise ConfigError(
            f"{run_dir} holds a run with a different configuration ({'; '.join(diffs)}); "
            "use another train.run_dir or the checkpoint's settings"
        )


def _resolved_data(cfg: Config, dims: groups.ParallelDims):
    """Prepare the token cache on rank 0, then open it everywhere."""
    path = [str(prepare(cfg.data))] if dims.is_main else [None]
    dist.broadcast_object_list(path, src=0)
    return open_token_data(Path(path[0]))


def run(cfg: Config) -> RunResult:
    dims = groups.init(cfg.parallel)
    t = cfg.train
    run_dir = Path(t.run_dir)
    token_data = _resolved_data(cfg, dims)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = pad_vocab(token_data.vocab_size)
    elif cfg.model.vocab_size < token_data.vocab_size:
        raise ConfigError(
            f"model.vocab_size {cfg.model.vocab_size} < tokenizer vocabulary {token_data.vocab_size}"
        )

    resuming = checkpoint.latest_tag(run_dir) is not None
    if resuming:
        saved = json.loads((run_dir / "config.json").read_text())
        check_resume_config(saved, cfg, run_dir)
    if dims.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_lib.to_dict(cfg), indent=2))
        (run_dir / "tokenizer.json").write_bytes(token_data.tokenizer_path.read_bytes())
    dist.barrier()

    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = build(cfg.model)
    engine = engine_lib.initialize(model, cfg, dims)
    gas = engine_lib.gradient_accumulation_steps(cfg, dims)
    start_step = 0
    if resuming:
        ours = checkpoint.load(engine, run_dir, dims.rank)["dsmoe"]
        start_step = int(ours["step"])
    else:
        torch.manual_seed(t.seed + 1 + dims.rank)  # per-rank stream for anything stochastic in training

    sampler = PackedSampler(token_data.train, cfg.data.seq_len, t.seed)
    logger = None
    if dims.is_main:
        n_params, n_expert = model.num_params(), model.num_expert_params()
        print(
            f"dsmoe: {n_params / 1e6:.2f}M params ({n_expert / 1e6:.2f}M in experts), world {dims.world_size} "
            f"(dp {dims.dp}), device {dims.device.type}, attention {resolve_backend(cfg.model.attention.backend)}, "
            f"precision {t.precision}, ZeRO {cfg.parallel.zero_stage}, "
            + (f"resuming at step {start_step}" if resuming else "starting"),
            flush=True,
        )
        logger = RunLogger(run_dir, cfg, start_step)

    result = RunResult(run_dir, start_step, engine=engine)
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    for step in range(start_step, t.max_steps):
        started = time.perf_counter()
        lr = engine.get_lr()[0]
        sums = None
        for micro in range(gas):
            x, y = sampler.micro_batch(
                step, micro, dims.dp_rank, dims.dp, t.micro_batch_size, t.global_batch_size
            )
            out = engine(x.to(dims.device), y.to(dims.device))
            engine.backward(out.loss)
            if micro < gas - 1:
                engine.step()  # accumulates; DeepSpeed updates only on the boundary
            else:
                grad_norm = engine_lib.boundary_step(engine)
            stats = _step_stats(out)
            sums = stats if sums is None else {k: sums[k] + stats[k] for k in sums}
        # Mean over micro-batches and data-parallel ranks: equal to the single-process mean.
        packed = torch.cat([v.flatten() for v in sums.values()]) / (gas * dims.dp)
        dist.all_reduce(packed)
        record = _unpack(packed, sums, step + 1)
        record.update(
            lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            tokens_per_s=tokens_per_step / (time.perf_counter() - started),
        )
        result.losses.append(record["loss"])
        result.steps = step + 1
        if logger:
            logger.log(record)
        exiting = step + 1 == t.exit_at_step
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.max_steps or exiting:
            ours = {
                "step": step + 1,
                "samples_consumed": (step + 1) * t.global_batch_size,
                "config": config_lib.to_dict(cfg),
            }
            checkpoint.save(engine, run_dir, step + 1, {"dsmoe": ours}, token_data.tokenizer_path, dims.rank)
        if exiting:
            break

    if dims.is_main and dims.device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    dist.barrier()
    if dims.is_main and t.export_at_end and result.steps == t.max_steps:
        from dsmoe.train.report import final_report

        result.summary = final_report(run_dir, cfg, logger)
    if logger:
        logger.close()
    return result


def _step_stats(out) -> dict[str, torch.Tensor]:
    stats = {"loss": out.loss.detach().float(), "lm_loss": out.lm_loss.detach().float()}
    for prefix, routing in (("", out.mlp), ("attention_", out.attention)):
        if routing is not None:
            stats[f"{prefix}mi_loss"] = routing.mi_loss.detach().float()
            stats[f"{prefix}router_entropy"] = routing.router_entropy.float()
            stats[f"{prefix}expert_load"] = routing.expert_load.float()
    return stats


def _unpack(packed: torch.Tensor, like: dict[str, torch.Tensor], step: int) -> dict:
    record, offset = {"step": step}, 0
    for name, value in like.items():
        chunk = packed[offset : offset + value.numel()].view(value.shape)
        offset += value.numel()
        record[name] = chunk.item() if value.dim() == 0 else chunk.tolist()
    return record
