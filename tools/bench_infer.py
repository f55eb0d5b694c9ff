"""Sparse vs dense inference of one DS-MoE MLP layer: prefill and decode, against computing all experts.

    python tools/bench_infer.py [--d-model 2048] [--experts 32] [--expert-hidden 256] [--prefill-tokens 16384]

Times (CUDA events, median) the dense all-experts forward and the sparse forward at top-K for several K,
for a prefill of many tokens and for decode batches of 1 and 64 tokens, with the expert path the layer
picks (torch._grouped_mm on Hopper, the per-expert loop elsewhere). Writes
benchmarks/infer_<device>.md and .png (speed-up against the active fraction) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _cli import git_commit  # noqa: E402

from dsmoe.model.moe import DSMoE, RoutingRule, grouped_gemm_available  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def median_ms(fn, repeats: int) -> float:
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=repeats * 10, return_mode="median"))
    import time

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--expert-hidden", type=int, default=256)
    parser.add_argument("--activation", default="gelu")
    parser.add_argument("--prefill-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = DSMoE(args.d_model, args.experts, args.expert_hidden, args.activation)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    layer = layer.to(device, dtype).eval()
    ks = [k for k in (1, 2, 4, 8, 16) if k < args.experts] + [args.experts]
    rows = []
    with torch.no_grad():
        for phase, tokens in (("prefill", args.prefill_tokens), ("decode b64", 64), ("decode b1", 1)):
            x = torch.randn(tokens, args.d_model, device=device, dtype=dtype)
            dense = median_ms(lambda x=x: layer(x), args.repeats)
            rows.append((phase, "dense (all experts)", 1.0, dense, 1.0))
            for k in ks:
                ms = median_ms(lambda x=x, k=k: layer(x, RoutingRule("top_k", k=k)), args.repeats)
                rows.append((phase, f"top-{k}", k / args.experts, ms, dense / ms))
    path = (
        "torch._grouped_mm"
        if grouped_gemm_available(torch.empty(1, device=device, dtype=dtype))
        else "per-expert loop"
    )
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    commit = git_commit()
    lines = [
        f"# Sparse vs dense inference of one DS-MoE MLP layer ({name})",
        "",
        f"- date {datetime.date.today()}, commit {commit}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}",
        f"- command: `python tools/bench_infer.py {' '.join(sys.argv[1:])}`",
        f"- layer: d_model {args.d_model}, {args.experts} {args.activation} experts x {args.expert_hidden}; "
        f"sparse expert path: {path}; median of CUDA-event timings",
        "",
        "| phase | rule | active experts | ms | speed-up over dense |",
        "|---|---|---|---|---|",
        *(f"| {p} | {r} | {100 * a:.1f}% | {ms:.3f} | {s:.2f}x |" for p, r, a, ms, s in rows),
        "",
    ]
    tag = "h100" if "H100" in name else ("h200" if "H200" in name else device)
    out = REPO / "benchmarks" / f"infer_{tag}.md"
    out.write_text("\n".join(lines))
    plot(rows, out.with_suffix(".png"), name)
    print("\n".join(lines))
    return 0


def plot(rows, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for phase in dict.fromkeys(r[0] for r in rows):
        sub = [r for r in rows if r[0] == phase and r[1].startswith("top")]
        ax.plot([100 * r[2] for r in sub], [r[4] for r in sub], "o-", label=phase)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(
        xscale="log",
        xlabel="active experts (%)",
        ylabel="speed-up over all experts",
        title=f"DS-MoE layer, {name}",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
