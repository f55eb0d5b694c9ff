"""tools/research/replicate_dsmoe.py: matched model sizes, the operating point rule, and the whole tool on CPU."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsmoe import config as config_lib
from dsmoe import replicate as rep
from dsmoe.model import build

REPO = Path(__file__).resolve().parent.parent


def _model(variant: str, scale: str = "25m"):
    cfg = config_lib.load(None, rep.overrides(rep.SCALES[scale], variant) + ["model.vocab_size=8192"])
    return cfg, build(cfg.model)


def test_variants_match_total_parameters():
    """Dense, SMoE and DS-MoE hold the same weights up to the routers; SMoE-2x doubles the experts."""
    sizes = {v: _model(v)[1].num_params() for v in ("dense", "smoe", "smoe_2x", "dsmoe")}
    cfg, dsmoe = _model("dsmoe")
    m = cfg.model
    routers = m.n_layers * m.d_model * (m.moe.num_experts + m.attention.experts)
    assert sizes["dsmoe"] - sizes["dense"] == routers
    assert sizes["smoe"] - sizes["dense"] == m.n_layers * m.d_model * m.moe.num_experts
    assert (
        sizes["smoe_2x"] - sizes["smoe"]
        == dsmoe.num_expert_params() + m.n_layers * m.d_model * m.moe.num_experts
    )
    _, alpha0 = _model("dsmoe_alpha0")
    assert alpha0.num_params() == sizes["dsmoe"]
    assert 20e6 < sizes["dense"] < 30e6 and 95e6 < _model("dense", "100m")[1].num_params() < 110e6


def test_variant_recipes():
    cfg_smoe, _ = _model("smoe")
    assert cfg_smoe.model.moe.training == "sparse" and cfg_smoe.model.moe.alpha == 0
    assert cfg_smoe.model.attention.experts == 0 and cfg_smoe.model.moe.train_top_k == 4
    cfg0, _ = _model("dsmoe_alpha0")
    cfg2, _ = _model("dsmoe_alpha2x")
    assert cfg0.model.moe.alpha == 0 and cfg0.model.attention.alpha == 0
    assert cfg2.model.moe.alpha == pytest.approx(2 * rep.PAPER_ALPHA["mlp"])
    with pytest.raises(ValueError, match="unknown variant"):
        rep.overrides(rep.SCALES["tiny"], "moe")


def test_operating_point_is_the_densest_threshold_within_the_target():
    points = [
        {"rule": "top_k=2", "mlp_active": 0.2},
        {"rule": "threshold=0.1", "mlp_active": 0.6},
        {"rule": "threshold=0.3", "mlp_active": 0.44},
        {"rule": "threshold=0.5", "mlp_active": 0.3},
    ]
    assert rep.operating_point(points)["rule"] == "threshold=0.3"
    assert rep.operating_point(points[:2]) is None
    assert rep.top_k_values(4) == [1, 2, 3, 4] and rep.top_k_values(32)[-1] == 32


@pytest.mark.slow
def test_tool_end_to_end(tmp_path):
    """Every variant of the tiny scale trains, evaluates and lands in the report; a second invocation
    rebuilds the same report from the saved evaluations alone, training nothing."""
    rng = random.Random(0)
    words = {
        "plays": "the king queen lord castle sword crown battle".split(),
        "code": "def return import class self value list dict".split(),
    }
    for domain, vocab in words.items():
        (tmp_path / "corpus" / domain).mkdir(parents=True)
        for i in range(12):
            (tmp_path / "corpus" / domain / f"d{i}.txt").write_text(
                " ".join(rng.choice(vocab) for _ in range(400))
            )
    args = [
        sys.executable,
        "tools/research/replicate_dsmoe.py",
        "--corpus",
        str(tmp_path / "corpus"),
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
        "--scales",
        "tiny",
        "--vocab-size",
        "300",
        "--val-tokens",
        "1024",
        "--unit-tokens",
        "1024",
        "--eval-tokens",
        "512",
    ]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert {"results.md", "results.json", "sparsity_tiny.png", "loss_tiny.png"} <= {
        p.name for p in out.iterdir()
    }
    results = json.loads((out / "results.json").read_text())["tiny"]
    assert set(results) == set(rep.VARIANTS)
    n = rep.SCALES["tiny"].num_experts
    for variant in ("dsmoe", "dsmoe_alpha0", "dsmoe_alpha2x"):
        curve = {p["rule"]: p for p in results[variant]["curve"]}
        assert [curve[f"top_k={k}"]["mlp_active"] for k in range(1, n + 1)] == pytest.approx(
            [k / n for k in range(1, n + 1)]
        )
        assert results[variant]["rows"]["default"]["mlp_active"] == 1.0
    assert results["smoe"]["rows"]["default"]["mlp_active"] == pytest.approx(
        rep.SCALES["tiny"].smoe_top_k / n
    )
    assert results["smoe_2x"]["params"]["mlp_experts"] == 2 * results["smoe"]["params"]["mlp_experts"]
    report = (out / "results.md").read_text()
    assert "not trained yet" not in report and "DS-MoE, alpha 0" in report

    first = (out / "results.json").read_text()
    (out / "results.json").unlink()
    shutil.rmtree(tmp_path / "work" / "tiny")  # as on a fresh GPU slice: no runs, only out/evals
    again = subprocess.run(
        [*args, "--report-only"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trained and evaluated" not in again.stdout
    assert (out / "results.json").read_text() == first
