"""`run(cfg)`: one training run, what launchers/train.py calls on every rank.

The Trainer (dsmoe/train/loop.py) with the features cfg turns on, and the end-of-run export and report
(dsmoe/report.py), which sits above training: model <- parallel <- train <- export/infer <- run and commands.
"""

from __future__ import annotations

from dsmoe.config import Config
from dsmoe.report import EndOfRunReport
from dsmoe.train.loop import RunResult, Trainer, TrainingDiverged, features_for

__all__ = ["run", "RunResult", "TrainingDiverged"]


def run(cfg: Config) -> RunResult:
    """Train as cfg says (resuming its run directory's last complete checkpoint), then export and report."""
    return Trainer(cfg, features_for(cfg) + [EndOfRunReport()]).run()
