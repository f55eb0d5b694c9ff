"""The encoder trained by the same loop, engine, checkpoints and export as the decoder (issue #7)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

import dsmoe.hf  # noqa: F401  (registers model_type "dsmoe_encoder")
from dsmoe import config as config_lib
from dsmoe.data.mlm import MASK_TOKEN, eval_batches
from dsmoe.export import load_export
from dsmoe.infer import held_out_tokens
from dsmoe.model import Routing, RoutingRule
from dsmoe.run import run
from dsmoe.train.logging import read_metrics
from tests.test_launcher import launch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("single_process_group")


def tiny_mlm(run_dir, cache_dir, *extra: str) -> config_lib.Config:
    """configs/tiny_mlm.yaml with the tests' tokenizer cache and a short run."""
    return config_lib.load(
        "configs/tiny_mlm.yaml",
        [
            "data.tokenizer_vocab_size=512",
            f"data.cache_dir={cache_dir}",
            f"train.run_dir={run_dir}",
            "train.wandb=false",
            "train.progress=false",
            "train.eval_tokens=4096",
            *extra,
        ],
    )


SMALL = [  # a smaller model, for the tests that check bookkeeping rather than learning
    "model.d_model=64",
    "model.n_layers=2",
    "model.moe.num_experts=4",
    "model.moe.expert_hidden=32",
    "data.seq_len=32",
    "mlm.min_seq_len=8",
    "mlm.eval_seq_lens=[64]",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.max_steps=6",
    "train.warmup_steps=1",
    "train.checkpoint_every=3",
]
DSMOE = ["model.mlp=moe", "model.moe.activation=gelu"]


def test_tiny_mlm_trains_and_its_mlm_loss_falls(tmp_path, cache_dir):
    cfg = tiny_mlm(
        tmp_path / "run",
        cache_dir,
        "train.max_steps=40",
        "train.warmup_steps=4",
        "train.global_batch_size=16",
        "train.micro_batch_size=16",
        "train.checkpoint_every=40",
    )
    result = run(cfg)
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < first - 0.5, (first, last)  # 6.3 -> 5.4 nats in 40 steps
    metrics = read_metrics(tmp_path / "run")
    assert all(0 <= m["mlm_accuracy"] <= 1 and m["tokens_per_s"] > 0 for m in metrics)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [(r["routing"], r["seq_len"]) for r in summary["results"]] == [("dense", 128), ("dense", 512)]
    assert all(r["loss"] < first for r in summary["results"])  # held out, and 4x the training length


def test_resume_continues_the_same_mlm_loss_curve(tmp_path, cache_dir):
    common = [*SMALL, *DSMOE, "train.export_at_end=false"]
    full = run(tiny_mlm(tmp_path / "full", cache_dir, *common))
    run(tiny_mlm(tmp_path / "cut", cache_dir, *common, "train.exit_at_step=3"))
    resumed = run(tiny_mlm(tmp_path / "cut", cache_dir, *common))
    assert len(full.losses) == 6 and len(resumed.losses) == 3
    groups = resumed.engine.optimizer.param_groups  # tiny_mlm's AdamW settings reached the engine
    assert all(g["eps"] == 1e-6 and g["betas"] == (0.9, 0.98) for g in groups)
    torch.testing.assert_close(resumed.losses, full.losses[3:], rtol=0, atol=0)


