"""Training speed of a config on this machine: tokens/s, MFU (every expert counted) and peak memory.

    python tools/bench_train.py --config configs/dsmoe_1b.yaml [--steps 20] [--warmup 5] [key=value ...]

Runs the real training loop (DeepSpeed engine, our model) for --steps steps without checkpoints, takes
the median tokens/s of the steps after --warmup, and writes benchmarks/train_<config>_<device>.md with
device, date, commit and command. MFU = tokens/s x model.flops_per_token / the device's bf16 dense peak
(H100 SXM 989 TFLOP/s, H200 989; the 8192^3 matmul measured 771-798 here, see the device notes).
On a GPU it then times the parts of a step (time_split): one block's attention, its MLP without the
router, the router + MI loss (each forward + backward on the run's micro-batch, eager, times the layers),
embedding + head + loss, and one optimizer step; the rest of the measured step time is 'other' (launch
gaps, Python, copies, and on several ranks communication).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from _cli import git_commit  # noqa: E402

from dsmoe import config as config_lib  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    run_dir = Path("/tmp/dsmoe-bench-train")
    overrides = [
        *args.overrides,
        f"train.max_steps={args.steps}",
        f"train.warmup_steps={min(args.warmup, args.steps - 1)}",
        "train.checkpoint_every=0",
        "train.export_at_end=false",
        "train.wandb=false",
        "train.progress=false",
        f"train.run_dir={run_dir}",
    ]
    cfg = config_lib.load(args.config, overrides)
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    from dsmoe.train.loop import run

    result = run(cfg)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens_per_s = statistics.median(m["tokens_per_s"] for m in metrics[args.warmup :])
    model = result.engine.module
    flops = model.flops_per_token(cfg.data.seq_len)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
    achieved = tokens_per_s * flops / 1e12
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    commit = git_commit()
    m = cfg.model
    lines = [
        f"# Training speed: {Path(args.config).stem} on {device}",
        "",
        f"- date {datetime.date.today()}, commit {commit}, torch {torch.__version__}, precision {cfg.train.precision}, "
        f"ZeRO {cfg.parallel.zero_stage}, attention backend {m.attention.backend}",
        f"- command: `python tools/bench_train.py {' '.join(sys.argv[1:])}`",
        f"- model: {model.num_params() / 1e6:.1f}M parameters ({model.num_expert_params() / 1e6:.1f}M in MLP experts), "
        f"micro-batch {cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens, global batch {cfg.train.global_batch_size}",
        "",
        "| tokens/s | model TFLOP/s (all experts) | MFU | peak memory (GiB) |",
        "|---|---|---|---|",
        f"| {tokens_per_s:,.0f} | {achieved:.1f} | {f'{100 * achieved / peak:.1f}%' if peak else 'n/a'} | {memory:.1f} |",
        "",
        f"Median over steps {args.warmup + 1}-{args.steps}; FLOPs per token {flops / 1e9:.2f} G "
        f"(model.flops_per_token); MFU against the {peak or 'unknown'} TFLOP/s bf16 dense datasheet peak.",
        "",
    ]
    if torch.cuda.is_available():
        step_ms = 1000 * cfg.train.global_batch_size * cfg.data.seq_len / tokens_per_s
        parts = time_split(result.engine, cfg)
        parts["other (launch gaps, Python, copies, communication)"] = step_ms - sum(parts.values())
        lines += [
            f"Time split of a step ({step_ms:.1f} ms at the median tokens/s; parts timed with CUDA events, "
            "forward + backward on one micro-batch, eager, scaled by layers and micro-batches per step):",
            "",
            "| part | ms per step | share |",
            "|---|---|---|",
            *(f"| {name} | {ms:.1f} | {ms / step_ms:.1%} |" for name, ms in parts.items()),
            "",
        ]
    tag = next((k.lower() for k in PEAK_BF16_TFLOPS if k in device), "cpu")
    out = REPO / "benchmarks" / f"train_{Path(args.config).stem}_{tag}.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def _cuda_ms(fn, repeats: int = 5) -> float:
    times = []
    for i in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_split(engine, cfg) -> dict[str, float]:
    """Milliseconds per optimizer step of each part, timed apart on the run's micro-batch shape."""
    import torch.nn.functional as F
    from torch import nn

    from dsmoe.model.attention import rope_cos_sin
    from dsmoe.model.moe import mutual_information_loss
    from dsmoe.model.transformer import Block
    from parallel.engine import boundary_step

    model, t = engine.module, cfg.train
    micro_steps = t.global_batch_size // t.micro_batch_size  # one rank: every micro-batch is ours
    dtype = next(model.parameters()).dtype
    # Fresh modules of the model's shapes: the engine's own parameters carry ZeRO's gradient hooks, which
    # allow one backward per step.
    block, layers = Block(cfg.model).to("cuda", dtype), len(model.blocks)
    head_norm = nn.RMSNorm(cfg.model.d_model).to("cuda", dtype)
    lm_head = nn.Linear(cfg.model.d_model, cfg.model.vocab_size, bias=False).to("cuda", dtype)
    for p in [*block.parameters(), *lm_head.parameters()]:
        if p.dim() >= 2:
            nn.init.normal_(p, std=cfg.model.init_std)
    shape = (t.micro_batch_size, cfg.data.seq_len, cfg.model.d_model)
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    cos, sin = rope_cos_sin(cfg.data.seq_len, cfg.model.head_dim, cfg.model.attention.rope_theta, x.device)

    def backward(out, aux) -> None:
        loss = out.float().square().mean() + (aux.mi_loss if aux is not None else 0)
        loss.backward()

    def attention() -> None:
        backward(*block.attn(block.attn_norm(x), cos, sin))

    def mlp() -> None:
        h = block.mlp_norm(x)
        out = block.mlp(h)
        backward(*out) if isinstance(out, tuple) else backward(out, None)

    def router() -> None:
        mutual_information_loss(block.mlp.router(block.mlp_norm(x).reshape(-1, shape[-1]))).backward()

    def head() -> None:
        logits = lm_head(head_norm(x))
        targets = torch.randint(0, logits.shape[-1], logits.shape[:-1], device="cuda")
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()

    per_micro = {"attention (incl. MoA router)": _cuda_ms(attention) * layers}
    has_router = getattr(block.mlp, "router", None) is not None
    router_ms = _cuda_ms(router) * layers if has_router else 0.0
    per_micro["MLP (experts; router apart)"] = _cuda_ms(mlp) * layers - router_ms
    if has_router:
        per_micro["router + MI loss"] = router_ms
    per_micro["embedding, final norm, LM head, loss"] = _cuda_ms(head)
    parts = {name: ms * micro_steps for name, ms in per_micro.items()}
    model.zero_grad(set_to_none=True)
    idx = torch.randint(0, cfg.model.vocab_size, shape[:2], device="cuda")

    def optimizer() -> None:
        engine.backward(engine(idx, idx).loss)  # gradients to step with (not timed: only the step is)

    if hasattr(engine, "set_gradient_accumulation_boundary"):
        engine.set_gradient_accumulation_boundary(
            True
        )  # reduce and step now, whatever the accumulation count
    optimizer()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    boundary_step(engine)
    end.record()
    torch.cuda.synchronize()
    parts["optimizer step (incl. clipping)"] = start.elapsed_time(end)
    return parts


if __name__ == "__main__":
    sys.exit(main())
