"""MLM training-step throughput of our encoder against transformers' BertForMaskedLM, on the same batches.

    python benchmarks/bench_encoder.py                        # CUDA: Base shapes, seq 128 (half the rows padded to
                                                         # 64) and seq 512; writes benchmarks/encoder/
    python benchmarks/bench_encoder.py --device cpu --tiny --out /tmp/bench_encoder   # end-to-end check on a CPU
    python benchmarks/bench_encoder.py model.moe.activation=gelu   # any override of our config: here a plain GELU
                                                         # FFN, BERT's parameter count

Both models are built here, without downloads: ours from configs/mosaicbert_base.yaml (ALiBi, GeGLU,
post-LN, unpadded, MLM head at masked positions only; attention and GeGLU as that config says: our Triton
kernels on CUDA; on CPU SDPA and the torch GeGLU), its blocks and MLM head compiled on CUDA;
BertForMaskedLM from transformers' BertConfig() (BERT-Base: learned positions, GELU FFN, SDPA attention on
the padded batch, head at every position). Both in bf16 (parameters and compute; `--precision amp` keeps
fp32 parameters under bf16 autocast instead), both stepped by torch AdamW (fused on CUDA), on the same list
of batches: random token ids, 30% of each row's real tokens masked (80/10/10), rows of mixed lengths
(`--pad-rows` of the rows keep `--pad-len` of the sequence's tokens, the rest are full).
Throughput counts real (non-padding) tokens: sum(attention_mask) / step time. `--profile` adds a
torch.profiler breakdown of our step by kernel kind (first shape).

Then the attention kernels alone, forward + backward, on the Base heads (12 x 64), host-timed per call:
SDPA without any bias on the dense (B, H, S, hd) shapes against compiled FlexAttention with the ALiBi
score_mod (default and FLEX_TUNED kernel options) and our Triton kernels on the same shapes (every row
full); then FlexAttention with the document mask and our Triton kernels on the packed real tokens of the
benchmark batch. (On CPU, torch has no FlexAttention backward: forward only there.)

Writes encoder_<device>.json and .md with device, date, commit and command to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # tools/_cli.py
from _cli import device_tag, git_commit  # noqa: E402

from dsmoe import config as config_lib  # noqa: E402
from dsmoe.data.mlm import IGNORE_INDEX, encoder_vocab_size  # noqa: E402
from dsmoe.model import build  # noqa: E402
from dsmoe.model.attention import VARLEN_BACKENDS, Varlen, alibi_slopes, plan_attention  # noqa: E402

BERT_VOCAB = 30522
BERT_MASK_ID = 103  # [MASK] in BERT's vocabulary (the ids are synthetic; any valid id times the same)
TINY = [  # --tiny: shapes for a CPU check of the whole script
    "model.d_model=64",
    "model.n_layers=2",
    "model.attention.heads=4",
    "model.moe.num_experts=2",
    "model.moe.expert_hidden=64",
]


@dataclass
class Setting:
    batch: int
    seq_len: int
    pad_rows: float
    pad_len: int

    def label(self) -> str:
        padded = f", {self.pad_rows:.0%} of rows padded to {self.pad_len}" if self.pad_rows else ", full rows"
        return f"{self.batch} x {self.seq_len}{padded}"


def make_batches(s: Setting, vocab: int, count: int, seed: int, device) -> list[tuple[torch.Tensor, ...]]:
    """(input_ids, attention_mask, labels) batches: random ids, mixed lengths, 30% of real tokens masked."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(1000, vocab, (s.batch, s.seq_len), generator=gen)
        lengths = torch.full((s.batch,), s.seq_len)
        short = torch.randperm(s.batch, generator=gen)[: round(s.pad_rows * s.batch)]
        lengths[short] = s.pad_len
        mask = torch.arange(s.seq_len)[None, :] < lengths[:, None]
        predicted = (torch.rand(s.batch, s.seq_len, generator=gen) < 0.30) & mask
        labels = torch.where(predicted, ids, IGNORE_INDEX)
        replace = torch.rand(s.batch, s.seq_len, generator=gen)
        inputs = torch.where(predicted & (replace < 0.8), BERT_MASK_ID, ids)
        inputs = torch.where(
            predicted & (replace >= 0.8) & (replace < 0.9), torch.randint_like(ids, 1000, vocab), inputs
        )
        inputs = inputs.masked_fill(~mask, 0)  # BERT's [PAD]
        batches.append(tuple(t.to(device) for t in (inputs, mask, labels)))
    return batches


