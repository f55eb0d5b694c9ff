"""Training speed on this machine: tokens/s, MFU (every expert counted), peak memory, the time split.

    python benchmarks/bench_train.py --config configs/dsmoe_1b.yaml [--steps 20] [--warmup 5] [key=value ...]
    python benchmarks/bench_train.py --name train_1b --steps 8 --warmup 3 \
        --variant "dsmoe_eager=configs/dsmoe_1b.yaml" \
        --variant "dsmoe_compiled=configs/dsmoe_1b.yaml train.compile=true" \
        --variant "dense_compiled=configs/dense_1b.yaml train.compile=true" \
        --baseline dense_compiled --split dsmoe_compiled --profile dsmoe_compiled [key=value ...]

Runs the real training loop (DeepSpeed engine, our model) for --steps steps without checkpoints, takes
the median tokens/s of the steps after --warmup. Several --variant NAME="CONFIG [key=value ...]" run one
after another in this one process (same device, same call: their ratios are comparable), each with the
common key=value overrides first; the ratio column is against --baseline. Writes
<out>/<name>_<device>.md and .json (device, date, commit, command). MFU = tokens/s x
model.flops_per_token / the device's bf16 dense peak (H100 SXM and H200: 989 TFLOP/s; the 8192^3 matmul
measured 771-798 here, see benchmarks/layers_*.md).

--split NAME times the parts of that variant's step (time_split): one block's attention (with its norm), its
MLP (with its norm) less the router, the router + MI loss (each forward + backward on the run's micro-batch,
compiled when the variant compiles, scaled by layers), head + loss, and one optimizer step; the rest of the
measured step is 'other' (launch gaps, Python, copies, host syncs, communication on several ranks). Parts
timed apart lose the fusions across their borders that the whole compiled block has, so 'other' can come
out negative: the --profile table (kernels of one real step, by kind) is the in-place split.
--profile NAME runs one more optimizer step of that variant under torch.profiler and writes the top
CUDA kernels (<name>_<device>_profile.txt) with their share of the step's kernel time, and how long the GPU
waited for the host (the unprofiled step less the kernel time; kernel_ms / gpu_idle_ms in the JSON).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # tools/_cli.py
from _cli import cuda_ms, device_tag, git_commit  # noqa: E402

from dsmoe import config as config_lib  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}
RUN_DIR = Path("/tmp/dsmoe-bench-train")


def bench_one(config: str, overrides: list[str], steps: int, warmup: int, split: bool, profile: bool) -> dict:
    """Train `config` for `steps` steps in this process; tokens/s, MFU, memory (and split / profile)."""
    overrides = [
        *overrides,
        f"train.max_steps={steps}",
        f"train.warmup_steps={min(warmup, steps - 1)}",
        "train.checkpoint_every=0",
        "train.export_at_end=false",
        "train.wandb=false",
        "train.progress=false",
        f"train.run_dir={RUN_DIR}",
    ]
    cfg = config_lib.load(config, overrides)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    from dsmoe.run import run

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - started
    metrics = [json.loads(line) for line in (RUN_DIR / "metrics.jsonl").read_text().splitlines()]
    tokens_per_s = statistics.median(m["tokens_per_s"] for m in metrics[warmup:])
    engine = result.engine
    model = engine.module
    flops = model.flops_per_token(cfg.data.seq_len)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
    achieved = tokens_per_s * flops / 1e12
    out = {
        "config": config,
        "overrides": overrides[: len(overrides) - 7],
        "params_M": model.num_params() / 1e6,
        "expert_params_M": model.num_expert_params() / 1e6,
        "micro_batch": cfg.train.micro_batch_size,
        "global_batch": cfg.train.global_batch_size,
        "seq_len": cfg.data.seq_len,
        "precision": cfg.train.precision,
        "zero_stage": cfg.parallel.zero_stage,
        "compile": cfg.train.compile,
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "tokens_per_s": tokens_per_s,
        "step_tokens_per_s": [round(m["tokens_per_s"]) for m in metrics],
        "flops_per_token_G": flops / 1e9,
        "model_tflops": achieved,
        "mfu": achieved / peak if peak else None,
        "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "wall_s_incl_setup_and_compile": wall,
        "first_step_s": cfg.train.global_batch_size * cfg.data.seq_len / metrics[0]["tokens_per_s"],
        "loss_first_last": [metrics[0]["loss"], metrics[-1]["loss"]],
    }
    step_ms = 1000 * cfg.train.global_batch_size * cfg.data.seq_len / tokens_per_s  # the unprofiled step
    if torch.cuda.is_available() and profile:  # first: time_split forces the accumulation boundary
        out["profile"], kernel_ms = profile_step(engine, cfg, step_ms)
        out["kernel_ms"], out["gpu_idle_ms"] = kernel_ms, step_ms - kernel_ms
    if torch.cuda.is_available() and split:
        parts = time_split(engine, cfg)
        parts["other (launch gaps, Python, copies, host syncs, communication)"] = step_ms - sum(
            parts.values()
        )
        out["step_ms"], out["time_split_ms"] = step_ms, parts
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine, model, result
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def profile_step(engine, cfg, step_ms: float, top: int = 30) -> tuple[str, float]:
    """One optimizer step (all micro-batches + the boundary step) under torch.profiler: the top CUDA kernels,
    and the kernel milliseconds. `step_ms` (the unprofiled step, from the run's median tokens/s) less the kernel
    time is what the GPU spent waiting for the host (the profiler's own wall time is inflated by it)."""
    from torch.profiler import ProfilerActivity, profile

    from dsmoe.train.engine import boundary_step

    t = cfg.train
    gas = t.global_batch_size // t.micro_batch_size
    idx = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len), device="cuda")

    def step() -> None:
        for micro in range(gas):
            engine.backward(engine(idx, idx).loss)
            engine.step() if micro < gas - 1 else boundary_step(engine)

    step()  # warm (a new input shape for nothing; the same shapes as training)
    torch.cuda.synchronize()
    wall = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - wall  # under the profiler: a little slower than unprofiled
    events = [  # kernels and copies only: user ranges (e.g. Optimizer.step#AdamW.step) would count theirs twice
        e
        for e in prof.key_averages()
        if e.device_time_total > 0
        and e.device_type.name == "CUDA"
        and not getattr(e, "is_user_annotation", False)
        and "#" not in e.key
        and not e.key.startswith("ProfilerStep")
    ]
    total = sum(e.device_time_total for e in events)
    events.sort(key=lambda e: -e.device_time_total)
    idle = step_ms - total / 1e3
    lines = [
        f"kernel time in one step: {total / 1e3:.1f} ms over {len(events)} kernel kinds; the step's wall time "
        f"under the profiler {1e3 * wall:.1f} ms (the rest: the GPU waiting for the host)",
        f"unprofiled step (median tokens/s): {step_ms:.1f} ms, so the GPU waited ~{idle:.1f} ms "
        f"({idle / step_ms:.1%}) for the host",
        "",
    ]
    lines.append(f"{'share':>6} {'ms':>9} {'calls':>6}  kernel")
    for e in events[:top]:
        lines.append(
            f"{e.device_time_total / total:6.1%} {e.device_time_total / 1e3:9.2f} {e.count:6d}  {e.key[:150]}"
        )
    categories = kernel_categories(events)
    lines += ["", "by category (kernel name patterns):"]
    lines += [f"{v / total:6.1%} {v / 1e3:9.2f} ms  {k}" for k, v in categories.items()]
    return "\n".join(lines), total / 1e3


