"""Liger Kernel against what our models run, op by op, at our real shapes (issue 25 item 1), forward + backward:

  RMSNorm    decoder DS-MoE-1B Block.attn_norm / mlp_norm: torch.nn.RMSNorm over (8 x 2048 tokens, 2048), eps 1e-5
  QK-norm    attention q_norm (model.attention.qk_norm): torch.nn.RMSNorm over head_dim 64 of q (8, 2048, 32, 64)
  RoPE       attention.apply_rope on q (8, 32, 2048, 64) and k (8, 2, 2048, 64), both (B, H, T, hd) views of
             (B, T, H, hd) storage as CausalSelfAttention makes them; cos/sin (T, hd/2) fp32
  LayerNorm  encoder (MosaicBERT-Base) LayerNorm in bf16 with bf16 weight and bias, eps 1e-12, over (24576, 768)
  GeGLU      encoder FFN: GELU(gate) * value of h = [gate; value], (24576, 2 x 3072) -> 3072 (exact GELU)
  SwiGLU     DS-MoE-1B under moe.activation swiglu (an option; the paper's GeLU is the default): 32 experts,
             h (16384, 32, 2 x 256) with [gate; up] per expert -> (16384, 32, 256)

    python benchmarks/bench_liger.py [--out benchmarks/liger_h200] [--ops rmsnorm,rope] [--no-compile]
    python benchmarks/bench_liger.py --cpu-check        # tiny shapes, numerics only (no timing file written)

Each op runs as: ours eager (the torch ops the model calls), ours under torch.compile (training compiles each
block, so inductor's fusion is the real competitor), our own kernel where we have one (GeGLU: the Triton custom
op torch.ops.dsmoe.geglu, what configs/mosaicbert_base.yaml trains with), and Liger Kernel. Liger's
GeGLU/SwiGLU take gate and value as two tensors: "drop-in" feeds it h.chunk(2) (non-contiguous views, which
Liger copies), "split layout" feeds contiguous gate and value (what a w_in split in two projections would give).

Every variant gets its own copies of the inputs and of the upstream gradient (random normal, never ones: Liger
writes gradients into its inputs and upstream gradients in place), and is checked on its first call against
ours eager run in fp32: the output and every input / weight gradient, max |diff| relative to max |reference|,
tolerance 2e-2; a variant over it cannot win. Times: median of --repeats CUDA-event-timed calls after
--warmup ones (tools/_cli.py cuda_ms). Bytes per call are the least traffic the op needs, stated per op
(weights, per-row statistics and cos/sin tables left out: < 1%); GB/s against the H200's nominal 4.8 TB/s
and a measured device copy. Writes <out>.md and <out>.json with device, date, commit, versions and command.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # tools/_cli.py
from _cli import cuda_ms, device_tag, git_commit  # noqa: E402

from dsmoe.model.attention import apply_rope, rope_cos_sin  # noqa: E402
from dsmoe.model.mlp import activate  # noqa: E402

TOLERANCE = 2e-2
"""Largest max |diff| / max |reference| a variant may show against ours eager in fp32 and still be timed as a
contender (bf16 rounding alone is ~4e-3)."""

PEAK_GBPS = 4800.0
"""H200 HBM3e nominal bandwidth, GB/s."""

TIE = 0.03
"""Within this fraction of each other two times are called a tie (run-to-run noise of such short kernels)."""


@dataclass
class Variant:
    """One implementation of an op: fn maps the inputs named by `args` (all differentiable) to the output(s)."""

    label: str
    fn: Callable
    args: tuple[str, ...]
    to_canonical: Callable[[tuple], tuple] | None = None
    """Maps its input gradients to the op's canonical inputs (`Case.wrt`) where it takes others."""
    compile: bool = False


@dataclass
class Case:
    """One op at one of our shapes: its inputs, the upstream gradient, ours (torch ops) and the contenders."""

    key: str
    name: str
    where: str
    inputs: dict[str, torch.Tensor]
    wrt: tuple[str, ...]
    upstream: tuple[torch.Tensor, ...]
    ours: Callable
    """The torch ops our model runs on the `wrt` inputs; also the fp32 reference."""
    bytes_moved: float
    bytes_note: str
    our_kernel: Variant | None = None
    liger: list[Variant] = field(default_factory=list)