def host_masks(batches: list[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
    """The batches as the Trainer hands them to our encoder: ids on the device, attention mask and labels
    pinned on the host (EncoderMLM.forward packs there, so the step never waits for the GPU)."""
    if batches[0][0].device.type != "cuda":
        return batches
    return [(ids, mask.cpu().pin_memory(), labels.cpu().pin_memory()) for ids, mask, labels in batches]


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training(step_fn, batches, warmup: int, steps: int, device) -> list[float]:
    """Seconds per step for `steps` steps after `warmup` (compilation included there), cycling the batches."""
    for i in range(warmup):
        step_fn(batches[i % len(batches)])
    synchronize(device)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step_fn(batches[i % len(batches)])
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def our_encoder(args, device, dtype):
    backend = [f"model.attention.backend={args.backend}"] if args.backend else []
    cpu = ["model.attention.backend=sdpa", "model.geglu_kernel=torch"] if device.type == "cpu" else []
    overrides = [*(TINY if args.tiny else []), *cpu, *backend, *args.overrides]
    cfg = config_lib.load(args.config, overrides)
    cfg.model.vocab_size = encoder_vocab_size(BERT_VOCAB)  # 30522 + mask, pad -> 30528
    torch.manual_seed(0)
    model = build(cfg.model).to(device, dtype).train()
    if args.compile:  # regional, as train.compile does, plus the MLM head and its loss
        for block in model.blocks:
            block.compile(dynamic=True)
        model.compile_head()
    return model, cfg


def bert(args, device, dtype, cfg):
    from transformers import BertConfig, BertForMaskedLM

    m = cfg.model
    bert_cfg = BertConfig(
        vocab_size=BERT_VOCAB,
        hidden_size=m.d_model,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.attention.num_heads,
        intermediate_size=m.ffn_hidden,
        max_position_embeddings=max(512, *args.seq_lens),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(bert_cfg).to(device, dtype).train()
    return model, bert_cfg


def optimizer(model, device):
    return torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda"
    )


def step_function(model, opt, kind: str, amp: bool, device):
    def step(batch):
        ids, mask, labels = batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if kind == "ours":
                loss = model(ids, mask, labels).loss
            else:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


FLEX_TUNED = {
    "fwd_BLOCK_M": 64,
    "fwd_BLOCK_N": 64,
    "bwd_BLOCK_M1": 64,
    "bwd_BLOCK_N1": 64,
    "bwd_BLOCK_M2": 64,
    "bwd_BLOCK_N2": 64,
    "bwd_num_warps": 4,
}
"""FlexAttention kernel options for head_dim 64 at these lengths: 64 x 64 tiles both ways (the H100/H200
defaults are 128 x 64 forward and 64 x 128 x 8 warps backward; benchmarks/encoder/explore_h200_run1.md)."""


def attention_timing(s: Setting, batches, heads: int, head_dim: int, device, dtype, warmup, steps) -> dict:
    """Milliseconds of forward + backward (forward only on CPU) of the attention kernels alone."""
    from torch.nn.attention.flex_attention import flex_attention

    cuda = device.type == "cuda"
    # static shapes: the dense shapes are fixed here (the packed path below is the model's, dynamic)
    flex = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
    slopes = alibi_slopes(heads).to(device)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    def timed(fn, *inputs) -> float:
        def run():
            with torch.set_grad_enabled(cuda):
                out = fn(*inputs)
                if cuda:
                    out.backward(torch.ones_like(out))

        return 1000 * statistics.median(time_training(lambda _: run(), [None], warmup, steps, device))

    def tensors(*shape, n=3):
        return [torch.randn(*shape, device=device, dtype=dtype, requires_grad=cuda) for _ in range(n)]

    dense = tensors(s.batch, heads, s.seq_len, head_dim)  # (B, H, S, hd)
    result = {
        "sdpa_no_bias_ms": timed(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *dense),
        "flex_alibi_ms": timed(lambda q, k, v: flex(q, k, v, score_mod=alibi), *dense),
    }
    varlen = Varlen.from_mask(batches[0][1])  # the benchmark batch's real tokens
    T = len(varlen.indices)
    result["real_tokens"] = T
    if cuda:
        result["flex_alibi_tuned_ms"] = timed(
            lambda q, k, v: flex(q, k, v, score_mod=alibi, kernel_options=FLEX_TUNED), *dense
        )
        # our Triton kernels on the same dense shapes (every row full), then on the packed real tokens
        full = Varlen.from_mask(torch.ones(s.batch, s.seq_len, dtype=torch.bool, device=device))
        plan = plan_attention("triton", full, heads, dtype)
        (qkv,) = tensors(s.batch * s.seq_len, 3, heads, head_dim, n=1)
        result["triton_alibi_ms"] = timed(lambda x: VARLEN_BACKENDS["triton"](*x.unbind(1), plan), qkv)
        (packed,) = tensors(T, 3, heads, head_dim, n=1)
        for name in ("flex", "triton"):
            plan = plan_attention(name, varlen, heads, dtype)
            result[f"{name}_alibi_packed_ms"] = timed(
                lambda x, p=plan, n=name: VARLEN_BACKENDS[n](*x.unbind(1), p), packed
            )
    result["flex_over_sdpa"] = (
        min(result["flex_alibi_ms"], result.get("flex_alibi_tuned_ms", 1e9)) / result["sdpa_no_bias_ms"]
    )
    if "triton_alibi_ms" in result:
        result["triton_over_sdpa"] = result["triton_alibi_ms"] / result["sdpa_no_bias_ms"]
    return result


def kernel_kind(name: str) -> str:
    """A CUDA kernel's share of the step, by what it does (from its name)."""
    n = name.lower()
    if "geglu" in n:  # before attention: '_geglu_fwd_kernel' ends like the attention's '_fwd_kernel'
        return "GeGLU kernels"
    attention = ("triton_tem", "flex_attention", "_fwd_kernel", "_bwd_d", "_delta_kernel", "fmha", "flash")
    if n.startswith(attention) or any(k in n for k in attention[1:]) or "cudnn" in n or "attention" in n:
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "kernel2")):
        return "GEMMs"
    if "adam" in n or "multi_tensor" in n or n.startswith("optimizer."):
        return "optimizer"
    if "softmax" in n or "nll" in n or "cross_entropy" in n:
        return "softmax / cross-entropy (eager)"
    if n.startswith("triton_"):
        return "inductor-fused (LN, dropout, residual, GeGLU, head)"
    if any(k in n for k in ("embedding", "index", "gather", "scatter", "nonzero", "cumsum", "sort", "radix")):
        return "embedding / index / pack"
    if any(k in n for k in ("elementwise", "reduce", "copy", "fill")):
        return "eager elementwise / copies"
    return "other"


