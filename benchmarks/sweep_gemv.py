"""The decode gather-GEMV's tiles (dsmoe.model.sparse.GEMV_TILES), timed on the GPU: each candidate runs the
expert kernels of 24 layers (distinct weights, so nothing is served from L2) in one captured CUDA graph, as
an Engine decode step does, for top-4 at batch 1 and a threshold rule's masked table at batch 1 (every
pair listed, ~6 of 32 with a weight). First the up kernel's tiles with the down kernel's default, then the
down kernel's with the best up tiles. Prints a table per case and the best tiles.

    python benchmarks/sweep_gemv.py [--out benchmarks/sweep_gemv_<device>.md] [--json best.json]
    TRITON_INTERPRET=1 python benchmarks/sweep_gemv.py --cpu-smoke   # try the script on CPU (tiny shapes)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from _cli import git_commit, graph_ms  # noqa: E402

from dsmoe.model.sparse import GEMV_TILES, gemv_topk_partials  # noqa: E402

LAYERS, E, F, D = 24, 32, 256, 2048  # the DS-MoE-1B MLP shape


def cases(device):
    g = torch.Generator(device=device).manual_seed(0)
    top4 = lambda T: torch.rand(T, E, generator=g, device=device).topk(4, -1)  # noqa: E731
    probs = torch.rand(1, E, generator=g, device=device).softmax(-1)
    masked = probs * (torch.rand(1, E, generator=g, device=device) < 6 / E)  # ~6 kept
    ids = torch.arange(E, device=device).repeat(1, 1)
    return {
        "top-4, batch 1": (1, *top4(1)),
        "threshold (masked table), batch 1": (1, masked, ids),
    }


def layer_us(x, gates, ids, w_in, w_out, tiles) -> float:
    """Median microseconds a layer of the expert kernels of every layer, replayed as one CUDA graph (on CPU,
    the --cpu-smoke run: one eager call)."""

    def step():
        for layer in range(LAYERS):
            gemv_topk_partials(x, gates, ids, w_in[layer], w_out[layer], "gelu", tiles).sum(0)

    repeats = 30 if torch.cuda.is_available() else 1
    return graph_ms(step, repeats, warmup=2 if repeats > 1 else 0) * 1e3 / LAYERS


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="write the best tiles per case here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    global LAYERS, E, F, D
    if args.cpu_smoke:
        LAYERS, E, F, D = 2, 8, 16, 64
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    torch.manual_seed(0)
    w_in = [torch.randn(E, F, D, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
    w_out = [torch.randn(E, F, D, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
    up_grid = [
        {"up_f": f, "up_d": d, "up_warps": w}
        for f, d, w in itertools.product((4, 8, 16), (512, 1024, 2048), (2, 4))
    ]
    down_grid = [
        {"down_f": f, "down_d": d, "down_warps": w}
        for f, d, w in itertools.product((32, 64, 128), (128, 256), (2, 4))
    ]
    if args.cpu_smoke:
        up_grid, down_grid = up_grid[:2], down_grid[:2]
    name = "CPU (smoke run)" if args.cpu_smoke else torch.cuda.get_device_name()
    lines = [
        f"# Gather-GEMV tiles for decode ({name})",
        "",
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {git_commit()}, "
        f"`python benchmarks/sweep_gemv.py`; default {GEMV_TILES}. us per layer (up + down + the partial sums "
        f"added up), {LAYERS} layers of E={E}, F={F}, D={D}, GeLU, bf16, in one CUDA graph.",
        "",
    ]
    best_tiles = {}
    for case, (T, gates, ids) in cases(device).items():
        x = torch.randn(T, D, device=device, dtype=torch.bfloat16)

        timed = functools.partial(layer_us, x, gates, ids, w_in, w_out)
        default = timed({})
        rows = [("default", GEMV_TILES, default)]
        # the defaults stand among the candidates: "best" is never a step back from them
        best_up = min(((tiles, timed(tiles)) for tiles in [{}, *up_grid]), key=lambda r: r[1])
        rows.append(("best up", best_up[0], best_up[1]))
        best_down = min(
            ((tiles, timed({**best_up[0], **tiles})) for tiles in [{}, *down_grid]), key=lambda r: r[1]
        )
        best = {**best_up[0], **best_down[0]}
        rows.append(("best up + best down", best, best_down[1]))
        best_tiles[case] = {"tiles": best, "us": best_down[1], "default_us": default}
        if args.json:  # each case as it ends: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(best_tiles, indent=2))
        lines += [f"## {case}", "", "| tiles | | us/layer | vs default |", "|---|---|---|---|"]
        lines += [f"| {label} | `{tiles}` | {us:.2f} | {default / us:.2f}x |" for label, tiles, us in rows]
        lines.append("")
        print("\n".join(lines[-len(rows) - 5 :]), flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