@pytest.mark.parametrize("ffn", ["geglu", "dsmoe"])
def test_export_reloads_with_equal_logits(tmp_path, cache_dir, ffn):
    result = run(
        tiny_mlm(
            tmp_path / "run", cache_dir, *SMALL, *(DSMOE if ffn == "dsmoe" else []), "train.eval_every=6"
        )
    )
    export_dir = tmp_path / "run" / "export"
    # The last periodic validation and the end-of-run report on the export: the same masked batches, the same
    # mask id (the report once masked with an untrained id), the same loss.
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["results"][0]["routing"], summary["results"][0]["seq_len"]) == ("dense", 32)
    assert read_metrics(tmp_path / "run")[-1]["val_loss"] == pytest.approx(
        summary["results"][0]["loss"], rel=1e-5
    )
    ours, cfg, routing, tokenizer_path = load_export(export_dir)
    if ffn == "dsmoe":  # the sparse rule rides along, as for the decoder
        assert routing == Routing(mlp=RoutingRule("threshold", eps=cfg.train.eval_threshold))
    trained = result.engine.module.eval()
    ids, mask, labels = eval_batches(held_out_tokens(cfg, tokenizer_path), 32, 0.15, 512, batch_size=4)[0]
    mask[1, 20:] = False  # some padding
    with torch.no_grad():
        for rule in (Routing(), routing):
            torch.testing.assert_close(
                ours(ids, mask, routing=rule).logits, trained(ids, mask, routing=rule).logits, rtol=0, atol=0
            )
        hf = AutoModelForMaskedLM.from_pretrained(export_dir)
        assert type(hf).__name__ == "DSMoEEncoderForMaskedLM"
        out = hf(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(out.logits, ours(ids, mask, routing=routing).logits, rtol=0, atol=0)
        assert torch.isfinite(out.loss)

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    enc = tokenizer(["To be, or not to " + MASK_TOKEN, "ROMEO:"], return_tensors="pt", padding=True)
    assert tokenizer.mask_token_id == 512 and tokenizer.pad_token_id == 513  # after the 512 BPE ids
    assert (enc["input_ids"] == 512).sum() == 1 and enc["attention_mask"].sum() < enc[
        "attention_mask"
    ].numel()
    with torch.no_grad():
        torch.testing.assert_close(
            hf(**enc).logits, ours(enc["input_ids"], enc["attention_mask"], routing=routing).logits
        )


@pytest.mark.parametrize("precision, stage", [("bf16", 2), ("fp32", 3)])
def test_zero_stages_train_the_encoder(tmp_path, cache_dir, precision, stage):
    cfg = tiny_mlm(
        tmp_path / "run",
        cache_dir,
        *SMALL,
        *DSMOE,
        f"train.precision={precision}",
        f"parallel.zero_stage={stage}",
        "train.max_steps=4",
    )
    result = run(cfg)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    if precision == "bf16":  # the engine computes in bf16, LayerNorm included (low precision)
        assert result.engine.module.blocks[0].attn_norm.weight.dtype == torch.bfloat16
    ours, *_ = load_export(tmp_path / "run" / "export")  # consolidated from the ZeRO shards
    assert ours.lm_head.weight is ours.embed.weight


@pytest.mark.slow
def test_two_ranks_follow_the_one_rank_mlm_curve(tmp_path, cache_dir):
    """deepspeed with 2 data-parallel ranks (ZeRO-2) against one rank taking the same global batch whole, on
    rows of mixed lengths: the ranks predict different numbers of tokens, and the loop's token weighting
    makes the step the one-rank (token-weighted) mean all the same."""
    common = [
        "--config",
        "configs/tiny_mlm.yaml",
        "data.tokenizer_vocab_size=512",
        f"data.cache_dir={cache_dir}",
        "train.wandb=false",
        "train.eval_tokens=2048",
        *SMALL,
        *DSMOE,
        "parallel.zero_stage=2",
    ]
    one = launch(1, [*common, f"train.run_dir={tmp_path / 'one'}", "train.micro_batch_size=8"], "torchrun")
    two = launch(2, [*common, f"train.run_dir={tmp_path / 'two'}"])
    curve_one = [m["loss"] for m in read_metrics(tmp_path / "one")]
    curve_two = [m["loss"] for m in read_metrics(tmp_path / "two")]
    assert len(curve_one) == len(curve_two) == 6
    torch.testing.assert_close(curve_two, curve_one, rtol=1e-5, atol=1e-5)
    assert "world 1 (dp 1 x ep 1 x tp 1), device cpu, attention sdpa" in one.stdout
    assert "world 2 (dp 2 x ep 1 x tp 1), device cpu, attention sdpa" in two.stdout
    assert "held-out MLM" in two.stdout and "seq    64" in two.stdout
