"""NTNG's comparison (papers/no_train_no_gain.md, issue #10): the fully-decayed baseline and six efficient-
training methods, each trained under the same reference-system-time budgets and seeds, then evaluated on
held-out tokens of every domain of a multi-domain corpus.

    python tools/research/compare_methods.py --tokens runs/replicate/tokens --table benchmarks/rst/<device>_compare.json \\
        --budgets 15 60 --seeds 1 2 --jobs 28 --out benchmarks/compare_methods/<name> [key=value ...]

Runs (each its own process, `--jobs` at a time, all through dsmoe.run.run with train.budget set):
baseline (AdamW, LR linear to 0 at the budget), layer_stacking (depth doubled at 25% and 50% of the
budget), layer_drop (progressive layer dropping), selective_backprop and rho_loss (backprop half of a
forward batch twice the size; RHO-loss's irreducible-loss model is trained on held-out training tokens
first, its steps charged), lion and sophia (client optimizers, DeepSpeed owns the step). Every run uses the
budget schedule of train.budget (warmup, then decay to 0 at the budget). The method hyperparameters are
the papers' defaults, untuned here (METHODS below).

Because the budget charges each executed pass its reference time from the table, a run stops at the same
step however fast the machine runs it: runs may share one device concurrently (only their wall time
changes; wall is measured under that concurrency).

--tokens DIR: a directory of uint16 token files from tools/research/ablate_data.py (train_all.bin, val_all.bin,
val_<domain>.bin, tokenizer.json); per-domain perplexity is measured on every val_<domain>.bin.

Writes <out>/results.json (every run), <out>/results.md (the table: mean and spread over seeds),
<out>/val_loss_vs_rst.png, and <out>/curves_vs_rst.png (training loss and LR against RST, largest budget,
first seed; --replot RUNS_DIR draws it again from saved runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # tools/_cli.py
from _cli import git_commit  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# The model and run the comparison trains (configs/tiny.yaml's model on the --tokens corpus).
BASE = [
    "train.checkpoint_every=0",
    "train.export_at_end=false",
    "train.wandb=false",
    "train.progress=false",
    "train.budget.schedule=linear",
    "train.budget.warmup_fraction=0.02",
    "train.budget.final_lr_ratio=0.0",
]

# name -> overrides. Hyperparameters: the methods' papers / NTNG defaults, not tuned here.
METHODS: dict[str, list[str]] = {
    "baseline": [],
    "layer_stacking": ["train.method.name=layer_stacking", "train.method.stack_at=[0.25,0.5]"],
    "layer_drop": ["train.method.name=layer_drop", "train.method.theta_bar=0.5", "train.method.gamma=100"],
    "selective_backprop": ["train.method.name=selective_backprop", "train.method.fraction=0.5"],
    "rho_loss": [
        "train.method.name=rho_loss",
        "train.method.fraction=0.5",
        "train.method.irreducible_steps=100",
        "train.method.irreducible_layers=2",
    ],
    # Lion: lr ~3x smaller and weight decay ~3x larger than AdamW's (Chen et al. 2023), betas (0.9, 0.99).
    "lion": ["train.optimizer=lion", "train.lr=1e-3", "train.weight_decay=0.03", "train.beta2=0.99"],
    # Sophia-G: the authors' betas (0.965, 0.99), rho 0.04, Hessian every 10 steps; lr as Lion's (its
    # update is at most lr per coordinate, like Lion's sign step).
    "sophia": [
        "train.optimizer=sophia",
        "train.lr=1e-3",
        "train.beta1=0.965",
        "train.beta2=0.99",
        "train.weight_decay=0.1",
        "train.sophia_rho=0.04",
        "train.sophia_hessian_interval=10",
    ],
}


def token_overrides(tokens: Path) -> list[str]:
    return [
        "data.corpus=tokens",
        f"data.train_tokens={tokens / 'train_all.bin'}",
        f"data.val_tokens={tokens / 'val_all.bin'}",
        f"data.tokenizer={tokens / 'tokenizer.json'}",
    ]


def domains(tokens: Path) -> dict[str, Path]:
    found = {p.stem[len("val_") :]: p for p in sorted(tokens.glob("val_*.bin")) if p.stem != "val_all"}
    if not found:
        raise SystemExit(f"{tokens} has no val_<domain>.bin files: per-domain perplexity needs them")
    return found


@torch.no_grad()
def evaluate(model, tokens: Path, seq_len: int, max_tokens: int, device) -> dict[str, float]:
    """Mean next-token loss of `model` on every held-out domain (consecutive windows, as at the end of a run)."""
    import numpy as np

    from dsmoe.data.sampler import eval_windows

    model.eval()
    losses = {}
    for name, path in domains(tokens).items():
        windows = eval_windows(np.memmap(path, dtype=np.uint16, mode="r"), seq_len, max_tokens)
        total, count = 0.0, 0
        for i in range(0, len(windows), 32):
            x = torch.stack([w[0] for w in windows[i : i + 32]]).to(device)
            y = torch.stack([w[1] for w in windows[i : i + 32]]).to(device)
            logits = model(x).logits.float()
            total += float(
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
            )
            count += y.numel()
        losses[name] = total / count
    model.train()
    return losses


def worker(args) -> int:
    """One run: train under the budget, evaluate every domain, write result.json in the run directory."""
    from dsmoe import config as config_lib
    from dsmoe.run import run
    from dsmoe.train.logging import read_metrics
    from parallel import groups

    cfg = config_lib.load(args.config, args.overrides)
    dims = groups.init(cfg.parallel)
    started = time.perf_counter()
    result = run(cfg)
    metrics = read_metrics(Path(cfg.train.run_dir))
    tail = [m["loss"] for m in metrics[-max(1, len(metrics) // 10) :]]
    val = evaluate(
        result.engine.module, Path(args.tokens), cfg.data.seq_len, cfg.train.eval_tokens, dims.device
    )
    out = {
        "steps": result.steps,
        "train_loss": sum(tail) / len(tail),
        "val_loss": sum(val.values()) / len(val),
        "domain_loss": val,
        "rst_s": result.budget["rst_s"],
        "budget_s": result.budget["budget_s"],
        "wall_s": result.budget["wall_s"],
        "process_s": time.perf_counter() - started,
        "charges": result.budget["charges"],
        "final_lr": metrics[-1]["lr"],
    }
    (Path(cfg.train.run_dir) / "result.json").write_text(json.dumps(out, indent=1))
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


def summarise(runs: list[dict], out: Path, meta: dict) -> None:
    """results.json, the markdown table (mean +- half the range over seeds) and the plot."""
    (out / "results.json").write_text(json.dumps({**meta, "runs": runs}, indent=1))
    done = [r for r in runs if "val_loss" in r]
    budgets = sorted({r["budget_s"] for r in runs})
    names = [m for m in METHODS if any(r["method"] == m for r in runs)]
    doms = sorted({d for r in done for d in r["domain_loss"]})

    def group(method, budget):
        return [r for r in done if r["method"] == method and r["budget_s"] == budget]

    def cell(values, fmt="{:.3f}"):
        if not values:
            return "-"
        mean = statistics.fmean(values)
        spread = (max(values) - min(values)) / 2
        return fmt.format(mean) + (f" ± {fmt.format(spread)}" if len(values) > 1 else "")

    lines = [
        f"# NTNG comparison: {meta['device']}, {meta['date']}, commit {meta['commit']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"RST table: {meta['table']} ({meta['table_device']}). Seeds {meta['seeds']}; mean ± half the range "
        "over seeds. Validation loss: mean over the domains of the held-out next-token loss; ppl per domain is "
        "exp of that domain's loss. Training loss: mean of the last 10% of steps (batch selection reports the "
        "loss of the selected, high-loss rows). Wall: seconds of the run's process loop, measured while "
        f"{meta['jobs']} runs shared the device (RST is unaffected by that, wall is not).",
        "",
    ]
    for budget in budgets:
        base = [r["val_loss"] for r in group("baseline", budget)]
        lines += [
            f"## Budget {budget:g} s RST",
            "",
            "| method | steps | train loss | val loss | Δ val vs baseline | "
            + " | ".join(f"ppl {d}" for d in doms)
            + " | RST s | wall s |",
            "|---" * (7 + len(doms)) + "|",
        ]
        for name in names:
            rs = group(name, budget)
            val = [r["val_loss"] for r in rs]
            delta = statistics.fmean(val) - statistics.fmean(base) if val and base else float("nan")
            lines.append(
                f"| {name} | {cell([r['steps'] for r in rs], '{:.0f}')} | {cell([r['train_loss'] for r in rs])} | "
                f"{cell(val)} | {delta:+.3f} | "
                + " | ".join(cell([math.exp(r["domain_loss"][d]) for r in rs], "{:.2f}") for d in doms)
                + f" | {cell([r['rst_s'] for r in rs], '{:.2f}')} | {cell([r['wall_s'] for r in rs], '{:.1f}')} |"
            )
        failed = [
            f"{r['method']} seed {r['seed']}" for r in runs if r["budget_s"] == budget and "val_loss" not in r
        ]
        if failed:
            lines.append(f"\nNot finished: {', '.join(failed)}")
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for budget in budgets:
            val = [r["val_loss"] for r in group(name, budget)]
            if val:
                xs.append(budget * (1 + 0.012 * (i - 3)))  # a small offset keeps the error bars apart
                ys.append(statistics.fmean(val))
                lo.append(ys[-1] - min(val))
                hi.append(max(val) - ys[-1])
        ax.errorbar(
            xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name, lw=2.5 if name == "baseline" else 1
        )
    ax.set_xscale("log")
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
    ax.set_xlabel("budget (s of reference system time)")
    ax.set_ylabel("validation loss (mean over domains)")
    ax.set_title(f"NTNG methods vs fully-decayed baseline ({meta['device']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "val_loss_vs_rst.png", dpi=120)


def plot_curves(runs_dir: Path, budget: float, seed: int, path: Path) -> Path:
    """Training loss (EMA-smoothed) and learning rate against RST for every method's run at one budget and
    seed, from the runs' metrics.jsonl: every schedule reaches its final LR where the budget ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsmoe.train.logging import read_metrics

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[2, 1])
    for name in METHODS:
        run_dir = runs_dir / f"{name}_b{budget:g}_s{seed}"
        if not (run_dir / "metrics.jsonl").is_file():
            continue
        metrics = read_metrics(run_dir)
        rst = [m["rst_s"] for m in metrics]
        smooth, ema = [], None
        for m in metrics:
            ema = m["loss"] if ema is None else 0.95 * ema + 0.05 * m["loss"]
            smooth.append(ema)
        width = 2.5 if name == "baseline" else 1
        top.plot(rst, smooth, label=name, lw=width)
        bottom.plot(rst, [m["lr"] for m in metrics], label=name, lw=width)
    top.set_ylabel("training loss (EMA 0.95)")
    top.set_title(f"budget {budget:g} s RST, seed {seed}", fontsize=9)
    top.legend(fontsize=8)
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("reference system time spent (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--tokens", help="token directory (train_all.bin, val_<domain>.bin, ...)")
    parser.add_argument(
        "--table", help="RST table (tools/research/calibrate_rst.py); required unless --worker"
    )
    parser.add_argument("--budgets", type=float, nargs="+", default=[15.0, 60.0], help="seconds of RST")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (they may share one device)")
    parser.add_argument(
        "--deadline", type=float, default=0, help="seconds: stop unfinished runs then (0: none)"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--replot",
        metavar="RUNS_DIR",
        help="only draw <out>/curves_vs_rst.png from RUNS_DIR/<method>_b<budget>_s<seed>/metrics.jsonl "
        "(the largest --budgets, the first --seeds)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value for every run (e.g. model shape)")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.replot:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        print(
            plot_curves(
                Path(args.replot), max(args.budgets), args.seeds[0], Path(args.out) / "curves_vs_rst.png"
            )
        )
        return 0
    if not args.table or not args.tokens:
        parser.error("--table and --tokens are required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = Path(args.tokens).resolve()
    domains(tokens)
    from dsmoe.train.budget import RstTable

    table = RstTable.load(args.table)
    started = time.perf_counter()
    queue = []  # longest budgets first: the short ones fill in around them
    for budget in sorted(args.budgets, reverse=True):
        for seed in args.seeds:
            for name in args.methods:
                run_dir = out / "runs" / f"{name}_b{budget:g}_s{seed}"
                overrides = [
                    *token_overrides(tokens),
                    *BASE,
                    *METHODS[name],
                    *args.overrides,  # last: they win over a method's settings
                    f"train.seed={seed}",
                    f"train.run_dir={run_dir}",
                    f"train.budget.rst_hours={budget / 3600!r}",
                    f"train.budget.reference={Path(args.table).resolve()}",
                ]
                queue.append(
                    dict(method=name, budget_s=budget, seed=seed, run_dir=run_dir, overrides=overrides)
                )
    running: list[tuple[dict, subprocess.Popen]] = []
    runs = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    while queue or running:
        while queue and len(running) < args.jobs:
            job = queue.pop(0)
            job["run_dir"].mkdir(parents=True, exist_ok=True)
            log = open(job["run_dir"] / "log.txt", "w")  # noqa: SIM115 (closed with the process)
            cmd = [sys.executable, __file__, "--worker", "--tokens", str(tokens), "--config", args.config]
            proc = subprocess.Popen(
                cmd + ["--out", str(out), *job["overrides"]], stdout=log, stderr=subprocess.STDOUT, env=env
            )
            running.append((job, proc))
        time.sleep(0.5)
        over = args.deadline and time.perf_counter() - started > args.deadline
        for job, proc in list(running):
            if proc.poll() is None and not over:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            running.remove((job, proc))
            record = {k: job[k] for k in ("method", "budget_s", "seed")}
            result = job["run_dir"] / "result.json"
            if proc.returncode == 0 and result.is_file():
                record.update(json.loads(result.read_text()))
            else:
                tail = (job["run_dir"] / "log.txt").read_text()[-1500:]
                record["error"] = f"exit {proc.returncode}: {tail}"
                print(
                    f"{job['method']} budget {job['budget_s']:g} seed {job['seed']} failed:\n{tail}",
                    flush=True,
                )
            runs.append(record)
            print(
                f"[{time.perf_counter() - started:6.1f} s] {record['method']:>18} budget {record['budget_s']:g} "
                f"seed {record['seed']}: "
                + (
                    f"{record['steps']} steps, val loss {record['val_loss']:.4f}, wall {record['wall_s']:.1f} s"
                    if "val_loss" in record
                    else "FAILED"
                ),
                flush=True,
            )
        if over:
            queue.clear()
    runs.sort(key=lambda r: (r["budget_s"], list(METHODS).index(r["method"]), r["seed"]))
    meta = {
        "device": table.device if torch.cuda.is_available() else f"{table.device} (table); runs on CPU",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "command": "python tools/research/compare_methods.py " + " ".join(sys.argv[1:]),
        "table": str(args.table),
        "table_device": f"{table.device}, {table.date}, commit {table.commit}",
        "seeds": args.seeds,
        "jobs": args.jobs,
        "total_wall_s": time.perf_counter() - started,
        "methods": {m: METHODS[m] for m in args.methods},
        "common_overrides": BASE + args.overrides,
    }
    summarise(runs, out, meta)
    plot_curves(out / "runs", max(args.budgets), args.seeds[0], out / "curves_vs_rst.png")
    print(f"{len(runs)} runs in {meta['total_wall_s']:.0f} s: {out}/results.md, {out}/val_loss_vs_rst.png")
    return 0 if all("val_loss" in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
