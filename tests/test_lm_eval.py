"""lm-evaluation-harness (its CLI, as users run it) on exports, with the offline tasks in dsmoe/eval_tasks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from dsmoe.eval_tasks import TASKS_DIR
from dsmoe.export import export
from dsmoe.model import Routing, RoutingRule

pytestmark = pytest.mark.usefixtures("single_process_group")


def lm_eval(export_dir, out_dir, tmp_path) -> dict:
    cmd = [
        sys.executable, "-m", "lm_eval",
        "--model", "hf",
        "--model_args", f"pretrained={export_dir},trust_remote_code=True",
        "--include_path", str(TASKS_DIR),
        "--tasks", "dsmoe_heldout_ppl,dsmoe_next_line",
        "--device", "cpu", "--batch_size", "8", "--limit", "12",
        "--output_path", str(out_dir),
    ]  # fmt: skip
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}  # a user's shell, not this test's group
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "mods"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "dsmoe_next_line" in proc.stdout  # the printed table
    (results,) = out_dir.rglob("results_*.json")
    return json.loads(results.read_text())["results"]


def test_lm_eval_runs_the_shipped_tasks_on_exports_under_two_rules(tmp_path, cache_dir):
    from dsmoe import config as config_lib
    from dsmoe.run import run
    from tests.conftest import small_overrides

    run(
        config_lib.load(
            None,
            small_overrides(tmp_path / "run", cache_dir) + ["train.max_steps=4", "train.export_at_end=false"],
        )
    )
    dense = lm_eval(export(tmp_path / "run", tmp_path / "dense", Routing()), tmp_path / "out_dense", tmp_path)
    top1 = lm_eval(
        export(tmp_path / "run", tmp_path / "top1", Routing(mlp=RoutingRule("top_k", k=1))),
        tmp_path / "out_top1",
        tmp_path,
    )
    for results in (dense, top1):
        assert math.isfinite(results["dsmoe_heldout_ppl"]["bits_per_byte,none"])
        assert 0 <= results["dsmoe_next_line"]["acc,none"] <= 1
    # one expert of four instead of all: another model, other figures
    assert dense["dsmoe_heldout_ppl"]["bits_per_byte,none"] != top1["dsmoe_heldout_ppl"]["bits_per_byte,none"]