def import_liger() -> tuple[SimpleNamespace | None, str]:
    """Liger Kernel's ops we time, or (None, why) where it does not import."""
    logging.getLogger("liger_kernel").setLevel(logging.ERROR)  # its optional DSL back ends log at import
    try:
        from liger_kernel.ops import LigerGELUMulFunction, LigerSiLUMulFunction
        from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception as e:  # ImportError, or a Triton / CUDA mismatch raised at import
        return None, (
            f"Liger Kernel does not import here ({type(e).__name__}: {e}). Install it with "
            "`pip install liger-kernel==0.8.5 --no-deps` (on the lent GPU: `source tools/device_wheels.sh install`)."
        )
    return SimpleNamespace(
        geglu=LigerGELUMulFunction.apply,
        swiglu=LigerSiLUMulFunction.apply,
        layer_norm=liger_layer_norm,
        rms_norm=liger_rms_norm,
        rope=liger_rotary_pos_emb,
    ), ""


def our_geglu_kernel() -> Callable | None:
    """torch.ops.dsmoe.geglu (registered by importing alibi_triton where Triton imports), else None."""
    try:
        import dsmoe.model.alibi_triton  # noqa: F401
    except Exception:
        return None
    return getattr(torch.ops.dsmoe, "geglu", None)


def randn(*shape, device, dtype) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype)


def bthd_view(B: int, H: int, T: int, hd: int, device, dtype) -> torch.Tensor:
    """A (B, H, T, hd) view of (B, T, H, hd) storage: q and k as CausalSelfAttention hands them to apply_rope."""
    return randn(B, T, H, hd, device=device, dtype=dtype).transpose(1, 2)


