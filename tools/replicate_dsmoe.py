"""DS-MoE's result table in miniature: dense vs sparse-trained MoE vs DS-MoE on our code (papers/dsmoe.md).

    python tools/prepare_corpus.py corpora/replicate --max-mb 12
    python tools/replicate_dsmoe.py --corpus corpora/replicate --workdir runs/replicate \
        --scales 25m 100m --out benchmarks/replicate_dsmoe [key=value ...]

For each scale (dsmoe/replicate.py: SCALES) trains the variants of dsmoe/replicate.py (dense, SMoE, SMoE
with 2x the experts, DS-MoE at MI weight 0, the paper's and 2x) on the same tokens, schedule and seed, then
evaluates each on every domain's held-out text and sweeps DS-MoE's sparsity (top-K for K = 1..N, thresholds).
Resumable: a finished run or evaluation is not redone, an interrupted run resumes from its last checkpoint,
so the table can be completed over several GPU slices (--time-budget stops before starting a run that would
not fit). Writes results.md (tables in the paper's format), results.json, sparsity_<scale>.png and
loss_<scale>.png into --out, from whatever is finished so far. key=value overrides apply to every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _cli import git_commit  # noqa: E402

from dsmoe import replicate as rep  # noqa: E402
from dsmoe.ablation import build_unit_pool  # noqa: E402
from dsmoe.cached import recipe, train_and_export  # noqa: E402
from dsmoe.export import load_export  # noqa: E402
from dsmoe.infer import perplexity  # noqa: E402
from dsmoe.model import Routing, RoutingRule  # noqa: E402
from dsmoe.train.logging import read_metrics  # noqa: E402


def prepare_tokens(args) -> tuple:
    """One tokenizer and held-out split for every run; the training stream is every remaining token."""
    pool = build_unit_pool(
        Path(args.corpus),
        Path(args.workdir) / "tokens",
        vocab_size=args.vocab_size,
        val_tokens=args.val_tokens,
        seed_tokens=0,
        unit_tokens=args.unit_tokens,
        units_per_domain=10**9,
    )
    train = pool.directory / "train_all.bin"
    if not train.is_file():
        np.concatenate([np.fromfile(p, dtype=np.uint16) for _, p in sorted(pool.units.items())]).tofile(train)
    vals = {d: np.fromfile(pool.val(d), dtype=np.uint16) for d in pool.domains}
    return pool, train, vals


def run_overrides(args, scale, variant, pool, train_tokens: Path) -> list[str]:
    run_dir = Path(args.workdir) / scale.name / variant
    return rep.overrides(scale, variant) + [
        "data.corpus=tokens",
        f"data.train_tokens={train_tokens}",
        f"data.val_tokens={pool.val_all}",
        f"data.tokenizer={pool.tokenizer}",
        f"train.run_dir={run_dir}",
        f"train.precision={args.precision}",
        "train.eval_tokens=8192",
        "train.wandb=false",
        *args.overrides,
    ]


def training_figures(run_dir: Path, tokens_per_step: int) -> dict:
    records = {r["step"]: r for r in read_metrics(run_dir)}  # a resumed step's last record wins
    steps = [records[s] for s in sorted(records)]
    last = steps[-max(1, len(steps) // 20) :]
    return {
        "steps": len(steps),
        "tokens": len(steps) * tokens_per_step,
        "final_lm_loss": float(np.mean([r["lm_loss"] for r in last])),
        "train_seconds": float(sum(tokens_per_step / r["tokens_per_s"] for r in steps)),
        "median_tokens_per_s": float(np.median([r["tokens_per_s"] for r in steps])),
        "curve": [[r["step"] * tokens_per_step, r["lm_loss"]] for r in steps],
    }


def domain_row(model, vals, seq_len, routing, max_tokens, batch_size, label: str) -> dict:
    """Perplexity per domain and over all of them (equal tokens each), with the active shares."""
    row, nll, n, mlp, params = {}, 0.0, 0, 0.0, 0.0
    for domain, tokens in sorted(vals.items()):
        r = perplexity(model, tokens, seq_len, routing, max_tokens, batch_size)
        row[domain] = r.perplexity
        nll += math.log(r.perplexity) * r.tokens
        n += r.tokens
        mlp += r.expert_active_fraction * r.tokens
        params += r.param_active_fraction * r.tokens
    row.update(all=math.exp(nll / n), mlp_active=mlp / n, param_active=params / n, routing=label)
    return row


def default_label(cfg) -> str:
    if cfg.model.mlp == "dense":
        return "dense"
    if cfg.model.moe.training == "sparse":
        return f"top-{cfg.model.moe.train_top_k} (as trained)"
    return "all experts"


def data_fingerprint(pool, train_tokens: Path) -> str:
    """The tokens themselves (the config names only their files): another corpus in the same workdir
    must not reuse evaluations."""
    digest = hashlib.sha256()
    for path in (pool.tokenizer, pool.val_all, train_tokens):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def eval_key(args, run_recipe: str, data: str) -> str:
    """What an evaluation depends on: the run's resolved config, its tokens and the evaluation's settings."""
    settings = [
        run_recipe,
        data,
        args.eval_tokens,
        rep.THRESHOLDS,
        rep.TARGET_MLP_ACTIVE,
        rep.top_k_values(64),
    ]
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()


def eval_files(args, scale_name: str, variant: str) -> list[Path]:
    """Where a run's evaluation is kept: next to the run, and in --out (committed with the report, so the
    next GPU slice, which has none of the checkpoints, carries on from the report directory)."""
    return [
        Path(args.workdir) / scale_name / variant / "eval.json",
        Path(args.out) / "evals" / f"{scale_name}_{variant}.json",
    ]


def cached_eval(files: list[Path], key: str, data: str) -> dict | None:
    """A finished run's evaluation, if one was made with this recipe, these tokens and these evaluation
    settings. One that is not reused says why, so a table that retrains everything is never a surprise."""
    for cache in files:
        if cache.is_file():
            result = json.loads(cache.read_text())
            if result.get("key") == key:
                return result
            why = "other tokens" if result.get("data", data) != data else "another recipe or eval settings"
            print(f"{cache}: made with {why}; not reused", flush=True)
    return None


def evaluate(args, scale, variant, export_dir: Path, vals: dict, key: str, data: str) -> dict:
    """Everything the report needs from one trained run, written to eval_files()."""
    run_dir = export_dir.parent
    model, cfg, _, _ = load_export(export_dir)
    model = model.to(args.device)
    seq, bs, n_tok = cfg.data.seq_len, args.eval_batch_size, args.eval_tokens
    result = {
        "key": key,
        "data": data,
        "scale": scale.name,
        "variant": variant,
        "device": device_name(args.device),
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "params": {
            "total": model.num_params(),
            "non_embedding": model.num_params(exclude_embedding=True),
            "mlp_experts": model.num_expert_params(),
        },
        "train": training_figures(run_dir, scale.global_batch_size * scale.seq_len),
        # dense/DS-MoE: every expert; SMoE: its training top-K (a sparse-trained model's own rule)
        "rows": {"default": domain_row(model, vals, seq, Routing(), n_tok, bs, default_label(cfg))},
        "curve": [],
    }
    if variant.startswith("dsmoe"):
        curve_tokens = rep.curve_tokens(vals, n_tok)
        for name, routing in rep.sweep(scale.num_experts):
            r = perplexity(model, curve_tokens, seq, routing, 0, bs)
            result["curve"].append(
                {
                    "rule": name,
                    "perplexity": r.perplexity,
                    "mlp_active": r.expert_active_fraction,
                    "attention_active": r.attention_active_fraction,
                    "param_active": r.param_active_fraction,
                }
            )
        point = rep.operating_point(result["curve"])
        if point is not None:
            eps = float(point["rule"].split("=")[1])
            rule = RoutingRule("threshold", eps=eps)
            result["rows"]["threshold"] = domain_row(
                model, vals, seq, Routing(rule, rule), n_tok, bs, f"threshold {eps:g} (MLP+MoA)"
            )
        k = scale.smoe_top_k  # the SMoE's active experts: the same compute in the MLP
        result["rows"]["top_k"] = domain_row(
            model, vals, seq, Routing(mlp=RoutingRule("top_k", k=k)), n_tok, bs, f"top-{k} (MLP)"
        )
    for cache in eval_files(args, scale.name, variant):
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(result, indent=1))
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------- report


def _m(n: float) -> str:
    return f"{n / 1e6:.1f}M"


def write_report(args, results: dict, domains: list[str], echo: bool = True) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # sha256 of tokenizer + tokens: a later rebuild of the corpus that differs shows here (and retrains)
    prints = sorted({r["data"][:12] for d in results.values() for r in d.values() if r.get("data")})
    lines = [
        "# DS-MoE's result table in miniature",
        "",
        f"Command: `{' '.join(['python', *(a for a in sys.argv if a != '--report-only')])}`  ",
        f"Tokens: {args.corpus} ({', '.join(domains)}), {args.val_tokens} held-out tokens per domain, "
        f"evaluated on the first {args.eval_tokens}; training precision {args.precision}; token fingerprint "
        f"{', '.join(prints) or '-'}. Where and when each run trained: the table at the end.",
        "",
        "Perplexity on each domain's held-out text (lower is better). Active: non-embedding parameters "
        "computed per token (routers and shared K/V always run). DS-MoE rows: all experts; the threshold rule "
        f"N*p>eps on MLP and MoA at the smallest eps that computes <= {rep.TARGET_MLP_ACTIVE:.0%} of the MLP "
        "experts; top-K on the MLP at the SMoE's K.",
    ]
    for scale_name, by_variant in results.items():
        scale = rep.SCALES[scale_name]
        lines += ["", f"## Scale {scale_name}", ""]
        lines += [
            f"d_model {scale.d_model}, {scale.n_layers} layers, {scale.attention_experts * scale.heads_per_expert} "
            f"query heads ({scale.attention_experts} MoA experts x {scale.heads_per_expert} in DS-MoE), "
            f"{scale.kv_heads} K/V heads, MLP {scale.num_experts} x {scale.expert_hidden} (SMoE top-"
            f"{scale.smoe_top_k}); {scale.steps} steps x {scale.global_batch_size} x {scale.seq_len} tokens, "
            f"lr {scale.lr:g}.",
            "",
            "| model | routing | total params | active | active % | MLP experts active | "
            + " | ".join(domains)
            + " | all | train loss | train time |",
            "|---" * (8 + len(domains)) + "|",
        ]
        for variant in rep.VARIANTS:
            r = by_variant.get(variant)
            if r is None:
                lines.append(f"| {rep.LABELS[variant]} | (not trained yet) |" + " |" * (6 + len(domains)))
                continue
            for row_name, row in r["rows"].items():
                active = row["param_active"] * r["params"]["non_embedding"]
                first = row_name == "default"
                lines.append(
                    f"| {rep.LABELS[variant] if first else ''} | {row['routing']} | "
                    f"{_m(r['params']['total']) if first else ''} | {_m(active)} | {100 * row['param_active']:.0f}% | "
                    f"{100 * row['mlp_active']:.0f}% | "
                    + " | ".join(f"{row[d]:.2f}" for d in domains)
                    + f" | **{row['all']:.2f}** | "
                    + (
                        f"{r['train']['final_lm_loss']:.3f} | {r['train']['train_seconds']:.0f} s |"
                        if first
                        else " | |"
                    )
                )
        lines += targets(by_variant)
        lines += alpha_table(by_variant)
        plot_sparsity(out / f"sparsity_{scale_name}.png", scale_name, by_variant)
        plot_losses(out / f"loss_{scale_name}.png", scale_name, by_variant)
        lines += ["", f"![sparsity](sparsity_{scale_name}.png) ![loss](loss_{scale_name}.png)"]
    lines += [
        "",
        "| run | device | date | commit | training tokens/s (median step) |",
        "|---|---|---|---|---|",
    ]
    for scale_name, by_variant in results.items():
        for variant, r in by_variant.items():
            lines.append(
                f"| {scale_name} {variant} | {r.get('device', '?')} | {r.get('date', '?')} | {r.get('commit', '?')} "
                f"| {r['train']['median_tokens_per_s']:,.0f} |"
            )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    slim = {
        s: {v: {k: x for k, x in r.items() if k != "key"} for v, r in d.items()} for s, d in results.items()
    }
    (out / "results.json").write_text(json.dumps(slim, indent=1))
    if echo:
        print("\n".join(lines))


def targets(by_variant: dict) -> list[str]:
    lines = ["", "Targets (papers/dsmoe.md):", ""]
    dense, ds = by_variant.get("dense"), by_variant.get("dsmoe")
    if dense and ds and "threshold" in ds["rows"]:
        t = ds["rows"]["threshold"]
        gap = t["all"] / dense["rows"]["default"]["all"] - 1
        lines.append(
            f"- DS-MoE within 3% of dense at <= 45% MLP experts active: {100 * gap:+.1f}% at "
            f"{100 * t['mlp_active']:.0f}% active ({t['routing']}): {'met' if gap <= 0.03 else 'NOT met'}"
        )
    for smoe in ("smoe", "smoe_2x"):
        if ds and by_variant.get(smoe):
            a, b = ds["rows"]["default"]["all"], by_variant[smoe]["rows"]["default"]["all"]
            same = "at equal total parameters" if smoe == "smoe" else "with half SMoE-2x's parameters"
            lines.append(
                f"- DS-MoE ({a:.2f}) vs {rep.LABELS[smoe]} ({b:.2f}) {same}: "
                f"{'better' if a < b else 'NOT better'}"
            )
    a0, a1 = by_variant.get("dsmoe_alpha0"), ds
    if a0 and a1:
        low = f"top_k={max(1, rep.SCALES[a1['scale']].num_experts // 8)}"
        p0 = next(p for p in a0["curve"] if p["rule"] == low)
        p1 = next(p for p in a1["curve"] if p["rule"] == low)
        worse = p0["perplexity"] / p1["perplexity"] - 1
        verdict = "yes" if worse > 0.01 else "NO (within 1%)" if worse > -0.01 else "NO (better)"
        lines.append(
            f"- without the MI loss, low active fraction is clearly worse: {low} gives {p0['perplexity']:.2f} at "
            f"alpha 0 vs {p1['perplexity']:.2f} at the paper's alpha ({100 * worse:+.1f}%): {verdict}"
        )
    return lines


def alpha_table(by_variant: dict) -> list[str]:
    runs = [v for v in ("dsmoe_alpha0", "dsmoe", "dsmoe_alpha2x") if by_variant.get(v)]
    if not runs:
        return []
    n = rep.SCALES[by_variant[runs[0]]["scale"]].num_experts
    ks = sorted({1, max(1, n // 8), max(1, n // 4), max(1, n // 2)})
    lines = [
        "",
        "MI-loss weight ablation: perplexity (all domains) at a sparsity (MLP experts active).",
        "",
        "| MI weight | all experts | "
        + " | ".join(f"top-{k} ({100 * k / n:.0f}%)" for k in ks)
        + " | threshold 0.48 |",
        "|---" * (3 + len(ks)) + "|",
    ]
    for v in runs:
        curve = {p["rule"]: p for p in by_variant[v]["curve"]}
        t = curve.get("threshold=0.48")
        lines.append(
            f"| {rep.LABELS[v]} | {by_variant[v]['rows']['default']['all']:.2f} | "
            + " | ".join(f"{curve[f'top_k={k}']['perplexity']:.2f}" for k in ks)
            + (f" | {t['perplexity']:.2f} ({100 * t['mlp_active']:.0f}%) |" if t else " | |")
        )
    return lines


def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_size: int = 8) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sparsity(path: Path, scale_name: str, by_variant: dict) -> None:
    fig, ax = _axes()
    colors = {"dsmoe": "C0", "dsmoe_alpha0": "C3", "dsmoe_alpha2x": "C2"}
    for v, r in by_variant.items():
        ne = r["params"]["non_embedding"]
        if v.startswith("dsmoe"):
            for kind, style in (("top_k", "-o"), ("threshold", "--s")):
                pts = sorted(
                    (p for p in r["curve"] if p["rule"].startswith(kind)), key=lambda p: p["param_active"]
                )
                ax.plot(
                    [p["param_active"] * ne / 1e6 for p in pts],
                    [p["perplexity"] for p in pts],
                    style,
                    color=colors[v],
                    ms=3,
                    label=f"{rep.LABELS[v]}, {'top-K (MLP)' if kind == 'top_k' else 'threshold'}",
                )
        else:
            row = r["rows"]["default"]
            ax.plot(
                [row["param_active"] * ne / 1e6],
                [row["all"]],
                "*",
                ms=12,
                label=f"{rep.LABELS[v]} ({row['routing']})",
            )
    dense = by_variant.get("dense")
    if dense:
        ax.axhline(dense["rows"]["default"]["all"], color="k", lw=0.7, ls=":")
    ys = [p["perplexity"] for r in by_variant.values() for p in r["curve"]] + [
        r["rows"]["default"]["all"] for r in by_variant.values()
    ]
    if ys:
        ax.set_ylim(min(ys) * 0.97, min(max(ys), 2.0 * min(ys)))
    _save(
        fig,
        ax,
        path,
        "active non-embedding parameters per token (M)",
        "held-out perplexity (all domains)",
        f"Perplexity vs active parameters, scale {scale_name}",
        legend_size=7,
    )


def plot_losses(path: Path, scale_name: str, by_variant: dict) -> None:
    fig, ax = _axes()
    for v, r in by_variant.items():
        curve = np.array(r["train"]["curve"])
        w = max(1, len(curve) // 30)
        smooth = np.convolve(curve[:, 1], np.ones(w) / w, mode="valid")
        ax.plot(curve[w - 1 :, 0] / 1e6, smooth, label=rep.LABELS[v])
    _save(
        fig,
        ax,
        path,
        "training tokens (M)",
        "training LM loss (smoothed)",
        f"Training curves, scale {scale_name}",
    )


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", required=True, help="directory of domains (tools/prepare_corpus.py)")
    parser.add_argument("--workdir", required=True, help="runs and token files (resumable)")
    parser.add_argument("--out", required=True, help="where results.md, results.json and the plots go")
    parser.add_argument("--scales", nargs="+", default=["25m", "100m"], choices=sorted(rep.SCALES))
    parser.add_argument("--variants", nargs="+", default=list(rep.VARIANTS), choices=rep.VARIANTS)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--val-tokens", type=int, default=65536, help="held-out tokens per domain")
    parser.add_argument("--unit-tokens", type=int, default=65536, help="granularity of the training stream")
    parser.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens evaluated per domain")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument(
        "--time-budget", type=float, default=0, help="seconds: start no new run after this (0: no limit)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16", "fp32"], help="training (default: bf16 on a GPU)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the report from finished evaluations; train nothing",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args()
    started = time.time()
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # evaluation of the fp32 exports
    pool, train_tokens, vals = prepare_tokens(args)
    data = data_fingerprint(pool, train_tokens)
    results: dict[str, dict] = {}
    stopped = False
    for scale_name in args.scales:
        scale = rep.SCALES[scale_name]
        results[scale_name] = {}
        # Most telling first, so a short GPU slice still compares dense, DS-MoE and SMoE.
        for variant in sorted(args.variants, key=rep.RUN_ORDER.index):
            over = run_overrides(args, scale, variant, pool, train_tokens)
            key = eval_key(args, recipe(None, over), data)
            result = cached_eval(eval_files(args, scale_name, variant), key, data)
            if result is None:
                if args.report_only or (args.time_budget and time.time() - started > args.time_budget):
                    stopped = True
                    continue
                t0 = time.time()
                export_dir = train_and_export(None, over, in_process=True)
                result = evaluate(args, scale, variant, export_dir, vals, key, data)
                print(
                    f"{scale_name}/{variant}: trained and evaluated in {time.time() - t0:.0f} s", flush=True
                )
            results[scale_name][variant] = result
            write_report(args, results, pool.domains, echo=False)  # a killed slice keeps its table
    write_report(args, results, pool.domains)
    if stopped:
        why = "--report-only" if args.report_only else "time budget reached"
        print(f"{why}: runs not trained yet are marked in the table; run without --report-only to train them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
