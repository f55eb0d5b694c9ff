"""Decode attention over a static KV cache: the split-K kernels that read only the filled rows
(dsmoe.model.decode_attention) against the torch version over every row (compiled, as the Engine ran it),
alone and in whole DS-MoE-1B decode steps, in one process.

    python benchmarks/bench_decode_attention.py [--out-dir benchmarks] [--max-len 2048]
    TRITON_INTERPRET=1 python benchmarks/bench_decode_attention.py --cpu-smoke   # the script on CPU, tiny

1. The attention alone: 24 layers of caches (distinct, so nothing is served from L2) of DS-MoE-1B's shape
   (32 query heads over 2 K/V heads, head_dim 64, bf16), max_len rows each, at several filled lengths and
   batch sizes, each version replayed as one CUDA graph: us per layer, and the kernel's K/V bytes per second.
2. Whole decode steps: an Engine on DS-MoE-1B (random init, top-4 MLP, compiled, CUDA graph) with a max_len
   cache, 128-token prompts, each version: tokens/s.
Writes decode_attention_<gpu>.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from _cli import device_tag, git_commit, graph_ms  # noqa: E402
from bench_infer import bench_decode  # noqa: E402

from dsmoe import config as config_lib  # noqa: E402
from dsmoe.model import Routing, RoutingRule, build  # noqa: E402
from dsmoe.model.decode_attention import decode_attention, decode_attention_reference  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 24, 32, 2, 64  # DS-MoE-1B's attention


def attention_alone(batch: int, length: int, max_len: int, device, reference) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
    caches = [
        [torch.randn(batch, KV_HEADS, max_len, HEAD_DIM, device=device, dtype=dtype) for _ in range(2)]
        for _ in range(LAYERS)
    ]
    pos = torch.tensor(length - 1, device=device)
    positions = torch.arange(max_len, device=device)
    timed = {
        "torch": lambda: [reference(q, k, v, pos, positions) for k, v in caches],
        "kernel": lambda: [decode_attention(q, k, v, pos) for k, v in caches],
    }
    repeats = 30 if device.type == "cuda" else 1
    us = {
        name: graph_ms(fn, repeats, warmup=2 if repeats > 1 else 0) * 1e3 / LAYERS
        for name, fn in timed.items()
    }
    kv_bytes = 2 * batch * KV_HEADS * length * HEAD_DIM * q.element_size()  # the rows the kernel reads
    return {
        "batch": batch,
        "length": length,
        "max_len": max_len,
        "torch_us": us["torch"],
        "kernel_us": us["kernel"],
        "speedup": us["torch"] / us["kernel"],
        "kernel_kv_gb_per_s": kv_bytes / (us["kernel"] * 1e-6) / 1e9,
    }


def model_1b(max_len: int, device):
    """DS-MoE-1B (random init) as bench_infer builds it, vocab from its tokenizer setting; the smoke run: a tiny
    model of the same layout."""
    path, extra = (
        ("configs/tiny.yaml", ["model.attention.heads=4", "model.attention.experts=0"])
        if (device.type == "cpu")
        else ("configs/dsmoe_1b.yaml", [])
    )
    cfg = config_lib.load(path, [*extra, f"model.max_seq_len={max_len}"])
    cfg = config_lib.load(
        path, [*extra, f"model.max_seq_len={max_len}", f"model.vocab_size={cfg.data.tokenizer_vocab_size}"]
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = build(cfg.model)
    return model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()


def whole_model(model, batch: int, max_len: int, steps: int) -> dict:
    """Top-4 decode steps after a 128-token prompt (8 on CPU) with each attention, timed in interleaved
    rounds (bench_decode): tokens/s."""
    cuda = model.embed.weight.is_cuda
    row = {"batch": batch, "max_len": max_len, "prompt": 128 if cuda else 8, "steps": steps}
    top4 = Routing(RoutingRule("top_k", k=4))
    engines = [
        (name, top4, {"attention_kernel": kernel}) for name, kernel in (("torch", False), ("kernel", True))
    ]
    for timed in bench_decode(model, engines, batch, row["prompt"], steps, compile=cuda, max_len=max_len):
        row[f"{timed['rule']}_tokens_per_s"] = timed["tokens_per_s"]
    row["speedup"] = row["kernel_tokens_per_s"] / row["torch_tokens_per_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    global LAYERS
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    max_len = 128 if args.cpu_smoke else args.max_len
    if args.cpu_smoke:
        LAYERS = 2
    reference = (
        torch.compile(decode_attention_reference) if device.type == "cuda" else decode_attention_reference
    )
    alone = [
        attention_alone(batch, length, max_len, device, reference)
        for batch in (1, 64 if device.type == "cuda" else 2)
        for length in sorted({128 if device.type == "cuda" else 16, max_len // 2, max_len})
    ]
    model = model_1b(max_len, device)  # once, for every batch size
    whole = [
        whole_model(model, batch, max_len, 32 if device.type == "cuda" else 2)
        for batch in (1, 64)[: 2 if device.type == "cuda" else 1]
    ]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"
    command = "python benchmarks/bench_decode_attention.py " + " ".join(sys.argv[1:])
    lines = [
        f"# Decode attention over a {max_len}-row KV cache on {name}",
        "",
        f"- date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {git_commit()}, torch {torch.__version__}",
        f"- command: `{command.strip()}`",
        "- torch: `decode_attention_reference` compiled (every row, the later ones masked, keys cast to fp32), "
        "as the Engine ran it; kernel: `decode_attention` (split-K Triton, the filled rows only)",
        "",
        f"## Attention alone ({LAYERS} layers of {HEADS} query heads over {KV_HEADS} K/V heads, head_dim {HEAD_DIM}, "
        "one CUDA graph each)",
        "",
        "| batch | filled rows | torch us/layer | kernel us/layer | kernel vs torch | kernel K/V GB/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['batch']} | {r['length']} | {r['torch_us']:.1f} | {r['kernel_us']:.1f} | {r['speedup']:.2f}x "
        f"| {r['kernel_kv_gb_per_s']:.0f} |"
        for r in alone
    ]
    lines += [
        "",
        "## Whole decode steps (DS-MoE-1B, top-4, compiled, CUDA graph, 128-token prompts)",
        "",
        "| batch | max_len | torch tokens/s | kernel tokens/s | kernel vs torch |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['batch']} | {r['max_len']} | {r['torch_tokens_per_s']:,.0f} | {r['kernel_tokens_per_s']:,.0f} "
        f"| {r['speedup']:.2f}x |"
        for r in whole
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"decode_attention_{device_tag() if device.type == 'cuda' else 'cpu'}"
    stem.with_suffix(".md").write_text(text)
    meta = {"device": name, "commit": git_commit(), "command": command.strip()}
    stem.with_suffix(".json").write_text(json.dumps({**meta, "alone": alone, "whole": whole}, indent=2))


if __name__ == "__main__":
    main()
