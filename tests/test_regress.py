"""tools/regress.py, the guard of the headline GPU figures: it reads every committed figure, flags one that got
worse by more than the tolerance in the direction that matters, and a benchmark that left no result."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import regress  # noqa: E402


@pytest.fixture
def fresh(tmp_path) -> Path:
    """An output directory laid out as `bash tools/device.sh regress` leaves it, holding the committed files."""
    for figure in regress.FIGURES:
        target = tmp_path / figure.fresh
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / figure.committed, target)
    return tmp_path


def test_committed_figures_compare_equal_to_themselves(fresh):
    rows, ok = regress.compare(fresh, 0.05)
    assert ok and len(rows) == len(regress.FIGURES)
    assert all(r["verdict"] == "ok" and r["now_over_committed"] == pytest.approx(1.0) for r in rows)


def test_a_slower_encoder_and_more_memory_are_flagged(fresh):
    path = fresh / "encoder/encoder_h200.json"
    data = json.loads(path.read_text())
    data["rows"][0]["speedup"] *= 0.9  # 10% slower than committed at 256 x 128
    data["rows"][1]["speedup"] *= 0.97  # 3%: within the 5% tolerance
    path.write_text(json.dumps(data))
    path = fresh / "train_1b_h200.json"
    data = json.loads(path.read_text())
    data["results"]["dsmoe_compiled"]["peak_memory_GiB"] *= 1.2  # lower is better here
    data["results"]["dense_compiled"]["tokens_per_s"] *= 0.5  # dense slower: DS-MoE / dense got better
    path.write_text(json.dumps(data))
    rows, ok = regress.compare(fresh, 0.05)
    verdicts = {r["figure"]: r["verdict"] for r in rows}
    assert not ok
    assert verdicts["encoder: ours / BERT at 256 x 128"] == "REGRESSED"
    assert verdicts["encoder: ours / BERT at 64 x 512"] == "ok"
    assert verdicts["train: DS-MoE-1B peak memory GiB"] == "REGRESSED"
    assert verdicts["train: DS-MoE-1B / Dense-1B tokens/s"] == "better"


def test_a_missing_benchmark_fails_the_run(fresh):
    (fresh / "infer_h200.json").unlink()
    out = subprocess.run(
        [sys.executable, str(REPO / "tools/regress.py"), "compare", str(fresh), "--md", str(fresh / "r.md")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert out.stdout.count("NO RESULT") == 6  # the six inference figures
    assert "| train: DS-MoE-1B compiled MFU | 0.488 | 0.488 | 1.000 | ok |" in (fresh / "r.md").read_text()


def test_a_run_on_another_gpu_judges_only_the_figures_that_travel(fresh):
    """Fresh files of a GPU with no committed figures (b200): training/encoder ratios and memory are judged
    against the H200's, MFU, tokens/s and inference ratios are shown but not judged."""
    for figure in regress.FIGURES:
        h200 = fresh / figure.fresh
        if h200.exists():
            h200.rename(fresh / figure.files("b200")[1])
    path = fresh / "train_1b_b200.json"
    data = json.loads(path.read_text())
    data["results"]["dsmoe_compiled"]["mfu"] *= 0.7
    data["results"]["dsmoe_compiled"]["tokens_per_s"] *= 0.7
    data["results"]["dense_compiled"]["tokens_per_s"] *= 0.7
    path.write_text(json.dumps(data))
    assert regress.device_of(fresh) == "b200"
    rows, ok = regress.compare(fresh, 0.05)
    verdicts = {r["figure"]: r["verdict"] for r in rows}
    assert ok
    assert verdicts["train: DS-MoE-1B compiled MFU"].startswith("not judged")
    assert verdicts["infer: prefill top-4 / dense"].startswith("not judged")
    assert verdicts["train: DS-MoE-1B / Dense-1B tokens/s"] == "ok"
    (fresh / "train_1b_b200.json").unlink()
    assert regress.device_of(fresh) == "b200"  # read from the other benchmarks' files
    rows, ok = regress.compare(fresh, 0.05)
    assert not ok  # a missing benchmark still fails on another GPU
