"""Training speed of a config on this machine: tokens/s, MFU (every expert counted) and peak memory.

    python tools/bench_train.py --config configs/dsmoe_1b.yaml [--steps 20] [--warmup 5] [key=value ...]

Runs the real training loop (DeepSpeed engine, our model) for --steps steps without checkpoints, takes
the median tokens/s of the steps after --warmup, and writes benchmarks/train_<config>_<device>.md with
device, date, commit and command. MFU = tokens/s x model.flops_per_token / the device's bf16 dense peak
(H100 SXM 989 TFLOP/s, H200 989; the 8192^3 matmul measured 771-798 here, see the device notes).
Not yet: the time split between attention, MLP, router, optimizer and communication (#5).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

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
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    commit = git.stdout.strip() or "unknown (no git here: name it when committing the result)"
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
    tag = next((k.lower() for k in PEAK_BF16_TFLOPS if k in device), "cpu")
    out = REPO / "benchmarks" / f"train_{Path(args.config).stem}_{tag}.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
