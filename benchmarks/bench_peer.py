"""Our Engine against stock transformers Qwen3-MoE on the same weights (issue #23 item 4).

    python benchmarks/bench_peer.py [--out-dir benchmarks] [--new-tokens 64]   # GPU: tokens/s at batch 1, 64
    python benchmarks/bench_peer.py --trained RUN_DIR [--top-k 2]              # greedy outputs compared
    python benchmarks/bench_peer.py --cpu-smoke                                # try the speed run on a tiny model

Speed: a DS-MoE-1B-sized model that Qwen3-MoE can hold (configs/dsmoe_1b.yaml with SwiGLU experts of width
176, plain GQA attention with QK-norm; random init, bf16) gives a copy of its weights to transformers'
Qwen3MoeForCausalLM (dsmoe.export.qwen3_moe_from: top-4, no renormalisation). Both generate greedily from the
same prompts: transformers by its fastest documented path (static cache, with which generate() compiles the
decoding forward itself, mode="reduce-overhead", and grouped_mm experts, the default of transformers 5), ours
by dsmoe.infer.Engine (top-4, compiled segments, CUDA-graph decode). Wrapping forward in torch.compile as
well, as transformers 4 advised, compiles the decode twice (nested) and did not finish in 150 s on an H100.

Outputs: a trained run that exports as Qwen3-MoE (configs/tiny_qwen3moe.yaml) generates greedily in both, from
held-out prompts, and the continuations are compared token by token (on random weights the routing is decided
by rounding, so only a trained model says whether the two agree). Runs on CPU (fp32) or GPU.
Writes peer_<device>.md/.json under --out-dir (speed) or prints the comparison (--trained).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from _cli import device_tag, elapsed_ms, git_commit  # noqa: E402

from dsmoe import config as config_lib  # noqa: E402
from dsmoe.export import load_from_run, qwen3_moe_from  # noqa: E402
from dsmoe.infer import Engine, generate_fast  # noqa: E402
from dsmoe.model import Routing, RoutingRule, build  # noqa: E402

QWEN_1B = [
    "model.attention.experts=0", "model.attention.heads=32", "model.attention.kv_heads=2",
    "model.attention.qk_norm=true", "model.moe.activation=swiglu", "model.moe.expert_hidden=176",
]  # fmt: skip
"""configs/dsmoe_1b.yaml as Qwen3-MoE can hold it: SwiGLU (3 x 176 ~ the parameters of 2 x 256 GeLU), no MoA."""
SMOKE = [
    "model.d_model=128", "model.n_layers=2", "model.max_seq_len=256", "model.vocab_size=512",
    "model.moe.num_experts=8", "model.moe.expert_hidden=48", "model.attention.heads=4", "data.seq_len=128",
]  # fmt: skip


def stock_generate(qwen, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    kw = {"do_sample": False, "pad_token_id": 0, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    with torch.no_grad():
        return qwen.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)


def timed(fn, warmup: int = 2) -> tuple[float, torch.Tensor]:
    """Seconds of one fn() after `warmup` untimed calls (compiles, captures, autotunes), and its output."""
    for _ in range(warmup):
        fn()
    out = []
    return elapsed_ms(lambda: out.append(fn())) / 1e3, out[0]


def speed(args) -> int:
    device = "cpu" if args.cpu_smoke else "cuda"
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    torch.manual_seed(0)
    cfg = config_lib.load(REPO / "configs/dsmoe_1b.yaml", QWEN_1B + (SMOKE if args.cpu_smoke else []))
    with torch.device(device):
        model = build(cfg.model).to(dtype).eval()
    qwen = qwen3_moe_from(model, cfg, top_k=4).to(device, dtype).eval()
    qwen.generation_config.cache_implementation = (
        "static"  # on CUDA, generate() then compiles the decode step
    )
    compiled = "not compiled (CPU smoke)"
    if not args.cpu_smoke:
        compiled = f"decode compiled by generate() ({qwen.config._experts_implementation} experts)"
    routing = Routing(RoutingRule("top_k", k=4))
    rows, started = [], time.monotonic()
    for batch in (1, 64):
        prompt = torch.randint(1, cfg.model.vocab_size, (batch, args.prompt), device=device)
        print(f"batch {batch}: transformers ({time.monotonic() - started:.0f} s)", flush=True)
        stock_s, theirs = timed(lambda prompt=prompt: stock_generate(qwen, prompt, args.new_tokens))
        engine = Engine(
            model, routing, batch=batch, max_len=args.prompt + args.new_tokens, compile=not args.cpu_smoke
        )
        print(f"batch {batch}: dsmoe ({time.monotonic() - started:.0f} s)", flush=True)
        ours_s, mine = timed(
            lambda engine=engine, prompt=prompt: generate_fast(
                engine, prompt, args.new_tokens, temperature=0
            ),
        )
        new = slice(args.prompt, None)
        rows.append(
            {
                "batch": batch,
                "stock_tokens_per_s": batch * args.new_tokens / stock_s,
                "ours_tokens_per_s": batch * args.new_tokens / ours_s,
                "speedup": stock_s / ours_s,
                "same_tokens": (mine[:, new] == theirs[:, new]).float().mean().item(),
            }
        )
        print(rows[-1], flush=True)
        del engine
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run)",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "command": f"python benchmarks/bench_peer.py {' '.join(sys.argv[1:])}",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "stock_path": f"Qwen3MoeForCausalLM, static cache, {compiled}",
        "params": model.num_params(),
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    name = result["device"]
    tag = device_tag(name)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"peer_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# dsmoe Engine vs stock transformers Qwen3-MoE, same weights ({name})",
        "",
        f"- date {result['date']}, commit {result['commit']}, torch {result['torch']}, transformers "
        f"{result['transformers']}; {result['params'] / 1e6:.0f}M parameters (DS-MoE-1B as Qwen3-MoE: SwiGLU "
        "experts, GQA with QK-norm), random init, top-4 of 32 experts, greedy",
        f"- command: `{result['command']}`",
        f"- transformers: {result['stock_path']}; dsmoe: Engine, compiled segments, CUDA-graph decode",
        f"- prompt {args.prompt} tokens, {args.new_tokens} new tokens; tokens/s = batch x new tokens / generate time "
        "(prefill included); `same tokens` is not a correctness check on random weights (routing by rounding)",
        "",
        "| batch | transformers tok/s | dsmoe tok/s | speed-up | target | same tokens |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['batch']} | {r['stock_tokens_per_s']:.0f} | {r['ours_tokens_per_s']:.0f} | "
            f"{r['speedup']:.2f}x | {3.0 if r['batch'] == 1 else 1.5}x | {r['same_tokens']:.0%} |"
            for r in rows
        ),
    ]
    (out / f"peer_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def outputs(args) -> int:
    """Greedy continuations of held-out prompts by stock transformers and by our Engine, on a trained run."""
    from tokenizers import Tokenizer

    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    model, cfg, tokenizer_path, step = load_from_run(args.trained)
    model = model.to(device).eval()
    qwen = qwen3_moe_from(model, cfg, top_k=args.top_k).to(device).eval()
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    prompts = [
        "ROMEO:\nBut soft, what light through yonder window breaks?",
        "HAMLET:\nTo be, or not to be, that is the question:",
        "KING LEAR:\nBlow, winds, and crack your cheeks! rage! blow!",
        "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?",
        "MACBETH:\nIs this a dagger which I see before me,",
        "PORTIA:\nThe quality of mercy is not strain'd,",
        "PROSPERO:\nWe are such stuff as dreams are made on,",
        "VIOLA:\nIf music be the food of love, play on;",
    ][: args.prompts]
    routing = Routing(RoutingRule("top_k", k=args.top_k))
    same, total, first_diffs = 0, 0, []
    for text in prompts:
        ids = torch.tensor([tokenizer.encode(text).ids], device=device)
        theirs = stock_generate(qwen, ids, args.new_tokens)[0, ids.shape[1] :]
        engine = Engine(model, routing, batch=1, max_len=ids.shape[1] + args.new_tokens)
        mine = generate_fast(engine, ids, args.new_tokens, temperature=0)[0, ids.shape[1] :]
        agree = (mine == theirs).tolist()
        same, total = same + sum(agree), total + len(agree)
        first_diffs.append(agree.index(False) if False in agree else None)
    print(
        f"{args.trained} (step {step}, {device}, top-{args.top_k}): {len(prompts)} prompts x {args.new_tokens} "
        f"greedy tokens, {same}/{total} the same ({same / total:.1%}); first difference per prompt: {first_diffs}"
    )
    return 0 if same == total else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (speed run)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--trained", help="a trained run that exports as Qwen3-MoE: compare greedy outputs")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token for --trained")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--cpu-smoke", action="store_true", help="the speed run on a tiny model on CPU")
    args = parser.parse_args()
    return outputs(args) if args.trained else speed(args)


if __name__ == "__main__":
    raise SystemExit(main())
