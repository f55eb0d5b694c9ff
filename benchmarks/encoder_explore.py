"""Candidate speed-ups of the encoder's MLM training step, tried one after another on one GPU (issue 7).

    python benchmarks/encoder_explore.py --out DIR --budget 230 [--attention]

1. the Triton ALiBi varlen kernels (dsmoe/model/alibi_triton.py) against varlen_eager: output and grads;
2. whole training steps at 256 x 128 (half the rows padded to 64) of BertForMaskedLM and of ours with one
   option changed at a time from configs/mosaicbert_base.yaml (A/B), with a profile by kernel kind;
3. with --attention: the attention alone (forward + backward) on benchmarks/bench_encoder.py's batches: SDPA
   without bias (dense), our Triton kernels (block configs), SDPA with the ALiBi + padding bias on the padded
   batch (efficient / cuDNN backends), FlexAttention dense and packed with kernel options.
Sections past the time budget are skipped. Prints tables; writes explore.json to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # tools/_cli.py

import bench_encoder as bench  # noqa: E402
from _cli import cuda_ms  # noqa: E402

from dsmoe.model import alibi_triton  # noqa: E402
from dsmoe.model.attention import VARLEN_BACKENDS, Varlen, alibi_slopes, plan_attention  # noqa: E402

T0 = time.time()
RESULTS: dict = {}
BACKEND_OVERRIDE: list[str] = []  # becomes flex + torch GeGLU if the Triton check fails


def left(budget):
    return budget - (time.time() - T0)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def check_triton(out):
    dev = torch.device("cuda")
    rows = []
    for lengths, H in (([128, 64, 1, 37, 128, 100], 12), ([512, 256, 300, 5, 511, 64], 12), ([65, 129], 4)):
        S = max(lengths)
        mask = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
        vl = Varlen.from_mask(mask.to(dev))
        T = len(vl.indices)
        qkv = torch.randn(T, 3, H, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(T, H, 64, device=dev, dtype=torch.bfloat16)
        res = {}
        for name in ("eager", "triton"):
            qkv.grad = None
            plan = plan_attention(name, vl, H, torch.bfloat16)
            q, k, v = qkv.unbind(1)
            o = VARLEN_BACKENDS[name](q, k, v, plan)
            o.backward(g)
            res[name] = (o.detach(), qkv.grad.clone())
        r = {
            "lengths": lengths,
            "out_rel": rel(res["triton"][0], res["eager"][0]),
            "grad_rel": rel(res["triton"][1], res["eager"][1]),
            "finite": bool(torch.isfinite(res["triton"][1]).all()),
        }
        rows.append(r)
        print(
            f"triton vs eager {lengths}: out {r['out_rel']:.2e} grad {r['grad_rel']:.2e} finite {r['finite']}"
        )
    out["triton_check"] = rows
    if not all(r["finite"] and r["out_rel"] < 2e-2 and r["grad_rel"] < 2e-2 for r in rows):
        BACKEND_OVERRIDE[:] = ["model.attention.backend=flex", "model.geglu_kernel=torch"]
        print("TRITON CHECK FAILED: steps use flex and the torch GeGLU")


def attention_table(out, budget):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask

    dev = torch.device("cuda")
    dt = torch.bfloat16
    H, hd = 12, 64
    table = []
    flex = torch.compile(
        __import__("torch.nn.attention.flex_attention", fromlist=["x"]).flex_attention, dynamic=True
    )
    slopes = alibi_slopes(H).to(dev)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    def one_shape(s):
        mask = bench.make_batches(s, 30522, 1, seed=s.seq_len, device=dev)[0][1]
        vl = Varlen.from_mask(mask)
        T = len(vl.indices)
        row = {"shape": f"{s.batch}x{s.seq_len}", "T": T}

        def fb(fn, *ts):
            def run():
                o = fn(*ts)
                o.backward(torch.ones_like(o))

            return cuda_ms(run, repeats=15)

        dense = [
            torch.randn(s.batch, H, s.seq_len, hd, device=dev, dtype=dt, requires_grad=True) for _ in range(3)
        ]
        row["sdpa_dense_nobias"] = fb(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *dense)
        qkv = torch.randn(T, 3, H, hd, device=dev, dtype=dt, requires_grad=True)

        def packed(name, plan):
            return lambda: VARLEN_BACKENDS[name](*qkv.unbind(1), plan)

        for cfg in (((64, 64, 4), (64, 64, 4)), ((128, 64, 4), (64, 64, 4)), ((128, 64, 8), (64, 128, 8)),
                    ((128, 128, 8), (128, 128, 8)), ((64, 128, 4), (128, 64, 8))):  # fmt: skip
            alibi_triton.CONFIG.update(fwd=cfg[0], bwd=cfg[1])
            plan = plan_attention("triton", vl, H, dt)
            try:
                row[f"triton {cfg}"] = fb(lambda p=plan: packed("triton", p)())
            except Exception as e:  # a config the compiler rejects
                row[f"triton {cfg}"] = f"error {type(e).__name__}: {str(e)[:200]}"
        alibi_triton.CONFIG.update(fwd=(64, 64, 4), bwd=(64, 64, 4))
        row["plan_ms sdpa"] = cuda_ms(lambda: plan_attention("sdpa", vl, H, dt), repeats=15)
        plan = plan_attention("sdpa", vl, H, dt)
        for be in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            try:
                with sdpa_kernel([getattr(SDPBackend, be)]):
                    row[f"sdpa_bias {be}"] = fb(lambda: packed("sdpa", plan)())
            except Exception as e:
                row[f"sdpa_bias {be}"] = f"error {type(e).__name__}: {str(e)[:200]}"
        print(row, flush=True)
        if left(budget) < 60:
            table.append(row)
            return
        row["flex_dense_alibi"] = fb(lambda q, k, v: flex(q, k, v, score_mod=alibi), *dense)
        row["plan_ms flex"] = cuda_ms(lambda: plan_attention("flex", vl, H, dt), repeats=15)
        plan = plan_attention("flex", vl, H, dt)
        row["flex_packed (current)"] = fb(lambda: packed("flex", plan)())
        print(row, flush=True)
        rowid = vl.row.int()

        def doc(b, h, q_idx, kv_idx):
            return rowid[q_idx] == rowid[kv_idx]

        variants = [
            ("dense alibi, fwd 64x64 bwd 64x64x4w", None, 128, {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64, "bwd_num_warps": 4}),
            ("dense alibi, ROWS_GUARANTEED_SAFE PRESCALE", None, 128, {"ROWS_GUARANTEED_SAFE": True, "PRESCALE_QK": True}),
            ("packed, block 64, fwd 64x64, bwd 64s", doc, 64, {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64, "bwd_num_warps": 4}),
            ("packed, block 128, ROWS_GUARANTEED_SAFE", doc, 128, {"ROWS_GUARANTEED_SAFE": True}),
        ]  # fmt: skip
        for name, mm, blk, opts in variants:
            if left(budget) < 30:
                break
            try:
                if mm is None:
                    row[f"flex {name}"] = fb(
                        lambda q, k, v, o=opts: flex(q, k, v, score_mod=alibi, kernel_options=o), *dense
                    )
                else:
                    bm = create_block_mask(mm, None, None, T, T, device=dev, BLOCK_SIZE=blk, _compile=True)

                    def run(bm=bm, o=opts):
                        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in qkv.unbind(1))
                        return flex(q, k, v, score_mod=alibi, block_mask=bm, kernel_options=o)

                    row[f"flex {name}"] = fb(run)
            except Exception as e:
                row[f"flex {name}"] = f"error {type(e).__name__}: {str(e)[:200]}"
            print(name, row[f"flex {name}"], flush=True)
        table.append(row)

    for s in (bench.Setting(256, 128, 0.5, 64), bench.Setting(64, 512, 0.5, 256)):
        one_shape(s)
    out["attention"] = table


VARIANTS = [  # (label, overrides of configs/mosaicbert_base.yaml, compile the MLM head), most telling first
    ("config as committed (triton attention, triton GeGLU, compiled head)", [], True),
    ("GeGLU by torch.compile instead of the triton kernel", ["model.geglu_kernel=torch"], True),
    ("FlexAttention (the previous default)", ["model.attention.backend=flex"], True),
    ("GELU FFN of BERT's size (109M parameters, as BertForMaskedLM)", ["model.moe.activation=gelu"], True),
    ("MLM head eager", [], False),
    ("SDPA with the ALiBi + padding bias", ["model.attention.backend=sdpa"], True),
    ("dropout 0 (information only: BERT keeps 0.1)", ["model.dropout=0.0"], True),
]


def steps(out, budget):
    dev = torch.device("cuda")
    dt = torch.bfloat16
    res = out.setdefault("steps", [])
    s128 = bench.Setting(256, 128, 0.5, 64)
    batches = bench.make_batches(s128, 30522, 4, seed=128, device=dev)

    def timed(fn, label):
        times = bench.time_training(fn, batches, 5, 12, dev)
        ms = 1000 * statistics.median(times)
        res.append({"label": label, "ms": ms, "real_tok_s": 24576 / ms * 1000})
        print(f"step @ 256x128: {ms:6.1f} ms  {label}", flush=True)
        return ms

    class A:  # the arguments bench_encoder's builders read
        tiny = False
        config = "configs/mosaicbert_base.yaml"
        compile = True
        seq_lens = [128, 512]
        backend = None

    bert, cfg = None, None
    for i, (label, overrides, head) in enumerate(VARIANTS):
        if i and left(budget) < 35:
            print(f"skipped (time): {label}")
            continue
        a = A()
        a.overrides = [*BACKEND_OVERRIDE, *overrides]
        model, cfg = bench.our_encoder(a, dev, dt)
        if not head:
            model._head_loss = type(model).masked_head_loss
        fn = bench.step_function(model, bench.optimizer(model, dev), "ours", False, dev)
        timed(fn, label)
        if i == 0:
            p = {"label": "256 x 128, " + label, **bench.profile(fn, batches)}
            out["profile"] = p
            print("\n".join(bench.profile_text(p)), flush=True)
            theirs, _ = bench.bert(A(), dev, dt, cfg)
            bert = bench.step_function(theirs, bench.optimizer(theirs, dev), "bert", False, dev)
            timed(bert, "BertForMaskedLM (SDPA, bf16)")
            del theirs, bert
        del model, fn
        torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/explore")
    p.add_argument("--budget", type=float, default=230)
    p.add_argument("--attention", action="store_true", help="also time the attention candidates alone")
    args = p.parse_args()
    torch._dynamo.config.recompile_limit = 64
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    out = RESULTS
    Path(args.out).mkdir(parents=True, exist_ok=True)

    def save():
        (Path(args.out) / "explore.json").write_text(json.dumps(out, indent=1, default=str))

    sections = [check_triton, lambda o: steps(o, args.budget)]
    if args.attention:
        sections.append(lambda o: attention_table(o, args.budget))
    for section in sections:
        try:
            section(out)
        except Exception as e:
            import traceback

            traceback.print_exc()
            out.setdefault("errors", []).append(repr(e))
        save()
        print(f"-- {time.time() - T0:.0f} s", flush=True)
        torch.cuda.empty_cache()
    print("\nA/B at 256 x 128 (ms / step, real tokens / s):")
    for r in out.get("steps", []):
        print(f"  {r['ms']:6.1f} ms  {r['real_tok_s']:10,.0f}  {r['label']}")


if __name__ == "__main__":
    main()