def build_cases(small: bool, device: str, liger: SimpleNamespace | None) -> list[Case]:
    """Our ops at the DS-MoE-1B / MosaicBERT-Base shapes (tiny ones with `small`)."""
    dt = torch.bfloat16
    # configs/dsmoe_1b.yaml: micro-batch 8 x 2048, d 2048, 32 query / 2 K/V heads of 64, 32 experts x 256;
    # configs/mosaicbert_base.yaml: d 768, GeGLU 3072, the 24,576 real tokens of bench_encoder's batches
    B, T, D, H, KV, hd = (2, 16, 64, 4, 2, 16) if small else (8, 2048, 2048, 32, 2, 64)
    tokens, d_enc, inner = (48, 32, 64) if small else (24576, 768, 3072)
    experts, expert_hidden = (4, 16) if small else (32, 256)
    kw = dict(device=device, dtype=dt)
    cases = []

    def rms_norm_case(key, name, where, x, eps):
        width = x.shape[-1]
        n = x.numel() * x.element_size()
        case = Case(
            key,
            name,
            where,
            inputs={"x": x, "weight": 1 + 0.1 * randn(width, **kw)},
            wrt=("x", "weight"),
            upstream=(randn(*x.shape, **kw),),
            ours=lambda x, w: F.rms_norm(x, (width,), w, eps),  # torch.nn.RMSNorm.forward
            bytes_moved=5 * n,
            bytes_note="x read, y written (fwd); x, dy read, dx written (bwd)",
        )
        if liger:  # casting_mode gemma, offset 0: all in fp32 as torch.nn.RMSNorm computes it
            case.liger.append(
                Variant(
                    "Liger liger_rms_norm (gemma casting, in_place)",
                    lambda x, w: liger.rms_norm(x, w, eps, 0.0, "gemma", True),
                    ("x", "weight"),
                )
            )
        return case

    cases.append(
        rms_norm_case(
            "rmsnorm",
            f"RMSNorm ({B * T}, {D})",
            "decoder Block.attn_norm / mlp_norm (torch.nn.RMSNorm)",
            randn(B * T, D, **kw),
            1e-5,
        )
    )
    cases.append(
        rms_norm_case(
            "qknorm",
            f"QK-norm RMSNorm over hd {hd} of q ({B}, {T}, {H}, {hd})",
            "attention q_norm (model.attention.qk_norm)",
            randn(B, T, H, hd, **kw),
            1e-5,
        )
    )

    cos, sin = rope_cos_sin(T, hd, 10000.0, device)  # (T, hd/2) fp32, as DecoderLM passes them
    q, k = bthd_view(B, H, T, hd, **kw), bthd_view(B, KV, T, hd, **kw)
    rope = Case(
        "rope",
        f"RoPE q ({B}, {H}, {T}, {hd}) + k ({B}, {KV}, {T}, {hd})",
        "attention apply_rope on q and k",
        inputs={"q": q, "k": k},
        wrt=("q", "k"),
        upstream=(bthd_view(B, H, T, hd, **kw), bthd_view(B, KV, T, hd, **kw)),
        ours=lambda q, k: (apply_rope(q, cos, sin), apply_rope(k, cos, sin)),
        bytes_moved=4 * (q.numel() + k.numel()) * q.element_size(),
        bytes_note="q, k read and written (fwd); dq, dk read and written (bwd)",
    )
    if liger:  # cos/sin of width hd/2 (not duplicated): rotary_dim names the full head, as for GPT-OSS
        rope.liger.append(
            Variant(
                "Liger liger_rotary_pos_emb (in place)",
                lambda q, k: liger.rope(q, k, cos, sin, rotary_dim=hd),
                ("q", "k"),
            )
        )
    cases.append(rope)

    x = randn(tokens, d_enc, **kw)
    layer_norm = Case(
        "layernorm",
        f"LayerNorm ({tokens}, {d_enc})",
        "encoder LayerNorm (bf16 weights, eps 1e-12)",
        inputs={"x": x, "weight": 1 + 0.1 * randn(d_enc, **kw), "bias": 0.1 * randn(d_enc, **kw)},
        wrt=("x", "weight", "bias"),
        upstream=(randn(tokens, d_enc, **kw),),
        ours=lambda x, w, b: F.layer_norm(x, (d_enc,), w, b, 1e-12),  # dsmoe.model.encoder.LayerNorm
        bytes_moved=5 * x.numel() * x.element_size(),
        bytes_note="x read, y written (fwd); x, dy read, dx written (bwd)",
    )
    if liger:
        layer_norm.liger.append(
            Variant(
                "Liger liger_layer_norm",
                lambda x, w, b: liger.layer_norm(x, w, b, 1e-12),
                ("x", "weight", "bias"),
            )
        )
    cases.append(layer_norm)

    def gated_case(key, name, where, h, activation, liger_fn, kernel):
        half = h.shape[-1] // 2
        case = Case(
            key,
            name,
            where,
            inputs={"h": h, "gate": h[..., :half].contiguous(), "value": h[..., half:].contiguous()},
            wrt=("h",),
            upstream=(randn(*h.shape[:-1], half, **kw),),
            ours=lambda h: activate(h, activation),  # dsmoe.model.mlp.activate
            bytes_moved=8 * h[..., :half].numel() * h.element_size(),
            bytes_note="h = [gate; value] read, y written (fwd); dy, h read, dh written (bwd): 8 x T x I",
        )
        if kernel is not None:
            case.our_kernel = Variant("ours: Triton custom op torch.ops.dsmoe.geglu", kernel, ("h",))
        if liger_fn is not None:
            case.liger.append(
                Variant(
                    "Liger drop-in on h.chunk(2) (copies gate, value)",
                    lambda h: liger_fn(*h.chunk(2, dim=-1)),
                    ("h",),
                )
            )
            case.liger.append(
                Variant(
                    "Liger split layout (contiguous gate, value given)",
                    liger_fn,
                    ("gate", "value"),
                    to_canonical=lambda grads: (torch.cat(grads, dim=-1),),
                )
            )
        return case

    cases.append(
        gated_case(
            "geglu",
            f"GeGLU ({tokens}, 2 x {inner}) -> {inner}",
            "encoder FFN (TritonGeGLUMLP)",
            randn(tokens, 2 * inner, **kw),
            "geglu",
            liger.geglu if liger else None,
            our_geglu_kernel(),
        )
    )
    cases.append(
        gated_case(
            "swiglu",
            f"SwiGLU ({B * T}, {experts}, 2 x {expert_hidden}) -> {expert_hidden}",
            "DS-MoE experts under moe.activation swiglu (DSMoE._dense_forward)",
            randn(B * T, experts, 2 * expert_hidden, **kw),
            "swiglu",
            liger.swiglu if liger else None,
            None,
        )
    )
    return cases


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def fresh(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """A leaf copy with t's strides (clone keeps them for dense tensors), requiring grad."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


def reference(case: Case) -> list[torch.Tensor]:
    """Ours eager in fp32 on fp32 copies: the outputs, then the gradients of the `wrt` inputs."""
    args = [fresh(case.inputs[name], torch.float32) for name in case.wrt]
    outs = as_tuple(case.ours(*args))
    grads = torch.autograd.grad(outs, args, [g.float() for g in case.upstream])
    return [t.detach() for t in (*outs, *grads)]


def compare(got: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, float]:
    """(max |diff|, max |diff| / max |reference|) of the worst of the paired tensors."""
    worst = (0.0, 0.0)
    for a, r in zip(got, ref, strict=True):
        diff = float((a.detach().float() - r).abs().max())
        rel = diff / max(float(r.abs().max()), 1e-30)
        worst = max(worst, (diff, rel), key=lambda pair: pair[1])
    return worst


def run_variant(case: Case, variant: Variant, ref: list[torch.Tensor], repeats: int, warmup: int) -> dict:
    """Check one variant's first call against the reference, then time forward + backward."""
    row = {"label": variant.label, "compiled": variant.compile}
    args = [fresh(case.inputs[name]) for name in variant.args]
    upstream = [g.clone() for g in case.upstream]  # Liger overwrites its upstream gradient in place
    if variant.compile:  # a fresh compile: RMSNorm and QK-norm share code, which would recompile as dynamic
        torch._dynamo.reset()
    fn = torch.compile(variant.fn) if variant.compile else variant.fn

    def step():
        outs = as_tuple(fn(*args))
        return outs, torch.autograd.grad(outs, args, upstream)

    started = time.perf_counter()
    try:
        outs, grads = step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception as e:  # Triton on a CPU, a compile this build cannot do: say so, keep going
        row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        return row
    row["first_call_s"] = round(time.perf_counter() - started, 2)
    # compare now: later calls overwrite Liger's outputs and gradients (they alias its inputs)
    grads = variant.to_canonical(grads) if variant.to_canonical else grads
    row["max_abs_diff"], row["rel_err"] = compare([*outs, *grads], ref)
    row["ok"] = row["rel_err"] <= TOLERANCE
    del outs, grads
    row["ms"] = cuda_ms(step, repeats=repeats, warmup=warmup)
    row["gbps"] = case.bytes_moved / row["ms"] / 1e6
    return row


def run_case(case: Case, compile_: bool, repeats: int, warmup: int) -> dict:
    """Every variant of one op; the result names the fastest correct one of ours and judges Liger against it."""
    ref = reference(case)
    ours = [Variant("ours eager (torch ops)", case.ours, case.wrt)]
    if compile_:
        ours.append(Variant("ours torch.compile (inductor)", case.ours, case.wrt, compile=True))
    if case.our_kernel is not None:
        ours.append(case.our_kernel)
    rows = {"ours": [run_variant(case, v, ref, repeats, warmup) for v in ours]}
    rows["liger"] = [run_variant(case, v, ref, repeats, warmup) for v in case.liger]
    del ref
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    good = [r for r in rows["ours"] if r.get("ok")]
    best = min(good, key=lambda r: r["ms"]) if good else None
    for row in rows["liger"]:
        row["verdict"] = verdict(row, best)
        if best is not None and "ms" in row:
            row["vs_best_ours"] = row["ms"] / best["ms"]
    return {
        "key": case.key,
        "name": case.name,
        "where": case.where,
        "bytes": case.bytes_moved,
        "bytes_note": case.bytes_note,
        "best_ours": best["label"] if best else None,
        **rows,
    }


def verdict(row: dict, best: dict | None) -> str:
    if "ms" not in row:
        return "Liger did not run"
    if not row["ok"]:
        return f"Liger wrong (rel. error {row['rel_err']:.1e})"
    if best is None:
        return "no correct variant of ours"
    ratio = row["ms"] / best["ms"]
    if abs(ratio - 1) <= TIE:
        return f"tie (within {TIE:.0%})"
    if ratio < 1:
        return f"Liger wins by {1 / ratio - 1:.0%}"
    return f"ours wins by {ratio - 1:.0%}"


def copy_gbps() -> float:
    """Achieved bandwidth of a 1 GiB device-to-device copy (read + write): a practical ceiling."""
    src = torch.empty(2**29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), repeats=20, warmup=3)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def liger_impls() -> dict[str, str]:
    """The implementation Liger's dispatcher picks per op here (nvidia-triton unless a DSL back end is present)."""
    try:
        from liger_kernel.backends import available_impls
    except Exception:
        return {}
    return {
        op: (available_impls(op) or ["none"])[0]
        for op in ("rms_norm", "layer_norm", "rope", "geglu", "swiglu")
    }


