"""The issue-5 layer targets, measured in one process: forward + backward time of

  MLP:        a DS-MoE MLP layer (d 2048, 32 experts x 256, GeLU, router + MI loss included) against a dense
              GeLU MLP of the same total width (8192), 16384 tokens; eager and torch.compile'd; target <= 1.05x.
  attention:  MoA (16 experts x 2 heads and 8 x 4, 2 shared K/V heads) against plain grouped-query attention
              with the same 32 query heads over the same 2 K/V heads (8 x 2048 tokens); target <= 1.15x.
  kernels:    the causal SDPA core of those shapes under each backend PyTorch has here (flash, cuDNN,
              memory-efficient; grouped K/V or expanded), and a bf16 8192^3 matmul as the device's ceiling.

    python benchmarks/bench_layers.py [--out benchmarks] [--tag h200] [--no-compile]

Times are medians of CUDA-event-timed repeats after warm-up, inputs random normal (never zeros). Every
variant's output is compared with its plain eager reference (relative L2 error printed). Writes
<out>/layers_<tag>.md and .json with device, date, commit and the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # tools/_cli.py
from _cli import cuda_ms, device_tag, git_commit  # noqa: E402

from dsmoe import config as config_lib  # noqa: E402
from dsmoe.model import attention as attention_lib  # noqa: E402
from dsmoe.model.attention import CausalSelfAttention, rope_cos_sin  # noqa: E402
from dsmoe.model.mlp import DenseMLP  # noqa: E402
from dsmoe.model.moe import DSMoE, Router  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def init_(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() >= 2 else torch.nn.init.ones_(p)
    return module


def fwd_bwd(module, inputs: tuple, grad: torch.Tensor):
    """One forward + backward through `module`: the output gets `grad`, an MI loss (if any) weight 1."""

    def step():
        module.zero_grad(set_to_none=True)
        out = module(*inputs)
        y, aux = out if isinstance(out, tuple) else (out, None)
        tensors, grads = [y], [grad]
        if aux is not None:
            tensors.append(aux.mi_loss)
            grads.append(torch.ones_like(aux.mi_loss))
        torch.autograd.backward(tensors, grads)
        return y

    return step


def timed_variant(
    name, module, inputs, grad, compile_: bool | str, reference: torch.Tensor | None, flops: float
):
    """Time fwd+bwd of module (eager, compiled, or compiled in the torch.compile mode `compile_` names);
    returns a row with ms, TFLOP/s and the error vs reference."""
    row = {"name": name, "compiled": compile_}
    if compile_:
        torch._dynamo.reset()  # a fresh compile per variant: class switches (Router.fused) take effect
    mode = compile_ if isinstance(compile_, str) else None
    target = torch.compile(module, mode=mode) if compile_ else module
    step = fwd_bwd(target, inputs, grad)
    started = time.perf_counter()
    try:
        y = step()
        torch.cuda.synchronize()
    except Exception as e:  # a backend this build lacks: say so in the table, keep going
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row, None
    row["first_call_s"] = time.perf_counter() - started
    row["ms"] = cuda_ms(step, repeats=30, warmup=10)
    row["tflops"] = flops / row["ms"] / 1e9
    if reference is not None:
        row["rel_err"] = rel_err(y.detach(), reference)
    return row, y.detach()


def mlp_layers(tokens: int, d: int, experts: int, hidden: int):
    """The MLP sections' inputs: x and its output gradient (bf16, CUDA), the FLOPs counted, a dense GeLU MLP of
    the total width and the DS-MoE layer."""
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, d, device=dev, dtype=dt, requires_grad=True)
    grad = torch.randn(tokens, d, device=dev, dtype=dt)
    flops = 6.0 * tokens * 2 * d * experts * hidden  # two GEMMs, forward + backward
    dense = init_(DenseMLP(d, experts * hidden, "gelu")).to(dev, dt)
    moe = init_(DSMoE(d, experts, hidden, "gelu")).to(dev, dt)
    return x, grad, flops, dense, moe


def mlp_section(tokens: int, d: int, experts: int, hidden: int, compile_: bool) -> list[dict]:
    x, grad, flops, dense, moe = mlp_layers(tokens, d, experts, hidden)
    rows = []
    modes = [False, True] if compile_ else [False]

    class Experts(torch.nn.Module):  # the experts alone, router probabilities given
        def __init__(self):
            super().__init__()
            self.moe = moe

        def forward(self, x_TD, probs_TE):
            return self.moe._dense_forward(x_TD, probs_TE)

    probs = torch.softmax(torch.randn(tokens, experts, device=x.device), -1).requires_grad_()
    for run in (1, 2):  # the same variants twice: their spread is the noise
        for mode in modes:
            base, _ = timed_variant(
                f"dense MLP (width 8192), pass {run}", dense, (x,), grad, mode, None, flops
            )
            rows.append(base)
            ref = None
            for router_fused, act_fused, label in [
                (False, False, "DS-MoE layer, plain (fp32 upcast router, torch GeLU x p)"),
                (True, False, "DS-MoE layer, fp32-out router GEMM, torch GeLU x p"),
                (True, True, "DS-MoE layer, fp32-out router GEMM, Triton GeLU x p (default)"),
            ]:
                Router.fused, DSMoE.fused = router_fused, act_fused
                row, y = timed_variant(f"{label}, pass {run}", moe, (x,), grad, mode, ref, flops)
                ref = y if ref is None else ref
                row["vs_dense"] = row.get("ms", float("nan")) / base["ms"]
                rows.append(row)
            Router.fused = DSMoE.fused = True
            label = f"DS-MoE experts only (probs given), pass {run}"
            row, _ = timed_variant(label, Experts(), (x, probs), grad, mode, None, flops)
            row["vs_dense"] = row.get("ms", float("nan")) / base["ms"]
            rows.append(row)
    return rows


def autotune_section(tokens: int, d: int, experts: int, hidden: int) -> list[dict]:
    """The MLP layers compiled with mode max-autotune-no-cudagraphs (train.compile_mode): inductor times its
    Triton GEMM templates against cuBLAS and may fuse the GeLU (x p) into the up GEMM's epilogue. Ratios
    against the dense MLP compiled in the default mode, the figure the training benchmarks stand on."""
    x, grad, flops, dense, moe = mlp_layers(tokens, d, experts, hidden)
    autotune = "max-autotune-no-cudagraphs"
    rows = []
    for run in (1, 2):  # the second pass reuses inductor's autotuning cache: its spread is the noise
        base, _ = timed_variant(
            f"dense MLP (width {experts * hidden}), pass {run}", dense, (x,), grad, True, None, flops
        )
        rows.append(base)
        variants = [
            (dense, None, "dense MLP"),
            (moe, True, "DS-MoE layer, Triton GeLU x p"),
            (moe, False, "DS-MoE layer, torch GeLU x p (what train.compile_mode gives)"),
        ]
        for module, fused, label in variants:
            if fused is not None:
                DSMoE.fused = fused
            row, _ = timed_variant(f"{label}, pass {run}", module, (x,), grad, autotune, None, flops)
            row["vs_dense"] = row.get("ms", float("nan")) / base["ms"]
            rows.append(row)
        DSMoE.fused = True
    return rows


def attention_section(batch: int, seq: int, d: int, compile_: bool, priorities: list[tuple]) -> list[dict]:
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(batch, seq, d, device=dev, dtype=dt, requires_grad=True)
    grad = torch.randn(batch, seq, d, device=dev, dtype=dt)
    rows = []
    shapes = [
        ("GQA 32 heads / 2 KV", ["model.attention.heads=32", "model.attention.experts=0"]),
        (
            "MoA 16 experts x 2 heads / 2 KV",
            ["model.attention.heads=0", "model.attention.experts=16", "model.attention.heads_per_expert=2"],
        ),
        (
            "MoA 8 experts x 4 heads / 2 KV",
            ["model.attention.heads=0", "model.attention.experts=8", "model.attention.heads_per_expert=4"],
        ),
    ]
    modules = {}
    for name, overrides in shapes:
        cfg = config_lib.load(
            "configs/tiny.yaml",
            [f"model.d_model={d}", f"model.max_seq_len={seq}", "model.attention.kv_heads=2", *overrides],
        ).model
        torch.manual_seed(0)
        modules[name] = init_(CausalSelfAttention(cfg)).to(dev, dt)
    hd = d // 32
    cos, sin = rope_cos_sin(seq, hd, 10000.0, dev)
    # projections (q, o: d x d; k, v: d x 128) and the causal core (score and value products, halved)
    flops = 6.0 * batch * seq * (2 * d * d + 2 * d * 128) + 6.0 * batch * seq * seq * 32 * hd
    modes = [False, True] if compile_ else [False]
    for run, priority in enumerate(priorities, 1):
        attention_lib.SDPA_PRIORITY = priority
        for mode in modes:
            base = None
            for name, module in modules.items():
                label = f"{name}, SDPA {'/'.join(priority) or 'default order'}, pass {run}"
                row, _ = timed_variant(label, module, (x, cos, sin), grad, mode, None, flops)
                base = row if base is None else base
                row["vs_gqa"] = row.get("ms", float("nan")) / base.get("ms", float("nan"))
                rows.append(row)
    attention_lib.SDPA_PRIORITY = ()
    if attention_lib.flash_attn_4() is not None:  # the same modules on model.attention.backend=flash4
        for module in modules.values():
            module.backend = "flash4"
        for mode in modes:
            base = None
            for name, module in modules.items():
                row, _ = timed_variant(
                    f"{name}, FlashAttention-4", module, (x, cos, sin), grad, mode, None, flops
                )
                base = row if base is None else base
                row["vs_gqa"] = row.get("ms", float("nan")) / base.get("ms", float("nan"))
                rows.append(row)
    return rows


def sdpa_kernels(batch: int, seq: int, heads: int, kv: int, hd: int) -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(batch, heads, seq, hd, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(batch, kv, seq, hd, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(batch, kv, seq, hd, device=dev, dtype=dt, requires_grad=True)
    grad = torch.randn(batch, heads, seq, hd, device=dev, dtype=dt)
    flops = 3.0 * 2 * 2 * batch * heads * seq * seq * hd / 2  # model FLOPs: fwd + 2x bwd, causal half
    ref = attention_lib.eager_attention(q[:1].float(), k[:1].float(), v[:1].float()).to(dt)
    rows = []
    for backend in [None, "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"]:
        for expand in (False, True):

            def step(backend=backend, expand=expand):
                q.grad = k.grad = v.grad = None
                kk = k.repeat_interleave(heads // kv, 1) if expand else k
                vv = v.repeat_interleave(heads // kv, 1) if expand else v
                args = dict(is_causal=True, enable_gqa=not expand)
                if backend is None:
                    y = F.scaled_dot_product_attention(q, kk, vv, **args)
                else:
                    with sdpa_kernel(getattr(SDPBackend, backend)):
                        y = F.scaled_dot_product_attention(q, kk, vv, **args)
                y.backward(grad)
                return y

            row = {
                "name": f"SDPA {backend or 'default'}, K/V {'expanded' if expand else 'grouped (enable_gqa)'}"
            }
            try:
                y = step()
                torch.cuda.synchronize()
                row["ms"] = cuda_ms(step, repeats=30, warmup=10)
                row["tflops"] = flops / row["ms"] / 1e9
                row["rel_err"] = rel_err(y[:1].detach(), ref)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
    rows += flash_attn_4_rows(q, k, v, grad, flops, ref)
    return rows


def flash_attn_4_rows(q, k, v, grad, flops: float, ref) -> list[dict]:
    """The same core by FlashAttention-4 (CuTeDSL, Hopper and Blackwell) where it is installed: on the lent
    GPU, `source tools/device_wheels.sh fa4-install` after carrying its wheels (see there). (B, S, H, hd)
    layout, grouped K/V."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError:
        return []
    qs, ks, vs = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    grad_s = grad.transpose(1, 2).contiguous()

    def step():
        qs.grad = ks.grad = vs.grad = None
        out = flash_attn_func(qs, ks, vs, causal=True)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(grad_s)
        return y

    row = {"name": "FlashAttention-4 (flash-attn-4, CuTeDSL), K/V grouped"}
    try:
        y = step()
        torch.cuda.synchronize()
        row["ms"] = cuda_ms(step, repeats=30, warmup=10)
        row["tflops"] = flops / row["ms"] / 1e9
        row["rel_err"] = rel_err(y[:1].detach().transpose(1, 2), ref)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return [row]


