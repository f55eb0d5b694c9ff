"""Parallel layouts on several GPUs: weak scaling, loss equivalence, and the dense-EP collectives.

    python benchmarks/bench_parallel.py scaling --config configs/dsmoe_1b.yaml [--steps 12] [--warmup 4] [key=value ...]
    python benchmarks/bench_parallel.py collectives [--tokens 2048 4096 8192 16384]

`scaling` trains the config (real loop: DeepSpeed engine, our model, the shipped corpus) under each layout,
every one launched with torchrun, and writes benchmarks/parallel_scaling_<device>.{md,json}:
  - weak scaling: tokens/s per GPU of 1 GPU (micro-batch m) against dp2, ep2 (both expert dispatches) and
    tp2 with the same work per GPU (m sequences per data-parallel rank; tp2's pair shares 2m);
  - equivalence: the same layouts' loss curves against 1 GPU taking the same global batch of 2m whole.
`collectives` times one DS-MoE layer's dense-training forward + backward on 2 GPUs (ep2) by gathering
tokens and by gathering expert weights, against the same layer's work on one GPU without communication,
for several tokens per rank, next to the analytic volumes of parallel/README.md; it writes
benchmarks/parallel_collectives_<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # tools/_cli.py


def _commit() -> str:
    from _cli import git_commit

    return git_commit()


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    return "CPU"


def _torchrun(nproc: int, args: list[str]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(29500 + os.getpid() % 1000),
        str(Path(__file__)),
        *args,
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


# ---------------------------------------------------------------------------------------------- scaling


def _train_worker(args) -> None:
    """One layout's run (under torchrun): rank 0 writes tokens/s, losses and peak memory to --out."""
    import shutil

    import torch
    import torch.distributed as dist

    from dsmoe import config as config_lib
    from dsmoe.run import run

    run_dir = Path(args.out).with_suffix("")
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
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    result = run(cfg)
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    peak = torch.tensor([memory], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        world = dist.get_world_size()
        tokens_per_s = statistics.median(m["tokens_per_s"] for m in metrics[args.warmup :])
        Path(args.out).write_text(
            json.dumps(
                {
                    "world": world,
                    "tokens_per_s": tokens_per_s,
                    "tokens_per_s_per_gpu": tokens_per_s / world,
                    "losses": [m["loss"] for m in metrics],
                    "peak_gib": float(peak),
                    "params": result.engine.module.num_params(),
                }
            )
        )


SCALING = [  # name, GPUs, overrides given micro-batch m (global batch set per run)
    ("1 GPU, micro-batch m", 1, lambda m: [f"train.micro_batch_size={m}", f"train.global_batch_size={m}"]),
    (
        "1 GPU, micro-batch 2m",
        1,
        lambda m: [f"train.micro_batch_size={2 * m}", f"train.global_batch_size={2 * m}"],
    ),
    (
        "dp2",
        2,
        lambda m: [
            "parallel.zero_stage=1",
            f"train.micro_batch_size={m}",
            f"train.global_batch_size={2 * m}",
        ],
    ),
    (
        "ep2, gathering tokens",
        2,
        lambda m: [
            "parallel.ep=2",
            "parallel.expert_dispatch=tokens",
            f"train.micro_batch_size={m}",
            f"train.global_batch_size={2 * m}",
        ],
    ),
    (
        "ep2, gathering weights",
        2,
        lambda m: [
            "parallel.ep=2",
            "parallel.expert_dispatch=weights",
            f"train.micro_batch_size={m}",
            f"train.global_batch_size={2 * m}",
        ],
    ),
    (
        "tp2",
        2,
        lambda m: ["parallel.tp=2", f"train.micro_batch_size={2 * m}", f"train.global_batch_size={2 * m}"],
    ),
]


def scaling(args) -> None:
    import torch

    out_dir = Path(args.scratch)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for i, (name, gpus, extra) in enumerate(SCALING):
        out = out_dir / f"layout{i}.json"
        _torchrun(
            gpus,
            [
                "_train",
                "--config",
                args.config,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--out",
                str(out),
                *args.overrides,
                *extra(args.micro),
            ],
        )
        results[name] = json.loads(out.read_text())
    base = results["1 GPU, micro-batch m"]["tokens_per_s_per_gpu"]
    same_batch = results["1 GPU, micro-batch 2m"]["losses"]
    device = _device_name()
    rows = []
    for name, r in results.items():
        efficiency = r["tokens_per_s_per_gpu"] / base if r["world"] > 1 else float("nan")
        diff = (
            max(abs(a - b) / abs(b) for a, b in zip(r["losses"], same_batch, strict=True))
            if r["world"] > 1
            else None
        )
        rows.append((name, r, efficiency, diff))
    stem = f"parallel_scaling_{device.split()[-1].lower()}x{torch.cuda.device_count() or 0}"
    lines = [
        f"# Parallel layouts: weak scaling and loss equivalence ({Path(args.config).stem}) on {device}",
        "",
        f"- date {datetime.date.today()}, commit {_commit()}, torch {torch.__version__}",
        f"- command: `python benchmarks/bench_parallel.py {' '.join(sys.argv[1:])}`",
        f"- micro-batch m = {args.micro} sequences per data-parallel rank; {args.steps} steps, tokens/s the median "
        f"after {args.warmup}; scaling efficiency = tokens/s per GPU over 1 GPU's at micro-batch m (the same work "
        "per GPU: tp2's pair shares 2m); loss difference = the largest relative difference of any step's loss "
        "from 1 GPU taking the same global batch of 2m sequences whole (bf16)",
        "",
        "| layout | GPUs | tokens/s | tokens/s per GPU | scaling efficiency | peak memory (GiB) | max loss difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r, efficiency, diff in rows:
        lines.append(
            f"| {name} | {r['world']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | "
            + (f"{efficiency:.1%}" if r["world"] > 1 else "-")
            + f" | {r['peak_gib']:.1f} | "
            + (f"{diff:.2e}" if diff is not None else "-")
            + " |"
        )
    _write(stem, lines, {name: r for name, r, _, _ in rows}, args.bench_dir)


# ------------------------------------------------------------------------------------------ collectives


def _collectives_worker(args) -> None:
    """Under torchrun with 2 ranks: one DS-MoE layer, ep2, both dispatches; rank 0 writes --out."""
    import torch
    import torch.distributed as dist

    from dsmoe.config import ParallelConfig
    from dsmoe.model.moe import DSMoE
    from parallel import groups
    from parallel.expert import make_parallel_moe

    dims = groups.init(ParallelConfig(dp=1, ep=2, tp=1))
    torch.manual_seed(0)
    d, n, f = args.d_model, args.experts, args.expert_hidden
    plain = DSMoE(d, n, f, "gelu")
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.02)
    layers = {
        "tokens": make_parallel_moe(plain, "blocks.0.mlp", dims, "tokens").to(dims.device, torch.bfloat16),
        "weights": make_parallel_moe(plain, "blocks.0.mlp", dims, "weights").to(dims.device, torch.bfloat16),
    }
    single = plain.to(dims.device, torch.bfloat16)

    def timed(fn, x) -> float:
        times = []
        for i in range(args.repeats + 3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            dist.barrier()
            start.record()
            y, aux = fn(x)
            (y.float().square().mean() + aux.mi_loss).backward()
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end))
        return statistics.median(times)

    rows = []
    w = 2 * n * f * d
    for tokens in args.tokens:
        x = torch.randn(tokens, d, device=dims.device, dtype=torch.bfloat16, requires_grad=True)
        row = {"tokens_per_rank": tokens, "single_gpu_ms": timed(single, x)}
        for name, layer in layers.items():
            row[f"{name}_ms"] = timed(layer, x)
        # Elements each rank sends + receives per layer, forward + backward (parallel/README.md), bf16 bytes.
        row["tokens_mib"] = 4 * (dims.ep - 1) * tokens * d * 2 / 2**20
        row["weights_mib"] = 3 * (dims.ep - 1) / dims.ep * w * 2 / 2**20
        rows.append(row)
    if dims.rank == 0:
        Path(args.out).write_text(json.dumps(rows))