def ms(row: dict | None) -> str:
    if row is None:
        return "-"
    if "ms" not in row:
        return "error"
    return f"{row['ms']:.3f}" + ("" if row["ok"] else " (wrong)")


def write(stem: Path, meta: dict, results: list[dict]) -> None:
    copy = f", measured 1 GiB copy {meta['copy_gbps']:.0f} GB/s" if meta.get("copy_gbps") else ""
    lines = [
        f"# Liger Kernel against ours, forward + backward, on {meta['device']}",
        "",
        f"- date {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, triton {meta['triton']}, "
        f"liger-kernel {meta['liger_kernel']} (impls: {meta['liger_impls'] or 'n/a'})",
        f"- command: `{meta['command']}` ({meta['wall_s']} s in all, compiles included)",
        f"- bf16 inputs, weights and upstream gradients (random normal); median of {meta['repeats']} "
        f"CUDA-event-timed forward + backward calls after {meta['warmup']} warm-up calls",
        f"- numerics: first call of every variant against ours eager in fp32 (outputs and all input / weight "
        f"gradients); rel = max |diff| / max |reference|, tolerance {TOLERANCE:g}; a variant over it cannot win",
        f"- GB/s: the least bytes each op must move (column 'bytes'), over its time; nominal peak "
        f"{PEAK_GBPS:.0f} GB/s{copy}",
        f"- verdict: Liger against the fastest correct variant of ours; 'wins by x%' = slower time / faster "
        f"time - 1; within {TIE:.0%} a tie",
        "- Liger's GeGLU is GELU's tanh approximation (ours: exact erf); its norms, RoPE and gated units write "
        "gradients into their inputs / upstream gradients in place",
        "",
        "| op | ours eager ms | ours compiled ms | our kernel ms | Liger | Liger ms | Liger / best ours | "
        "verdict | GB/s best ours / Liger (% of peak) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        by_label = {r["label"]: r for r in res["ours"]}
        eager = by_label.get("ours eager (torch ops)")
        compiled = by_label.get("ours torch.compile (inductor)")
        kernel = next((r for r in res["ours"] if r["label"].startswith("ours:")), None)
        best = by_label.get(res["best_ours"]) if res["best_ours"] else None
        for lig in res["liger"] or [{"label": "(Liger not run)", "verdict": "-"}]:
            ratio = f"{lig['vs_best_ours']:.2f}x" if "vs_best_ours" in lig else "-"
            bw = " / ".join(
                f"{r['gbps']:.0f} ({r['gbps'] / PEAK_GBPS:.0%})" if r and "gbps" in r else "-"
                for r in (best, lig)
            )
            lines.append(
                f"| {res['name']} | {ms(eager)} | {ms(compiled)} | {ms(kernel)} | {lig['label']} | "
                f"{ms(lig) if 'ok' in lig or 'error' in lig else '-'} | {ratio} | {lig['verdict']} | {bw} |"
            )
    lines += [
        "",
        "## Every variant",
        "",
        "| op | variant | ms | first call s | GB/s | max abs diff | rel | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["ours"] + res["liger"]:
            if "error" in r:
                lines.append(f"| {res['name']} | {r['label']} | - | - | - | - | - | {r['error']} |")
                continue
            lines.append(
                f"| {res['name']} | {r['label']} | {r['ms']:.3f} | {r['first_call_s']} | {r['gbps']:.0f} | "
                f"{r['max_abs_diff']:.2e} | {r['rel_err']:.1e}{'' if r['ok'] else ' (over tolerance)'} | |"
            )
    lines += ["", "## Where each op runs and the bytes counted", ""]
    lines += [
        f"- {res['name']}: {res['where']}; {res['bytes'] / 1e6:.0f} MB = {res['bytes_note']}"
        for res in results
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "ops": results}, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=None, help="path stem of the .md/.json (default benchmarks/liger_<gpu>)"
    )
    parser.add_argument(
        "--ops", default="", help="comma-separated subset: rmsnorm,qknorm,rope,layernorm,geglu,swiglu"
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants of ours")
    parser.add_argument(
        "--cpu-check",
        action="store_true",
        help="tiny shapes on the CPU, numerics only (Liger and our Triton kernel where they run)",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    liger, why = import_liger()
    if liger is None:
        print(why, file=sys.stderr)
        if not args.cpu_check:
            return 2
    if args.cpu_check:
        device, compile_, repeats, warmup = "cpu", False, 1, 0
    elif not torch.cuda.is_available():
        print("bench_liger needs a CUDA device (or --cpu-check)", file=sys.stderr)
        return 2
    else:
        device, compile_, repeats, warmup = "cuda", not args.no_compile, args.repeats, args.warmup
    torch.manual_seed(0)
    cases = build_cases(args.cpu_check, device, liger)
    wanted = {key for key in args.ops.split(",") if key}
    unknown = wanted - {c.key for c in cases}
    if unknown:
        print(f"--ops: unknown {sorted(unknown)}; choose from {[c.key for c in cases]}", file=sys.stderr)
        return 2
    cases = [c for c in cases if not wanted or c.key in wanted]
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    tag = device_tag(device_name) if device == "cuda" else "cpu"
    stem = Path(args.out) if args.out else (None if args.cpu_check else REPO / "benchmarks" / f"liger_{tag}")
    if stem is not None:
        stem = stem.with_suffix("") if stem.suffix in (".md", ".json") else stem
        stem.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device_name,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "liger_kernel": version("liger-kernel") if liger else f"absent ({why})",
        "liger_impls": liger_impls() if liger else {},
        "python": platform.python_version(),
        "command": "python benchmarks/bench_liger.py " + " ".join(sys.argv[1:]),
        "repeats": repeats,
        "warmup": warmup,
        "tolerance": TOLERANCE,
        "copy_gbps": copy_gbps() if device == "cuda" else None,
    }
    results = []
    for case in cases:
        results.append(run_case(case, compile_, repeats, warmup))
        print(f"{case.key} done ({time.perf_counter() - started:.0f} s)", flush=True)
        meta["wall_s"] = round(time.perf_counter() - started, 1)
        if stem is not None:
            write(stem, meta, results)  # partial results survive a timeout
    failed = report(results, args.cpu_check)
    if stem is not None:
        print(stem.with_suffix(".md").read_text())
    return 1 if failed else 0


def report(results: list[dict], cpu_check: bool) -> bool:
    """Print one line per variant; True where our torch ops failed or disagreed (on the CPU check also where
    any variant that ran disagreed: a Liger call with the wrong conventions)."""
    failed = False
    for res in results:
        for r in res["ours"] + res["liger"]:
            if "error" in r:
                state = f"did not run: {r['error']}"
            else:
                state = (
                    f"{r['ms']:.3f} ms, rel err {r['rel_err']:.1e} {'ok' if r['ok'] else 'OVER TOLERANCE'}"
                )
            print(f"  {res['key']:9s} {r['label']:55s} {state} {r.get('verdict', '')}")
            torch_side = r["label"] in ("ours eager (torch ops)", "ours torch.compile (inductor)")
            if (torch_side and not r.get("ok")) or (cpu_check and r.get("ok") is False):
                failed = True
    return failed


if __name__ == "__main__":
    sys.exit(main())
