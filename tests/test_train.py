"""Training in-process on one rank: resume continues the same curve, export holds the trained weights."""

from __future__ import annotations

import json

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param

from dsmoe.config import ConfigError
from dsmoe.export import load_export
from dsmoe.infer import held_out_tokens, perplexity
from dsmoe.model import Routing, RoutingRule
from dsmoe.run import run
from dsmoe.train.logging import read_metrics

pytestmark = pytest.mark.usefixtures("single_process_group")


@pytest.mark.parametrize(
    "zero",
    [
        ["parallel.zero_stage=0"],
        ["parallel.zero_stage=3"],
        ["parallel.zero_stage=2", "train.precision=bf16", "parallel.zero_fp32_grad_accumulation=true"],
    ],
    ids=["zero0", "zero3", "zero2-bf16-fp32-accumulation"],
)
def test_resume_continues_the_same_loss_curve(small_cfg, tmp_path, zero):
    common = ["train.export_at_end=false", *zero]
    full = run(small_cfg(*common, run_dir=tmp_path / "full"))
    assert len(full.losses) == 8

    first = run(small_cfg(*common, "train.exit_at_step=3", run_dir=tmp_path / "cut"))
    assert first.steps == 3 and (tmp_path / "cut/checkpoints/step_00000003").is_dir()
    resumed = run(small_cfg(*common, run_dir=tmp_path / "cut"))
    assert resumed.steps == 8 and len(resumed.losses) == 5
    torch.testing.assert_close(resumed.losses, full.losses[3:], rtol=0, atol=0)
    logged = read_metrics(tmp_path / "cut")
    assert [m["step"] for m in logged] == list(range(1, 9))
    torch.testing.assert_close([m["loss"] for m in logged], full.losses, rtol=0, atol=0)
    assert all(m["grad_norm"] > 0 for m in logged)


def test_resume_refuses_a_different_model(small_cfg, tmp_path):
    run(small_cfg("train.export_at_end=false", "train.exit_at_step=2", run_dir=tmp_path / "r"))
    with pytest.raises(ConfigError, match="model.n_layers"):
        run(small_cfg("train.export_at_end=false", "model.n_layers=3", run_dir=tmp_path / "r"))


@pytest.mark.parametrize(
    "layout", [("0", "fp32"), ("0", "bf16"), ("1", "fp32"), ("2", "bf16"), ("3", "bf16")]
)
def test_export_holds_exactly_the_trained_weights(small_cfg, tmp_path, layout):
    stage, precision = layout
    cfg = small_cfg(f"parallel.zero_stage={stage}", f"train.precision={precision}", "train.max_steps=4")
    result = run(cfg)
    export_dir = tmp_path / "run" / "export"
    assert {p.name for p in export_dir.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    model, loaded_cfg, routing, _ = load_export(export_dir)
    assert routing == Routing(mlp=RoutingRule("threshold", eps=cfg.train.eval_threshold))
    exported = dict(model.named_parameters())
    finer_than_bf16 = False
    for name, param in result.engine.module.named_parameters():
        if stage != "0":  # ZeRO: DeepSpeed's own accessor of the fp32 master copy
            assert torch.equal(exported[name], safe_get_full_fp32_param(param).cpu()), name
        elif precision == "fp32":
            assert torch.equal(exported[name], param.detach().cpu()), name
        else:  # bf16 stage 0: the module holds the master copy rounded to bf16
            assert torch.equal(exported[name].bfloat16(), param.detach().cpu()), name
        finer_than_bf16 |= not torch.equal(exported[name], exported[name].bfloat16().float())
    assert finer_than_bf16 or precision == "fp32", "a bf16 run must export its fp32 master weights"

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["routing"] for r in summary["results"]] == [
        "dense",
        "mlp top-2",
        "mlp threshold N*p>0.48",
        "mlp threshold N*p>0.48, attention threshold N*p>0.48",
    ]
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0

    # The exported model with every expert kept reproduces dense perplexity.
    tokens = held_out_tokens(loaded_cfg, export_dir / "tokenizer.json")
    every = Routing(RoutingRule("top_k", k=4), RoutingRule("top_k", k=2))
    dense = perplexity(model, tokens, 32, Routing(), max_tokens=1024)
    all_k = perplexity(model, tokens, 32, every, max_tokens=1024)
    top1 = perplexity(
        model, tokens, 32, Routing(RoutingRule("top_k", k=1), RoutingRule("top_k", k=1)), max_tokens=1024
    )
    assert abs(dense.perplexity - all_k.perplexity) / dense.perplexity < 1e-5
    assert top1.expert_active_fraction == 0.25 and dense.expert_active_fraction == 1.0
    assert top1.attention_active_fraction == 0.5 and all_k.attention_active_fraction == 1.0
    # Skipped: 3/4 of the MLP experts and 1/2 of the MoA query/output projections.
    total = model.num_params(exclude_embedding=True)
    skipped = 0.75 * model.num_expert_params() + 0.5 * model.num_attention_expert_params()
    assert abs(top1.param_active_fraction - (total - skipped) / total) < 1e-9


