"""Train-or-reuse for the research tools: a run whose export exists with the same recipe is not trained again.

It trains (dsmoe.train) and exports (dsmoe.export), so it sits above both, beside the other helpers of
tools/ (dsmoe/ablation.py, dsmoe/replicate.py); nothing in dsmoe imports it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dsmoe import config as config_lib
from dsmoe.export import export, is_export
from dsmoe.model import Routing
from dsmoe.run import run

REPO = Path(__file__).resolve().parent.parent


def recipe(config_path: str | None, overrides: list[str]) -> str:
    """The resolved config of a run, as the text its cache is keyed on."""
    return config_lib.identity(config_lib.load(config_path, overrides))


def train_and_export(config_path: str | None, overrides: list[str], in_process: bool = True) -> Path:
    """Train the run `overrides` describe (resuming it if it stopped) and export it with dense routing;
    returns the export directory. Cached: the same resolved config over the same data files is not trained
    again, so tools that train many runs pick up where a previous invocation stopped."""
    cfg = config_lib.load(config_path, overrides)
    run_dir = Path(cfg.train.run_dir)
    out = run_dir / "export"
    resolved = config_lib.identity(cfg)
    if (
        is_export(out)
        and (run_dir / "recipe.json").is_file()
        and (run_dir / "recipe.json").read_text() == resolved
    ):
        return out
    if in_process:
        result = run(cfg)
        if result.steps < cfg.train.max_steps:
            raise RuntimeError(f"training {run_dir} stopped at step {result.steps} of {cfg.train.max_steps}")
    else:
        cmd = [
            sys.executable,
            "launchers/train.py",
            *(["--config", config_path] if config_path else []),
            *overrides,
        ]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"training {run_dir} failed:\n{proc.stderr[-3000:]}")
    export(run_dir, out, Routing())
    (run_dir / "recipe.json").write_text(resolved)
    return out
