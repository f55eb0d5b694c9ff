"""The GPU inference benchmarks run end to end on CPU (--cpu-smoke: tiny shapes, timings meaningless). A script
that breaks is otherwise found on the lent GPU, where a session has 30 minutes and a crash costs a call."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict | None = None) -> None:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_inference_benchmarks_run_on_cpu(tmp_path):
    infer = tmp_path / "infer"
    run(
        "benchmarks/bench_infer.py", "--cpu-smoke", "--quick", "--skip-hf", "--config", "configs/tiny.yaml",
        "--out-dir", str(infer), "--gemv-tiles", '{"up_f": 8}',
    )  # fmt: skip
    report = (infer / "infer_cpu.md").read_text()
    assert "## Whole model" in report and "## Issue #23's targets" in report
    assert "interleaved timing rounds" in report  # decode ratios come with their per-round spread
    assert "### decode b2 dense" in report and "### decode b2 top-4" in report  # the wide-batch profiles
    result = json.loads((infer / "infer_cpu.json").read_text())
    assert result["gemv_tiles"]["up_f"] == 8  # the tiles the run used are recorded
    step_bytes = result["decode_b1_bytes"]
    assert set(step_bytes) == {row["rule"] for row in result["decode_b1"]}
    assert step_bytes["dense"] > step_bytes["top-4"] > step_bytes["top-1"] > 0  # experts read by their share
    peer = tmp_path / "peer"
    run("benchmarks/bench_peer.py", "--cpu-smoke", "--out-dir", str(peer))
    assert "same tokens" in (peer / "peer_cpu.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gather_gemv_sweep_runs_under_the_triton_interpreter(tmp_path):
    best = tmp_path / "best.json"
    run(
        "benchmarks/sweep_gemv.py",
        "--cpu-smoke",
        "--json",
        str(best),
        env=dict(os.environ, TRITON_INTERPRET="1"),
    )
    tiles = json.loads(best.read_text())["top-4, batch 1"]["tiles"]  # what tools/device.sh gemv reads
    assert set(tiles) <= {"up_f", "up_d", "up_warps", "down_f", "down_d", "down_warps"}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_decode_attention_benchmark_runs_under_the_triton_interpreter(tmp_path):
    run(
        "benchmarks/bench_decode_attention.py", "--cpu-smoke", "--out-dir", str(tmp_path),
        env=dict(os.environ, TRITON_INTERPRET="1"),
    )  # fmt: skip
    result = json.loads((tmp_path / "decode_attention_cpu.json").read_text())
    assert {row["length"] for row in result["alone"]} == {16, 64, 128}
    assert result["whole"][0]["kernel_tokens_per_s"] > 0