def test_convert_eval_and_generate_commands(small_cfg, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    run(small_cfg("train.max_steps=3", "train.export_at_end=false"))

    def tool(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "dsmoe", *args], cwd=repo, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = tool("convert", str(tmp_path / "run"), str(tmp_path / "top1"), "--top-k", "1")
    assert "routing: mlp top-1" in out
    assert load_export(tmp_path / "top1")[2] == Routing(mlp=RoutingRule("top_k", k=1))
    sparse = tool("eval", str(tmp_path / "top1"), "--max-tokens", "512")
    dense = tool("eval", str(tmp_path / "run"), "--max-tokens", "512")
    all_experts = tool("eval", str(tmp_path / "top1"), "--top-k", "4", "--max-tokens", "512")
    assert "top-1" in sparse and "MLP experts  25.0%" in sparse
    assert (
        dense.splitlines()[-1].split("ppl")[1].split()[0]
        == all_experts.splitlines()[-1].split("ppl")[1].split()[0]
    )
    text = tool(
        "generate",
        str(tmp_path / "top1"),
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "5",
        "--samples",
        "2",
    )
    assert text.count("--- sample") == 2 and "ROMEO:" in text
    missing = subprocess.run(
        [sys.executable, "-m", "dsmoe", "eval", str(tmp_path / "nothing")],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "no complete checkpoint" in missing.stderr


@pytest.mark.slow
def test_compiled_blocks_follow_the_eager_loss_curve(small_cfg, tmp_path):
    eager = run(small_cfg("train.export_at_end=false", "train.max_steps=3", run_dir=tmp_path / "eager"))
    compiled = run(
        small_cfg(
            "train.export_at_end=false", "train.max_steps=3", "train.compile=true", run_dir=tmp_path / "c"
        )
    )
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-5, atol=1e-5)


def test_sparse_trained_baseline_trains_and_exports(small_cfg, tmp_path):
    """model.moe.training=sparse (SMoE): top-2 of 4 experts per token, balance loss, the same loop,
    checkpoints and export; half the expert work per token."""
    cfg = small_cfg("model.moe.training=sparse", "model.moe.alpha=0", "train.max_steps=8")
    result = run(cfg)
    assert result.losses[-1] < result.losses[0]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["lm_loss"] < m["loss"] for m in metrics), "the balance loss is part of the loss"
    model, loaded_cfg, _, _ = load_export(tmp_path / "run" / "export")
    assert loaded_cfg.model.moe.training == "sparse" and model.blocks[0].mlp.train_top_k == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    mlp_top2 = next(r for r in summary["results"] if r["routing"] == "mlp top-2")
    assert mlp_top2["expert_active_fraction"] == pytest.approx(0.5)