def profile(step_fn, batches, steps: int = 3) -> dict:
    """GPU time per step by kernel kind against the step's wall time (CUDA)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for b in batches[:steps]:
        step_fn(b)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for i in range(steps):
            step_fn(batches[i % len(batches)])
        torch.cuda.synchronize()
        wall = 1000 * (time.perf_counter() - start) / steps
    kernels: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Optimizer.", "ProfilerStep")):
            kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time_total / 1000 / steps
    kinds: dict[str, float] = {}
    for name, ms in kernels.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:20]
    return {"wall_ms": wall, "gpu_busy_ms": sum(kernels.values()), "kinds": kinds, "top_kernels": top}


def profile_text(p: dict) -> list[str]:
    lines = [
        f"Profile of our step (torch.profiler, {p['label']}): wall {p['wall_ms']:.1f} ms/step under the "
        f"profiler, GPU busy {p['gpu_busy_ms']:.1f} ms.",
        "",
        "| kernel kind | ms / step | share of GPU time |",
        "|---|---|---|",
    ]
    for kind, ms in sorted(p["kinds"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {ms:.2f} | {100 * ms / p['gpu_busy_ms']:.1f}% |")
    lines += ["", "Largest kernels (ms / step):", ""]
    lines += [f"- {ms:.2f} `{name[:100]}`" for name, ms in p["top_kernels"][:12]]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny shapes and batches (a CPU check of the script)"
    )
    parser.add_argument("--config", default="configs/mosaicbert_base.yaml")
    parser.add_argument(
        "--backend",
        default=None,
        help="our attention backend (default: the config's; on CPU sdpa, with the torch GeGLU)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print a profile of our step by kernel kind (CUDA, first shape)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile our blocks (default: on CUDA)",
    )
    parser.add_argument("--precision", choices=["bf16", "amp"], default="bf16")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 64], help="rows per batch, per seq len")
    parser.add_argument(
        "--pad-rows", type=float, nargs="+", default=[0.5, 0.5], help="share of rows padded, per seq len"
    )
    parser.add_argument(
        "--pad-len", type=int, nargs="+", default=[64, 256], help="their real tokens, per seq len"
    )
    parser.add_argument(
        "--masks-on",
        choices=["host", "device"],
        default="host",
        help="where our encoder gets the attention mask and labels: host (as the Trainer passes them, no host "
        "sync in the step) or device (as before 2026-12-02: the packing syncs)",
    )
    parser.add_argument("--batches", type=int, default=8, help="distinct batches, cycled")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "encoder"))
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides of our config (e.g. model.moe.activation=gelu)"
    )
    args = parser.parse_args()
    if args.tiny:
        args.seq_lens, args.batch, args.pad_len = [32, 64], [8, 4], [16, 32]
        args.warmup, args.steps, args.batches = min(args.warmup, 2), min(args.steps, 3), min(args.batches, 2)
    device = torch.device(args.device)
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    amp = args.precision == "amp"
    dtype = torch.float32 if amp else torch.bfloat16

    ours, cfg = our_encoder(args, device, dtype)
    theirs, _ = bert(args, device, dtype, cfg)
    backend = ours.attention_backend(device)
    print(
        f"ours: {ours.num_params() / 1e6:.1f}M params, attention {backend}, compile {args.compile}; "
        f"BertForMaskedLM: {theirs.num_parameters() / 1e6:.1f}M params, attention "
        f"{theirs.config._attn_implementation}; {args.precision} on {device}",
        flush=True,
    )
    steps = {
        "ours": step_function(ours, optimizer(ours, device), "ours", amp, device),
        "bert": step_function(theirs, optimizer(theirs, device), "bert", amp, device),
    }
    settings = [Setting(*v) for v in zip(args.batch, args.seq_lens, args.pad_rows, args.pad_len, strict=True)]
    rows = []
    for s in settings:
        batches = make_batches(s, BERT_VOCAB, args.batches, seed=s.seq_len, device=device)
        real_tokens = statistics.mean(int(b[1].sum()) for b in batches)
        row = {"setting": s.label(), **s.__dict__, "real_tokens_per_batch": real_tokens}
        batches_of = {"ours": batches if args.masks_on == "device" else host_masks(batches), "bert": batches}
        for name, fn in steps.items():  # the same batches, one model after the other
            times = time_training(fn, batches_of[name], args.warmup, args.steps, device)
            row[f"{name}_ms"] = 1000 * statistics.median(times)
            row[f"{name}_real_tokens_per_s"] = real_tokens / statistics.median(times)
            print(
                f"{s.label()}: {name} {row[f'{name}_ms']:.1f} ms/step, "
                f"{row[f'{name}_real_tokens_per_s']:,.0f} real tokens/s",
                flush=True,
            )
        row["speedup"] = row["ours_real_tokens_per_s"] / row["bert_real_tokens_per_s"]
        if args.profile and device.type == "cuda" and not rows:
            profiled = {"label": s.label(), **profile(steps["ours"], batches_of["ours"])}
            print("\n".join(profile_text(profiled)), flush=True)
        attn_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        row["attention"] = attention_timing(
            s,
            batches,
            cfg.model.attention.num_heads,
            cfg.model.head_dim,
            device,
            attn_dtype,
            args.warmup,
            args.steps,
        )
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    tag = device_tag(device_name) + ("_tiny" if args.tiny else "")
    command = "python benchmarks/bench_encoder.py " + " ".join(sys.argv[1:])
    result = {
        "device": device_name,
        "date": str(datetime.date.today()),
        "commit": git_commit(),
        "command": command,
        "torch": torch.__version__,
        "precision": args.precision,
        "our_backend": backend,
        "compile": args.compile,
        "masks_on": args.masks_on,
        "our_params": ours.num_params(),
        "bert_params": theirs.num_parameters(),
        "rows": rows,
    }
    if args.profile and device.type == "cuda":
        result["profile"] = profiled
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"encoder_{tag}.json").write_text(json.dumps(result, indent=2))
    (out / f"encoder_{tag}.md").write_text(report(result, cfg))
    print(report(result, cfg))
    return 0


def report(r: dict, cfg) -> str:
    attention_note = (
        "forward + backward" if r["device"] != "CPU" else "forward only (no FlexAttention backward on CPU)"
    )
    lines = [
        f"# Encoder MLM training throughput: ours vs BertForMaskedLM on {r['device']}",
        "",
        f"- date {r['date']}, commit {r['commit']}, torch {r['torch']}, {r['precision']}",
        f"- command: `{r['command']}`",
        f"- ours: {r['our_params'] / 1e6:.1f}M parameters ({cfg.model.n_layers} layers, d {cfg.model.d_model}, "
        f"{cfg.model.moe.activation} FFN {cfg.model.ffn_hidden}, ALiBi, unpadded, MLM head at masked positions), "
        f"GeGLU kernel {cfg.model.geglu_kernel}, attention "
        f"{r['our_backend']}, torch.compile {r['compile']} (blocks and MLM head), attention mask and labels on the "
        f"{r.get('masks_on', 'device')}; BertForMaskedLM: {r['bert_params'] / 1e6:.1f}M "
        "parameters, SDPA on the padded batch, head at every position. Both AdamW, same batches, 30% masked.",
        "",
        "| batch | real tokens / batch | ours ms/step | BERT ms/step | ours real tok/s | BERT real tok/s | ours / BERT |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['setting']} | {row['real_tokens_per_batch']:,.0f} | {row['ours_ms']:.1f} | {row['bert_ms']:.1f} "
            f"| {row['ours_real_tokens_per_s']:,.0f} | {row['bert_real_tokens_per_s']:,.0f} | {row['speedup']:.2f}x |"
        )
    lines += [
        "",
        f"Attention kernels alone ({attention_note}), {cfg.model.attention.num_heads} heads x {cfg.model.head_dim}; "
        "dense = every row full at the padded shape (B, S), as SDPA runs it; packed = the batch's real tokens. "
        "Flex tuned: benchmarks/bench_encoder.py FLEX_TUNED. Triton: dsmoe/model/alibi_triton.py.",
        "",
        "| shape | SDPA dense, no bias | Flex + ALiBi dense (default / tuned) | Flex / SDPA (best) "
        "| Triton + ALiBi dense | Triton / SDPA | packed real tokens: Flex + doc mask / Triton |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        a = row["attention"]
        if "triton_alibi_ms" in a:
            tuned = f" / {a['flex_alibi_tuned_ms']:.2f}"
            triton = f"{a['triton_alibi_ms']:.2f} | {a['triton_over_sdpa']:.2f}x"
            packed = f"{a['flex_alibi_packed_ms']:.2f} / {a['triton_alibi_packed_ms']:.2f} ({a['real_tokens']} tokens)"
        else:
            tuned, triton, packed = "", "n/a | n/a", "n/a"
        lines.append(
            f"| {row['batch']} x {row['seq_len']} | {a['sdpa_no_bias_ms']:.2f} | {a['flex_alibi_ms']:.2f}{tuned} "
            f"| {a['flex_over_sdpa']:.2f}x | {triton} | {packed} |"
        )
    if "profile" in r:
        lines += ["", *profile_text(r["profile"])]
    lines += ["", "Milliseconds are medians over the timed steps; real tokens exclude padding.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
