"""MSG growth against training the final shape from scratch: wall time to the same loss (papers/msg.md).

    python tools/research/bench_growth.py --config configs/growth_100m.yaml [--out benchmarks/growth] [key=value ...]

Trains, on the same tokens, schedule and seed, (1) the config's model with its growth schedule and (2)
the shape that schedule ends at (growth.final_model_config) from scratch, for the same number of steps
and tokens. A short discarded warm-up run pays the process's one-time GPU start costs first, so neither
measured run carries them. Each step's wall time is the loop's own (forward, backward, optimizer step,
and for the grown run the engine rebuild of each growth event); checkpoints and evaluation are outside it.

Reports: the fixed run's final training loss (mean of a trailing window), the wall time the grown run
needs to first reach it (same window) and the ratio to the fixed run's total, both final losses, both
held-out perplexities (all experts), and a PNG of loss against wall time and against tokens. Writes
<out>/<config>.md, .json and .png with device, date, commit and command.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # tools/_cli.py
from _cli import git_commit  # noqa: E402

from dsmoe import config as config_lib  # noqa: E402
from dsmoe import growth  # noqa: E402
from dsmoe.train.logging import read_metrics  # noqa: E402


def curve(run_dir: Path, tokens_per_step: int, window: int) -> dict:
    """Per step: cumulative wall seconds, tokens and the trailing-window mean training loss."""
    records = {r["step"]: r for r in read_metrics(run_dir)}
    steps = [records[s] for s in sorted(records)]
    seconds = np.cumsum([tokens_per_step / r["tokens_per_s"] for r in steps])
    loss = np.array([r["lm_loss"] for r in steps])
    smooth = np.array([loss[max(0, i - window + 1) : i + 1].mean() for i in range(len(loss))])
    return {
        "step": [r["step"] for r in steps],
        "seconds": seconds.tolist(),
        "tokens": [r["step"] * tokens_per_step for r in steps],
        "loss": loss.tolist(),
        "smooth": smooth.tolist(),
    }


def time_to_reach(c: dict, target: float) -> tuple[float | None, int | None]:
    """Wall seconds and step at which a curve's smoothed loss first reaches `target` (None if never)."""
    for s, step, value in zip(c["seconds"], c["step"], c["smooth"], strict=True):
        if value <= target:
            return s, step
    return None, None


def held_out(result) -> float | None:
    summary = result.summary or {}
    rows = summary.get("results") or []
    return rows[0]["perplexity"] if rows else None


