"""Run logging on rank 0: metrics.jsonl (the record tests and plots read), wandb, and the progress bar.

wandb gets what an MoE trainer's user looks at, not one chart per expert: loss and held-out loss against
tokens seen, tokens/s, MFU (every expert counted), peak memory, router entropy per layer, the expert load as
one layers x experts heatmap every train.log_every steps (with each layer's min and max load and its count
of dead experts as scalars), and at each validation the sparsity curve: held-out perplexity against the share
of MLP experts the top-K and threshold rules keep. The images are also written to the run directory.
"""

from __future__ import annotations

import json
import netrc
import os
import uuid
from pathlib import Path

from tqdm import tqdm

from dsmoe import config as config_lib
from dsmoe.config import Config

METRICS = "metrics.jsonl"


def wandb_mode() -> str:
    """'online' when the user is logged in to wandb (or chose a mode), else 'offline'."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break  # the line a killed process was writing; everything after it is redone on resume
    return records


class RunLogger:
    """Writes one JSON line per optimizer step, mirrors scalars to wandb, drives the progress bar."""

    def __init__(
        self, run_dir: Path, cfg: Config, start_step: int, flops_per_token: float = 0.0, world_size: int = 1
    ):
        t = cfg.train
        self.run_dir, self.path = run_dir, run_dir / METRICS
        self.log_every = t.log_every
        self.flops_per_token, self.world_size = flops_per_token, world_size
        self.peak_tflops = t.peak_tflops or device_peak_tflops()
        # A resumed run redoes the steps after its checkpoint: drop their old lines.
        kept = [m for m in read_metrics(run_dir) if m["step"] <= start_step]
        self.tokens_seen = kept[-1].get("tokens_seen", 0.0) if kept else 0.0
        tmp = self.path.with_name(METRICS + ".tmp")  # atomic: a kill here must not lose the earlier steps
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        os.replace(tmp, self.path)
        self.wandb_run = None
        if t.wandb:
            import wandb

            run_id_file = run_dir / "wandb_run_id"
            run_id = run_id_file.read_text().strip() if run_id_file.is_file() else uuid.uuid4().hex[:8]
            run_id_file.write_text(run_id)
            self.wandb_run = wandb.init(
                project=t.wandb_project,
                dir=str(run_dir),
                config=config_lib.to_dict(cfg),
                id=run_id,
                resume="allow",
                mode=wandb_mode(),
                name=run_dir.name,
            )
            # curves against tokens seen (the x axis that compares runs of other batch sizes and lengths)
            self.wandb_run.define_metric("tokens_seen")
            for pattern in ("loss", "lm_loss", "val_*"):
                self.wandb_run.define_metric(pattern, step_metric="tokens_seen")
        self.bar = tqdm(
            total=None if t.budget.rst_hours else t.max_steps,  # a budget ends where the next step won't fit
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not t.progress,
        )

    def log(self, record: dict) -> None:
        """Complete the step's record (tokens seen, TFLOP/s, MFU), write it, send it to wandb, move the bar."""
        self.tokens_seen += record["tokens_per_s"] * record.get("step_s", 0.0)
        record["tokens_seen"] = self.tokens_seen
        if self.flops_per_token:  # per device: the run's tokens/s shared over the world
            record["model_tflops"] = record["tokens_per_s"] * self.flops_per_token / self.world_size / 1e12
            if self.peak_tflops:
                record["mfu"] = record["model_tflops"] / self.peak_tflops
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(self._wandb_figures(record), step=record["step"])
        self.bar.update(1)
        extra = {"rst_s": f"{record['rst_s']:.1f}"} if "rst_s" in record else {}
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", **extra)

    def _wandb_figures(self, record: dict) -> dict:
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float)}
        for prefix, kind in (("", "MLP"), ("attention_", "attention")):
            for layer, entropy in enumerate(record.get(f"{prefix}router_entropy", [])):
                scalars[f"{prefix}router_entropy/layer{layer}"] = entropy
            load = record.get(f"{prefix}expert_load")
            if load and record["step"] % self.log_every == 0:
                import wandb

                for layer, row in enumerate(load):
                    scalars[f"{prefix}expert_load_min/layer{layer}"] = min(row)
                    scalars[f"{prefix}expert_load_max/layer{layer}"] = max(row)
                    scalars[f"{prefix}dead_experts/layer{layer}"] = dead_experts(row)
                path = plot_expert_load(load, kind, record["step"], self.run_dir / f"{prefix}expert_load.png")
                scalars[f"{prefix}expert_load"] = wandb.Image(str(path))
        if record.get("val_sparsity"):
            scalars["val_sparsity_curve"] = self._sparsity_chart(record["val_sparsity"], record["step"])
        return scalars

    def _sparsity_chart(self, points: list[dict], step: int):
        import wandb

        plot_sparsity(points, step, self.run_dir / "sparsity_curve.png")
        families = sorted({p["family"] for p in points})
        xs = [[p["active"] for p in points if p["family"] == f] for f in families]
        ys = [[p["ppl"] for p in points if p["family"] == f] for f in families]
        return wandb.plot.line_series(
            xs=xs,
            ys=ys,
            keys=families,
            title=f"held-out perplexity against MLP experts kept (step {step})",
            xname="share of MLP experts run",
        )

    def write(self, line: str) -> None:
        """A line on the console that leaves the progress bar in place."""
        self.bar.write(line)

    def log_summary(self, summary: dict) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(summary)

    def close(self) -> None:
        self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 datasheet peaks


def device_peak_tflops() -> float:
    """The dense bf16 peak of this process's GPU where we know it (else 0: MFU is not logged)."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)


def dead_experts(load: list[float], share: float = 0.1) -> int:
    """Experts whose load is under `share` of an even split (1/N): the router has all but dropped them."""
    return sum(1 for x in load if x < share / len(load))


def plot_expert_load(load: list[list[float]], kind: str, step: int, path: Path) -> Path:
    """One layers x experts heatmap of the mean router probability, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(load[0]) + 2), max(2.5, 0.25 * len(load) + 1.5)))
    image = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0)
    ax.set(xlabel="expert", ylabel="layer", title=f"{kind} expert load, step {step}")
    fig.colorbar(image, ax=ax, label="mean router probability")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_sparsity(points: list[dict], step: int, path: Path) -> Path:
    """Held-out perplexity against the share of MLP experts each rule runs (one line per rule family)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for family in sorted({p["family"] for p in points}):
        mine = sorted((p for p in points if p["family"] == family), key=lambda p: p["active"])
        ax.plot([p["active"] for p in mine], [p["ppl"] for p in mine], "o-", label=family)
        for p in mine:
            ax.annotate(p["label"], (p["active"], p["ppl"]), fontsize=6)
    ax.set(xlabel="share of MLP experts run", ylabel="held-out perplexity", title=f"sparsity, step {step}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
