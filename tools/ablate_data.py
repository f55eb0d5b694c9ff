"""Rank data mixtures for the cost of one run per data unit (Na et al. 2024, papers/data_ablation.md).

    python tools/prepare_corpus.py corpora/example
    python tools/ablate_data.py --corpus corpora/example --workdir runs/ablate [key=value ...]

1. Cut every domain into equal base units (one shared tokenizer) plus held-out and seed tokens.
2. Train a seed model on the seed tokens of all domains (configs/tiny.yaml unless --config).
3. Continue pretraining the seed on each base unit with an identical recipe (same steps, schedule and
   seed; full warmup and decay within the unit budget). Cached: a unit already trained with the same
   recipe is not trained again, so adding a unit trains only that unit.
4. For each mixture, merge its units' models by token-weighted parameter averaging (fp32), and train the
   real mixture model on the same tokens with the same recipe.
5. Evaluate both on every domain's held-out text; report Pearson / Spearman correlation (per domain and
   pooled), whether the best mixture agrees, the expert-load drift between merged modules, and the cost.
Writes results.md, results.csv and scatter.png into the workdir. --jobs N trains units as N parallel
processes (`python launchers/train.py ...`); by default they train one after another in this process.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _cli import git_commit  # noqa: E402

from dsmoe import config as config_lib  # noqa: E402
from dsmoe.ablation import build_unit_pool, merge, mixture_units, pearson, spearman  # noqa: E402
from dsmoe.cached import train_and_export as train  # noqa: E402
from dsmoe.export import load_export  # noqa: E402
from dsmoe.infer import perplexity  # noqa: E402
from dsmoe.model import Routing, build  # noqa: E402


def train_overrides(
    pool, run_dir: Path, tokens: Path, n_tokens: int, cfg, init_from: Path | None
) -> list[str]:
    """One recipe for every module: steps follow the token budget, warmup is 10% of them."""
    steps = max(1, n_tokens // (cfg.train.global_batch_size * cfg.data.seq_len))
    return [
        "data.corpus=tokens",
        f"data.train_tokens={tokens}",
        f"data.val_tokens={pool.val_all}",
        f"data.tokenizer={pool.tokenizer}",
        f"train.run_dir={run_dir}",
        f"train.max_steps={steps}",
        f"train.warmup_steps={max(1, steps // 10)}",
        f"train.checkpoint_every={steps}",
        "train.keep_checkpoints=1",
        "train.export_at_end=false",
        "train.wandb=false",
        "train.progress=false",
        *([f"train.init_from={init_from}"] if init_from else []),
    ]


def candidate_mixtures(domains: list[str], units_per_domain: int, mixture_units: int) -> list[dict[str, int]]:
    """With mixture_units = K > 0: every way to fill a budget of K units from the domains (a fixed-budget
    question: which composition?). With 0: every non-empty subset of domains, each with all its units."""
    if mixture_units <= 0:
        return [
            {d: units_per_domain for d in subset}
            for size in range(1, len(domains) + 1)
            for subset in itertools.combinations(domains, size)
        ]
    counts = itertools.product(range(units_per_domain + 1), repeat=len(domains))
    return [
        {d: n for d, n in zip(domains, c, strict=True) if n}
        for c in sorted(counts, key=lambda c: (-max(c), c))
        if sum(c) == mixture_units
    ]


def name_of(mixture: dict[str, int]) -> str:
    return "+".join(f"{d}:{n}" for d, n in sorted(mixture.items()))


def expert_load(model, tokens: np.ndarray, seq_len: int):
    """Mean router probability per layer and expert on a fixed held-out batch (MLP and attention)."""
    import torch

    n = min(8, (len(tokens) - 1) // seq_len)
    x = torch.from_numpy(np.asarray(tokens[: n * seq_len], dtype=np.int64)).view(n, seq_len)
    with torch.no_grad():
        out = model(x)
    parts = [r.expert_load.flatten() for r in (out.mlp, out.attention) if r is not None]
    return torch.cat(parts).numpy() if parts else np.zeros(0)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", required=True, help="directory of domains (tools/prepare_corpus.py)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--domains", nargs="*", default=None, help="domains to use (default: all)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--unit-tokens", type=int, default=65536)
    parser.add_argument("--units-per-domain", type=int, default=2)
    parser.add_argument(
        "--seed-tokens", type=int, default=262144, help="per domain, for the shared seed model"
    )
    parser.add_argument("--seed-epochs", type=int, default=2)
    parser.add_argument("--val-tokens", type=int, default=16384, help="held out per domain")
    parser.add_argument(
        "--mixture-units",
        type=int,
        default=3,
        help="units per mixture (a fixed budget); 0: every subset of domains",
    )
    parser.add_argument(
        "--max-mixtures", type=int, default=0, help="evaluate only the first N mixtures (0: all)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="train units as this many parallel processes")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the model and recipe")
    args = parser.parse_args()

    started = time.monotonic()
    work = Path(args.workdir)
    pool = build_unit_pool(
        Path(args.corpus),
        work / "pool",
        vocab_size=args.vocab_size,
        val_tokens=args.val_tokens,
        seed_tokens=args.seed_tokens,
        unit_tokens=args.unit_tokens,
        units_per_domain=args.units_per_domain,
        domains=args.domains,
    )
    base = config_lib.load(args.config, args.overrides)
    seq_len = base.data.seq_len
    print(
        f"pool: {len(pool.domains)} domains, {len(pool.units)} units of {pool.unit_tokens} tokens", flush=True
    )

    # The seed: several passes over every domain's seed tokens, from scratch.
    seed_tokens = int(np.memmap(pool.seed, dtype=np.uint16, mode="r").shape[0])
    seed_over = train_overrides(pool, work / "seed", pool.seed, seed_tokens * args.seed_epochs, base, None)
    seed_export = train(args.config, args.overrides + seed_over, in_process=True)
    print(f"seed trained ({time.monotonic() - started:.0f} s)", flush=True)

    def unit_job(unit: str) -> Path:
        over = train_overrides(
            pool,
            work / "units" / unit.replace("/", "_"),
            pool.units[unit],
            pool.unit_tokens,
            base,
            seed_export,
        )
        return train(args.config, args.overrides + over, in_process=args.jobs == 1)

    if args.jobs == 1:  # in this process (signal handlers need the main thread)
        unit_exports = {u: unit_job(u) for u in pool.units}
    else:  # one `launchers/train.py` process per unit, args.jobs at a time
        with ThreadPoolExecutor(max_workers=args.jobs) as executor:
            unit_exports = dict(zip(pool.units, executor.map(unit_job, pool.units), strict=True))
    unit_steps = max(1, pool.unit_tokens // (base.train.global_batch_size * seq_len))
    print(f"{len(unit_exports)} units trained ({time.monotonic() - started:.0f} s)", flush=True)

    mixtures = candidate_mixtures(pool.domains, args.units_per_domain, args.mixture_units)
    if args.max_mixtures:
        mixtures = mixtures[: args.max_mixtures]
    vals = {d: np.memmap(pool.val(d), dtype=np.uint16, mode="r") for d in pool.domains}
    unit_models = {u: load_export(e)[0] for u, e in unit_exports.items()}
    model_cfg = next(iter(unit_models.values())).cfg  # every module has the seed's shape
    unit_loads = {u: expert_load(m, vals[pool.domains[0]], seq_len) for u, m in unit_models.items()}
    rows, mixture_steps = [], 0
    for mixture in mixtures:
        units = mixture_units(pool, mixture)
        merged_model = build(model_cfg)
        merged_model.load_state_dict(merge([unit_models[u].state_dict() for u in units], [1.0] * len(units)))
        loads = np.stack([unit_loads[u] for u in units])
        drift = float(np.abs(loads - loads.mean(0)).max()) if loads.size else 0.0
        # The real mixture model: the same tokens (the units concatenated), the same recipe.
        mix_dir = work / "mixtures" / name_of(mixture)
        mix_dir.mkdir(parents=True, exist_ok=True)
        tokens_file = mix_dir / "tokens.bin"
        np.concatenate([np.memmap(pool.units[u], dtype=np.uint16, mode="r") for u in units]).tofile(
            tokens_file
        )
        n_tokens = len(units) * pool.unit_tokens
        mixture_steps += max(1, n_tokens // (base.train.global_batch_size * seq_len))
        over = train_overrides(pool, mix_dir / "run", tokens_file, n_tokens, base, seed_export)
        trained_model = load_export(train(args.config, args.overrides + over, in_process=True))[0]
        for domain in pool.domains:
            merged_ppl = perplexity(merged_model, vals[domain], seq_len, Routing()).perplexity
            trained_ppl = perplexity(trained_model, vals[domain], seq_len, Routing()).perplexity
            rows.append(
                {
                    "mixture": name_of(mixture),
                    "domain": domain,
                    "merged_ppl": merged_ppl,
                    "trained_ppl": trained_ppl,
                    "load_drift": drift,
                }
            )
        print(f"mixture {name_of(mixture)} done ({time.monotonic() - started:.0f} s)", flush=True)

    report(
        work,
        rows,
        pool,
        len(unit_exports) * unit_steps,
        mixture_steps,
        time.monotonic() - started,
        sys.argv[1:],
    )
    return 0


def report(
    work: Path, rows: list[dict], pool, unit_steps: int, mixture_steps: int, seconds: float, argv: list[str]
) -> None:
    import datetime

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(work / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    merged = np.log([r["merged_ppl"] for r in rows])
    trained = np.log([r["trained_ppl"] for r in rows])
    lines = []
    per_domain, agree = [], 0
    for domain in pool.domains:
        sub = [r for r in rows if r["domain"] == domain]
        m, t = [r["merged_ppl"] for r in sub], [r["trained_ppl"] for r in sub]
        best_m, best_t = sub[int(np.argmin(m))]["mixture"], sub[int(np.argmin(t))]["mixture"]
        agree += best_m == best_t
        per_domain.append(
            f"| {domain} | {pearson(np.log(m), np.log(t)):.3f} | {spearman(m, t):.3f} | {best_m} | {best_t} |"
        )
    commit = git_commit()
    lines += [
        "# Data-mixture ablation: merged unit models vs models trained on the mixture",
        "",
        f"- date: {datetime.date.today()}, commit {commit}, device: CPU; wall time {seconds / 60:.1f} min",
        f"- command: `python tools/ablate_data.py {' '.join(argv)}`",
        f"- pool: {len(pool.domains)} domains x {len(pool.units) // len(pool.domains)} units of {pool.unit_tokens} tokens; "
        f"{len(rows) // len(pool.domains)} mixtures; perplexity on each domain's held-out text",
        "",
        f"**Pooled over domains: Pearson r (log ppl) {pearson(merged, trained):.3f}, Spearman rho {spearman(merged, trained):.3f}; "
        f"best mixture agrees on {agree} of {len(pool.domains)} domains.**",
        "",
        "| domain | Pearson r (log ppl) | Spearman rho | best by merged proxy | best by trained model |",
        "|---|---|---|---|---|",
        *per_domain,
        "",
        f"Cost: {len(pool.units)} unit runs, {unit_steps} optimizer steps in all, serve every mixture; training each "
        f"mixture instead took {mixture_steps} steps ({mixture_steps / max(1, unit_steps):.1f}x), and grows with every new mixture.",
        "",
        "Max expert-load drift between the merged modules (mean router probability, any layer/expert): "
        f"{max(r['load_drift'] for r in rows):.3f}.",
        "",
        "| mixture | domain | merged ppl | trained ppl |",
        "|---|---|---|---|",
        *(
            f"| {r['mixture']} | {r['domain']} | {r['merged_ppl']:.2f} | {r['trained_ppl']:.2f} |"
            for r in rows
        ),
        "",
    ]
    (work / "results.md").write_text("\n".join(lines))
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for i, domain in enumerate(pool.domains):
        sub = [r for r in rows if r["domain"] == domain]
        ax.scatter(
            [r["merged_ppl"] for r in sub], [r["trained_ppl"] for r in sub], label=domain, color=f"C{i}", s=18
        )
    ax.set(xscale="log", yscale="log", xlabel="merged-proxy perplexity", ylabel="mixture-trained perplexity")
    ax.set_title("held-out perplexity per (mixture, domain)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(work / "scatter.png", dpi=110)
    print("\n".join(lines[:16]))


if __name__ == "__main__":
    sys.exit(main())
