"""When does sparse MoA attention pay? Times one MoA layer's forward, dense vs sparse rules.

    python benchmarks/bench_moa_sparse.py [--device cpu|cuda] [--d-model 512] [--experts 8] ...

Sparse MoA skips the dropped experts' query and output projections; K/V and the attention core over all
heads still run. Writes benchmarks/moa_sparse_<device>.md (device, date, commit, command) and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # tools/_cli.py
from _cli import git_commit  # noqa: E402

from dsmoe import config as config_lib  # noqa: E402
from dsmoe.model.attention import CausalSelfAttention, rope_cos_sin  # noqa: E402
from dsmoe.model.moe import RoutingRule  # noqa: E402


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of fn() over repeats, after a warm-up."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--heads-per-expert", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    overrides = [
        f"model.d_model={args.d_model}",
        "model.attention.heads=0",
        f"model.attention.experts={args.experts}",
        f"model.attention.heads_per_expert={args.heads_per_expert}",
        f"model.attention.kv_heads={args.kv_heads}",
        f"model.max_seq_len={args.seq}",
        f"data.seq_len={min(args.seq, 128)}",
    ]
    cfg = config_lib.load(None, overrides).model
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = CausalSelfAttention(cfg).to(args.device, dtype).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(args.batch, args.seq, args.d_model, device=args.device, dtype=dtype)
    cos, sin = rope_cos_sin(args.seq, cfg.head_dim, 10000.0, args.device)
    rules = [RoutingRule()] + [RoutingRule("top_k", k=k) for k in (args.experts // 2, args.experts // 4, 1)]
    rows = []
    with torch.no_grad():
        dense_time = None
        for rule in rules:
            seconds = timed(lambda rule=rule: layer(x, cos, sin, rule), args.device, args.repeats)
            dense_time = dense_time or seconds
            rows.append((str(rule), seconds * 1e3, dense_time / seconds))
    commit = git_commit()
    device_name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    lines = [
        f"# Sparse MoA attention vs dense: one layer's forward ({args.device})",
        "",
        f"- device: {device_name}; dtype {str(dtype).removeprefix('torch.')}; torch {torch.__version__}",
        f"- date: {datetime.date.today()}, commit {commit}",
        f"- command: `python benchmarks/bench_moa_sparse.py {' '.join(sys.argv[1:])}`",
        f"- shape: d_model {args.d_model}, {args.experts} experts x {args.heads_per_expert} query heads, "
        f"{args.kv_heads} shared K/V heads, batch {args.batch} x {args.seq} tokens; median of {args.repeats}",
        "",
        "| rule | ms | speed-up over dense |",
        "|---|---|---|",
        *(f"| {name} | {ms:.2f} | {speedup:.2f}x |" for name, ms, speedup in rows),
        "",
    ]
    text = "\n".join(lines)
    out = REPO / "benchmarks" / f"moa_sparse_{args.device}.md"
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