def collectives(args) -> None:
    import torch

    out = Path(args.scratch) / "collectives.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    _torchrun(2, ["_collectives", "--out", str(out), "--tokens", *map(str, args.tokens)])
    rows = json.loads(out.read_text())
    device = _device_name()
    d, n, f = 2048, 32, 256
    crossover = 3 * (2 * n * f * d) / (4 * 2 * d)
    lines = [
        f"# Dense-training expert parallelism: gathering tokens vs gathering expert weights, on {device}",
        "",
        f"- date {datetime.date.today()}, commit {_commit()}, torch {torch.__version__}",
        f"- command: `python benchmarks/bench_parallel.py {' '.join(sys.argv[1:])}`",
        f"- one DS-MoE-1B MLP layer (d {d}, {n} GeLU experts x {f}), bf16, ep2 over NCCL: forward + backward "
        "(median of the timed repeats, CUDA events, the two ranks in step); 'one GPU' is the same layer's "
        "whole work for one rank's tokens with no communication (what the EP ranks each compute); volumes are "
        f"per rank, forward + backward, from the formulas in parallel/README.md (crossover {crossover:.0f} tokens)",
        "",
        "| tokens per rank | one GPU (ms) | gathering tokens (ms) | gathering weights (ms) | token volume (MiB) "
        "| weight volume (MiB) | faster |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        faster = "tokens" if r["tokens_ms"] < r["weights_ms"] else "weights"
        lines.append(
            f"| {r['tokens_per_rank']} | {r['single_gpu_ms']:.2f} | {r['tokens_ms']:.2f} | {r['weights_ms']:.2f} | "
            f"{r['tokens_mib']:.0f} | {r['weights_mib']:.0f} | {faster} |"
        )
    stem = f"parallel_collectives_{device.split()[-1].lower()}x{torch.cuda.device_count() or 0}"
    _write(stem, lines, rows, args.bench_dir)


def _write(stem: str, lines: list[str], data, bench_dir: str) -> None:
    out = Path(bench_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    print("\n".join(lines), flush=True)
    print(f"wrote {out / stem}.md and .json", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("scaling")
    s.add_argument("--config", default="configs/dsmoe_1b.yaml")
    s.add_argument("--steps", type=int, default=12)
    s.add_argument("--warmup", type=int, default=4)
    s.add_argument("--micro", type=int, default=4, help="micro-batch m per data-parallel rank")
    s.add_argument("overrides", nargs="*")
    c = sub.add_parser("collectives")
    c.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    for p in (s, c):
        p.add_argument("--scratch", default="/tmp/dsmoe-bench-parallel")
        p.add_argument("--bench-dir", default=str(REPO / "benchmarks"))
    w = sub.add_parser("_train")
    w.add_argument("--config")
    w.add_argument("--steps", type=int)
    w.add_argument("--warmup", type=int)
    w.add_argument("--out")
    w.add_argument("overrides", nargs="*")
    k = sub.add_parser("_collectives")
    k.add_argument("--out")
    k.add_argument("--tokens", type=int, nargs="+")
    k.add_argument("--repeats", type=int, default=10)
    k.add_argument("--d-model", type=int, default=2048)
    k.add_argument("--experts", type=int, default=32)
    k.add_argument("--expert-hidden", type=int, default=256)
    args = parser.parse_args()
    {
        "scaling": scaling,
        "collectives": collectives,
        "_train": _train_worker,
        "_collectives": _collectives_worker,
    }[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