def plot(fixed: dict, grown: dict, events, tokens_per_step: int, target: float, title: str, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x in zip(axes, ("seconds", "tokens"), strict=True):
        scale = 1e6 if x == "tokens" else 1.0
        for c, label, color in ((fixed, "from scratch (final shape)", "C0"), (grown, "MSG growth", "C1")):
            xs = np.array(c[x]) / scale
            ax.plot(xs, c["loss"], color=color, alpha=0.25, linewidth=0.8)
            ax.plot(xs, c["smooth"], color=color, label=label)
        ax.axhline(target, color="gray", linestyle=":", linewidth=1, label="from-scratch final loss")
        if x == "tokens":
            for e in events:
                ax.axvline(e.step * tokens_per_step / scale, color="C1", linestyle="--", linewidth=0.6)
        ax.set_xlabel(
            "wall seconds (training steps)" if x == "seconds" else "tokens (M); dashed: growth events"
        )
        ax.set_ylabel("training loss")
        lo = min(min(fixed["smooth"]), min(grown["smooth"]))
        ax.set_ylim(lo - 0.1, lo + 2.5)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny_growth.yaml", help="a config with growth.events")
    parser.add_argument("--workdir", default="runs/bench_growth")
    parser.add_argument("--out", default="benchmarks/growth")
    parser.add_argument("--warmup-steps", type=int, default=5, help="discarded run first (0: none)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the .md/.png from <out>/<config>.json; train nothing",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for both runs")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    common = [*args.overrides, "train.wandb=false", "train.progress=false", "train.export_at_end=true"]
    grown_cfg = config_lib.load(args.config, [*common, f"train.run_dir={workdir / 'grown'}"])
    if not grown_cfg.growth.events:
        raise SystemExit(f"error: {args.config} has no growth.events: nothing to compare")
    t = grown_cfg.train
    # Checkpoint only at the end (the report evaluates the final checkpoint); saves are outside step time.
    grown_cfg.train.checkpoint_every = t.max_steps
    fixed_cfg = copy.deepcopy(grown_cfg)
    fixed_cfg.model = growth.final_model_config(grown_cfg)
    fixed_cfg.growth = config_lib.GrowthConfig()
    fixed_cfg.train.run_dir = str(workdir / "fixed")
    tokens_per_step = t.global_batch_size * grown_cfg.data.seq_len
    if args.report_only:
        saved = json.loads((Path(args.out) / f"{Path(args.config).stem}.json").read_text())
        write_report(saved, grown_cfg, fixed_cfg, Path(args.out))
        return 0

    from dsmoe.run import run

    if args.warmup_steps:
        warm = copy.deepcopy(fixed_cfg)
        warm.train.run_dir = str(workdir / "warmup")
        warm.train.max_steps = args.warmup_steps
        warm.train.warmup_steps = 1
        warm.train.checkpoint_every = 0
        warm.train.export_at_end = False
        shutil.rmtree(warm.train.run_dir, ignore_errors=True)
        run(warm)
    results = {}
    for name, cfg in (("fixed", fixed_cfg), ("grown", grown_cfg)):
        shutil.rmtree(cfg.train.run_dir, ignore_errors=True)
        print(
            f"== {name}: {cfg.model.d_model=} {cfg.model.n_layers=} {cfg.model.moe.num_experts=}", flush=True
        )
        results[name] = run(cfg)

    window = max(1, t.max_steps // 20)
    fixed = curve(Path(fixed_cfg.train.run_dir), tokens_per_step, window)
    grown = curve(Path(grown_cfg.train.run_dir), tokens_per_step, window)
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    summary = {
        "config": args.config,
        "device": device,
        "date": str(datetime.date.today()),
        "commit": git_commit(),
        "command": " ".join(["python", "tools/research/bench_growth.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "precision": t.precision,
        "steps": t.max_steps,
        "tokens_per_step": tokens_per_step,
        "window_steps": window,
        "fixed": {"held_out_ppl": held_out(results["fixed"])},
        "grown": {"held_out_ppl": held_out(results["grown"])},
        "curves": {"fixed": fixed, "grown": grown},
    }
    write_report(summary, grown_cfg, fixed_cfg, Path(args.out))
    return 0


def loss_at(c: dict, seconds: float) -> float:
    """A curve's smoothed loss at the last step finished by `seconds` of training."""
    done = [v for s, v in zip(c["seconds"], c["smooth"], strict=True) if s <= seconds]
    return done[-1] if done else float("nan")


def median_step_ms(c: dict, first: int, last: int) -> float:
    """Median wall milliseconds of steps first..last (1-based, inclusive)."""
    seconds = np.diff([0.0, *c["seconds"]])
    picked = [x for step, x in zip(c["step"], seconds, strict=True) if first <= step <= last]
    return 1e3 * float(np.median(picked)) if picked else float("nan")


def write_report(summary: dict, grown_cfg, fixed_cfg, out: Path) -> None:
    """Derived figures, <stem>.json/.md/.png from the measured curves (also from a saved JSON: --report-only)."""
    fixed, grown = summary["curves"]["fixed"], summary["curves"]["grown"]
    events = grown_cfg.growth.events
    target = fixed["smooth"][-1]
    reach_s, reach_step = time_to_reach(grown, target)
    fixed_total, grown_total = fixed["seconds"][-1], grown["seconds"][-1]
    last_ramp_end = max(e.step + e.ramp_steps for e in events)
    summary["target_loss"] = target
    summary["fixed"].update(seconds=fixed_total, final_loss=target)
    summary["grown"].update(
        seconds=grown_total, final_loss=grown["smooth"][-1], reach_seconds=reach_s, reach_step=reach_step
    )
    summary["time_ratio"] = reach_s / fixed_total if reach_s is not None else None
    summary["fixed_loss_at_grown_end"] = loss_at(fixed, grown_total)
    summary["step_ms"] = {
        "fixed": median_step_ms(fixed, 11, summary["steps"]),
        "grown_before_first_event": median_step_ms(grown, 11, events[0].step),
        "grown_after_last_ramp": median_step_ms(grown, last_ramp_end + 10, summary["steps"]),
    }
    stem = Path(summary["config"]).stem
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    device = summary["device"]
    tokens_per_step = summary["tokens_per_step"]
    plot(
        fixed,
        grown,
        events,
        tokens_per_step,
        target,
        f"{stem}: MSG growth vs from scratch ({device})",
        out / f"{stem}.png",
    )
    f, g, ms = summary["fixed"], summary["grown"], summary["step_ms"]
    described = ", ".join(f"step {e.step}: {e.dim} -> {e.size} (ramp {e.ramp_steps})" for e in events)
    ratio = f"{summary['time_ratio']:.2f}x" if reach_s is not None else "not reached within the run"
    ppl = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731

    def shape(m) -> str:
        ffn = (
            f"{m.moe.num_experts} experts x {m.moe.expert_hidden}"
            if m.mlp == "moe"
            else f"FFN {m.ffn_hidden}"
        )
        return f"{m.backbone}, d_model {m.d_model}, {m.n_layers} layers, {m.attention.num_heads} heads, {ffn}"

    lines = [
        f"# MSG growth vs from scratch: {stem}",
        "",
        f"- device {device}, date {summary['date']}, commit {summary['commit']}, torch {summary['torch']}, "
        f"precision {summary['precision']}",
        f"- command: `{summary['command']}`",
        f"- both runs: {summary['steps']} steps x {tokens_per_step} tokens = "
        f"{summary['steps'] * tokens_per_step / 1e6:.1f}M tokens, same data order, lr schedule and seed; "
        f"loss = mean training loss of the trailing {summary['window_steps']} steps",
        f"- grown: starts at {shape(grown_cfg.model)}; events: {described}",
        f"- from scratch: {shape(fixed_cfg.model)} (the shape the schedule ends at)",
        "",
        "| run | training wall s | final loss | held-out ppl (all experts) | wall s to the from-scratch final loss |",
        "|---|---|---|---|---|",
        f"| from scratch | {fixed_total:.1f} | {f['final_loss']:.4f} | {ppl(f['held_out_ppl'])} | {fixed_total:.1f} |",
        f"| MSG growth | {grown_total:.1f} | {g['final_loss']:.4f} | {ppl(g['held_out_ppl'])} | "
        + (f"{reach_s:.1f} (step {reach_step})" if reach_s is not None else "not reached")
        + " |",
        "",
        f"- time to the from-scratch final loss, grown / from scratch: **{ratio}** (target <= 0.7x)",
        f"- at equal wall time ({grown_total:.1f} s, the grown run's end) the from-scratch run's loss is "
        f"{summary['fixed_loss_at_grown_end']:.4f} (grown: {g['final_loss']:.4f})",
        f"- median step: from scratch {ms['fixed']:.1f} ms; grown {ms['grown_before_first_event']:.1f} ms "
        f"before its first event, {ms['grown_after_last_ramp']:.1f} ms after its last ramp",
        "",
        f"![curves]({stem}.png)",
        "",
    ]
    (out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