def matmul_peak() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = cuda_ms(lambda: a @ b, warmup=5, repeats=20)
    return {"name": "bf16 matmul 8192^3", "ms": ms, "tflops": 2 * 8192**3 / ms / 1e9}


def fmt(row: dict, ratio_key: str | None) -> str:
    if "error" in row:
        return f"| {row['name']} | {'compiled' if row.get('compiled') else 'eager'} | - | - | - | {row['error']} |"
    ratio = f"{row[ratio_key]:.3f}x" if ratio_key and ratio_key in row else ""
    err = f"{row['rel_err']:.1e}" if "rel_err" in row else ""
    compiled = row.get("compiled")
    mode = compiled if isinstance(compiled, str) else "compiled" if compiled else "eager"
    return f"| {row['name']} | {mode} | {row['ms']:.3f} | {row['tflops']:.0f} | {ratio} | {err} |"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument(
        "--autotune",
        action="store_true",
        help="also the MLP layers under max-autotune-no-cudagraphs (minutes)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_layers needs a CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    tag = args.tag or device_tag(device)
    compile_ = not args.no_compile
    t0 = time.perf_counter()
    results = {"matmul": [matmul_peak()]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = [
        ("mlp", lambda: mlp_section(args.tokens, 2048, 32, 256, compile_)),
        ("sdpa", lambda: sdpa_kernels(8, 2048, 32, 2, 64)),
        (
            "attention",
            lambda: attention_section(args.tokens // 2048, 2048, 2048, compile_, [(), ()]),
        ),
    ]
    if args.autotune:
        sections.append(("mlp_autotune", lambda: autotune_section(args.tokens, 2048, 32, 256)))
    for name, section in sections:
        results[name] = section()
        print(f"{name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        write(out, tag, device, args, results, time.perf_counter() - t0)  # partial results survive a timeout
    print((out / f"layers_{tag}.md").read_text())
    return 0


def write(out: Path, tag: str, device: str, args, results: dict, wall_s: float) -> None:
    meta = {
        "device": device,
        "date": str(datetime.date.today()),
        "commit": git_commit(),
        "torch": torch.__version__,
        "command": "python benchmarks/bench_layers.py " + " ".join(sys.argv[1:]),
        "wall_s": round(wall_s, 1),
    }
    head = "| variant | mode | ms (fwd+bwd) | TFLOP/s | ratio | rel. error vs eager ref |\n|---|---|---|---|---|---|"
    lines = [
        f"# Layer speed (issue 5 targets) on {device}",
        "",
        f"- date {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, bf16 weights and activations",
        f"- command: `{meta['command']}` ({meta['wall_s']} s in all, compiles included)",
        f"- ceiling: bf16 matmul 8192^3 {results['matmul'][0]['tflops']:.0f} TFLOP/s",
        "- times: median of 30 CUDA-event-timed forward + backward calls after 10 warm-up calls; every "
        "variant measured twice (pass 1, pass 2): their spread is the noise",
        "",
        f"## DS-MoE MLP vs dense MLP of the same width ({args.tokens} tokens, d 2048, 32 x 256 GeLU); target <= 1.05x",
        "",
        "FLOPs counted: the two GEMMs (6 x tokens x 2 x 2048 x 8192); the ratio is against the dense MLP of the "
        "same mode and pass. The DS-MoE layer includes its router, softmax and MI loss; the error column "
        "compares a variant's output with the plain DS-MoE variant of the same mode.",
        "",
        head,
        *(fmt(r, "vs_dense") for r in results.get("mlp", [])),
        "",
        "## MoA vs grouped-query attention of the same 32 query heads over 2 K/V heads (8 x 2048 tokens); "
        "target <= 1.15x",
        "",
        "Whole CausalSelfAttention modules (projections, RoPE, core, MoA router and MI loss); FLOPs: projections "
        "and the causal core. The ratio is against the GQA module of the same mode and pass.",
        "",
        head,
        *(fmt(r, "vs_gqa") for r in results.get("attention", [])),
        "",
        "## Causal SDPA core (B 8, 32 query heads, 2 K/V heads, S 2048, head_dim 64), fwd+bwd",
        "",
        head,
        *(fmt(r, None) for r in results.get("sdpa", [])),
        "",
    ]
    if "mlp_autotune" in results:
        lines += [
            "## The MLP layers under torch.compile mode max-autotune-no-cudagraphs (--autotune)",
            "",
            "Inductor's Triton GEMM templates timed against cuBLAS per shape, elementwise work fused into a "
            "template's epilogue where that times faster. Ratio: against the dense MLP compiled in the default "
            "mode (the first row of each pass).",
            "",
            head,
            *(fmt(r, "vs_dense") for r in results["mlp_autotune"]),
            "",
        ]
    (out / f"layers_{tag}.md").write_text("\n".join(lines))
    (out / f"layers_{tag}.json").write_text(json.dumps({"meta": meta, **results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