def kernel_categories(events) -> dict[str, float]:
    """Kernel time (us) by kind, from kernel names: attention core, GEMMs, fused Triton, optimizer, comms."""
    rules = [
        ("attention core (flash / cuDNN / efficient SDPA)", ("flash", "fmha", "cudnn", "attention", "sdpa")),
        ("communication (NCCL)", ("nccl",)),
        ("optimizer (fused AdamW, multi-tensor)", ("adam", "multi_tensor", "foreach")),
        ("GEMMs (cuBLAS / CUTLASS)", ("gemm", "sm90_xmma", "cutlass", "nvjet", "cublas", "matmul")),
        ("Triton (compiled elementwise / reductions)", ("triton",)),
    ]
    out = {name: 0.0 for name, _ in rules} | {"other kernels (copies, eager elementwise, ...)": 0.0}
    for e in events:
        key = e.key.lower()
        name = next(
            (n for n, pats in rules if any(p in key for p in pats)),
            "other kernels (copies, eager elementwise, ...)",
        )
        out[name] += e.device_time_total
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--variant", action="append", default=[], help='NAME="CONFIG [key=value ...]"')
    parser.add_argument("--baseline", default="", help="variant the ratio column divides by")
    parser.add_argument("--split", action="append", default=[], help="variants to time-split")
    parser.add_argument("--profile", action="append", default=[], help="variants to profile one step of")
    parser.add_argument("--name", default="", help="output stem (default train_<config stem>)")
    parser.add_argument("--out", default=str(REPO / "benchmarks"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--rerender",
        default="",
        help="an earlier run's JSON: recompute its FLOPs and MFU with this tree's model.flops_per_token and "
        "rewrite its markdown and JSON beside it (tokens/s, memory and split stay as measured)",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.rerender:
        return rerender(Path(args.rerender), parser)
    variants = {}
    for spec in args.variant or [f"{Path(args.config).stem}={args.config}"]:
        name, _, rest = spec.partition("=")
        config, *extra = shlex.split(rest)
        variants[name] = (config, [*args.overrides, *extra])
    split_all = not args.variant  # the single-config form keeps its time split
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    tag = device_tag(device)
    stem = args.name or f"train_{Path(args.config).stem}"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device,
        "date": str(datetime.date.today()),
        "commit": git_commit(),
        "torch": torch.__version__,
        "command": "python benchmarks/bench_train.py " + shlex.join(sys.argv[1:]),
        "peak_bf16_tflops": next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None),
    }
    results = {}
    for name, (config, overrides) in variants.items():
        print(f"=== {name}: {config} {' '.join(overrides)}", flush=True)
        try:
            results[name] = bench_one(
                config,
                overrides,
                args.steps,
                args.warmup,
                split_all or name in args.split,
                name in args.profile,
            )
        except Exception as e:  # one variant failing (e.g. out of memory) must not lose the others
            results[name] = {
                "config": config,
                "overrides": overrides,
                "error": f"{type(e).__name__}: {e}"[:500],
            }
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        print(json.dumps({k: v for k, v in results[name].items() if k != "profile"}), flush=True)
        (out_dir / f"{stem}_{tag}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = report(meta, results, args)
    (out_dir / f"{stem}_{tag}.md").write_text("\n".join(lines))
    for name, r in results.items():
        if "profile" in r:
            (out_dir / f"{stem}_{tag}_profile.txt").write_text(f"variant {name}\n\n{r['profile']}\n")
            print(f"\n--- profile of {name} ---\n{r['profile']}")
    print("\n".join(lines))
    return 0


def rerender(path: Path, parser: argparse.ArgumentParser) -> int:
    """Recompute FLOPs per token, model TFLOP/s and MFU of a stored run (the model built on the meta
    device from each variant's config and overrides), note it in the header, and rewrite .json and .md."""
    from dsmoe.model.transformer import build

    data = json.loads(path.read_text())
    meta, results = data["meta"], data["results"]
    run_args = parser.parse_args(shlex.split(meta["command"])[2:])
    for r in results.values():
        if "error" in r:
            continue
        cfg = config_lib.load(r["config"], r["overrides"])
        with torch.device("meta"):
            model = build(cfg.model)
        flops = model.flops_per_token(r["seq_len"])
        r["flops_per_token_G"] = flops / 1e9
        r["model_tflops"] = r["tokens_per_s"] * flops / 1e12
        r["mfu"] = r["model_tflops"] / meta["peak_bf16_tflops"] if meta["peak_bf16_tflops"] else None
    meta["rerendered"] = (
        f"FLOPs per token, model TFLOP/s and MFU recomputed on {datetime.date.today()} at commit {git_commit()} "
        f"with `python benchmarks/bench_train.py --rerender {path.name}`; tokens/s, memory and the split are as measured"
    )
    path.write_text(json.dumps(data, indent=1))
    path.with_suffix(".md").write_text("\n".join(report(meta, results, run_args)))
    print(path.with_suffix(".md").read_text())
    return 0


def report(meta: dict, results: dict, args) -> list[str]:
    base = results.get(args.baseline, {}).get("tokens_per_s")
    peak = meta["peak_bf16_tflops"]
    lines = [
        f"# Training speed on {meta['device']}",
        "",
        f"- date {meta['date']}, commit {meta['commit']}, torch {meta['torch']}; every variant in this one process",
        f"- command: `{meta['command']}`",
        f"- MFU against the {peak or 'unknown'} TFLOP/s bf16 dense datasheet peak (H100 SXM and H200 alike); "
        f"FLOPs per token from model.flops_per_token (every expert, attention's causal score/value products)",
        f"- tokens/s: median over steps {args.warmup + 1}-{args.steps} of the training loop's own per-step figure",
        *([f"- {meta['rerendered']}"] if "rerendered" in meta else []),
        "",
        f"| variant | config + overrides | tokens/s | vs {args.baseline or '-'} | model TFLOP/s | MFU | peak GiB | "
        "micro-batch | wall s (incl. compile) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        spec = f"{r['config']} {' '.join(r['overrides'])}".strip()
        if "error" in r:
            lines.append(f"| {name} | `{spec}` | failed: {r['error'][:200]} | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.3f}x" if base else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_GiB']:.1f}" if r["peak_memory_GiB"] is not None else "n/a"
        lines.append(
            f"| {name} | `{spec}` | {r['tokens_per_s']:,.0f} | {ratio} | {r['model_tflops']:.0f} | {mfu} | {mem} | "
            f"{r['micro_batch']} | {r['wall_s_incl_setup_and_compile']:.0f} |"
        )
    for name, r in results.items():
        if "time_split_ms" in r:
            step_ms = r["step_ms"]
            lines += [
                "",
                f"Time split of a {name} step ({step_ms:.1f} ms at the median tokens/s; parts timed apart with CUDA "
                f"events, forward + backward on one micro-batch{', compiled' if r['compile'] else ', eager'}, "
                "scaled by layers and micro-batches per step):",
                "",
                "| part | ms per step | share |",
                "|---|---|---|",
                *(f"| {part} | {ms:.1f} | {ms / step_ms:.1%} |" for part, ms in r["time_split_ms"].items()),
            ]
            if min(r["time_split_ms"].values()) < 0:  # the parts alone outrun the whole step
                lines += [
                    "",
                    "'other' is negative: timed apart, the parts lose the fusion across their borders and pay their own "
                    "launches, so they sum to more than the step. Read the shares as upper bounds and the "
                    "--profile table (kernels of one real step) as the split.",
                ]
    return lines + [""]


def time_split(engine, cfg) -> dict[str, float]:
    """Milliseconds per optimizer step of each part, timed apart on the run's micro-batch shape."""
    import torch.nn.functional as F
    from torch import nn

    from dsmoe.model.attention import rope_cos_sin
    from dsmoe.model.moe import routing_aux
    from dsmoe.model.transformer import Block
    from dsmoe.train.engine import boundary_step

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

    # The parts as the run ran them, each with its own RMSNorm inside (compiled with it when the run compiles).
    compiled = torch.compile if cfg.train.compile else (lambda f: f)
    attn = compiled(lambda x: block.attn(block.attn_norm(x), cos, sin))
    mlp_layer = compiled(lambda x: block.mlp(block.mlp_norm(x)))
    router_mi = compiled(lambda h: routing_aux(block.mlp.router(h), h.new_ones(())).mi_loss)
    h_norm = block.mlp_norm(x).detach().reshape(-1, shape[-1]).requires_grad_()  # the router's input
    head_loss = compiled(
        lambda h, targets: F.cross_entropy(lm_head(head_norm(h)).float().flatten(0, 1), targets.flatten())
    )
    targets = torch.randint(0, cfg.model.vocab_size, shape[:2], device="cuda")

    def backward(out, aux) -> None:
        loss = out.float().square().mean() + (aux.mi_loss if aux is not None else 0)
        loss.backward()

    def attention() -> None:
        backward(*attn(x))

    def mlp() -> None:
        out = mlp_layer(x)
        backward(*out) if isinstance(out, tuple) else backward(out, None)

    def router() -> None:
        router_mi(h_norm).backward()

    def head() -> None:
        head_loss(x, targets).backward()

    per_micro = {"attention (incl. MoA router)": cuda_ms(attention, repeats=5, warmup=2) * layers}
    has_router = getattr(block.mlp, "router", None) is not None
    router_ms = cuda_ms(router, repeats=5, warmup=2) * layers if has_router else 0.0
    per_micro["MLP (experts; router apart)"] = cuda_ms(mlp, repeats=5, warmup=2) * layers - router_ms
    if has_router:
        per_micro["router + MI loss"] = router_ms
    per_micro["embedding, final norm, LM head, loss"] = cuda_ms(head, repeats=5, warmup=2)
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
