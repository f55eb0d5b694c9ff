"""Run logging on rank 0: metrics.jsonl (the record tests and plots read), wandb, and the progress bar."""

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

    def __init__(self, run_dir: Path, cfg: Config, start_step: int):
        t = cfg.train
        self.path = run_dir / METRICS
        self.log_every = t.log_every
        # A resumed run redoes the steps after its checkpoint: drop their old lines.
        kept = [m for m in read_metrics(run_dir) if m["step"] <= start_step]
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
        self.bar = tqdm(
            total=None if t.budget.rst_hours else t.max_steps,  # a budget ends where the next step won't fit
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not t.progress,
        )

    def log(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, int | float)}
            for prefix in ("", "attention_"):
                for layer, entropy in enumerate(record.get(f"{prefix}router_entropy", [])):
                    scalars[f"{prefix}router_entropy/layer{layer}"] = entropy
                # Per-layer, per-expert loads are many series: every log_every steps.
                for layer, load in enumerate(record.get(f"{prefix}expert_load", [])):
                    if record["step"] % self.log_every == 0:
                        scalars.update(
                            {f"{prefix}expert_load/layer{layer}/expert{e}": v for e, v in enumerate(load)}
                        )
            self.wandb_run.log(scalars, step=record["step"])
        self.bar.update(1)
        extra = {"rst_s": f"{record['rst_s']:.1f}"} if "rst_s" in record else {}
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", **extra)

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
