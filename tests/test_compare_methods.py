"""tools/research/compare_methods.py end to end on CPU: every method under a tiny budget, the table and the plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from dsmoe.data.tokens import encode_documents, train_tokenizer
from dsmoe.train.budget import RstEntry, RstTable, StepConfig

REPO = Path(__file__).resolve().parent.parent
LAYERS, BATCH, MICRO, SEQ = 4, 8, 4, 32


def made_up_table(path: Path) -> None:
    """Every configuration the seven runs execute, with made-up times (the measured table is the GPU's)."""
    entries = []
    for n in range(1, LAYERS + 1):
        for opt in ("adamw", "lion", "sophia"):
            step = StepConfig(
                active_layers=n, batch_size=BATCH, micro_batch_size=MICRO, seq_len=SEQ, optimizer=opt
            )
            entries.append(RstEntry(step=step, seconds=0.01 * n + 0.002))
        for kind, batch in (("hessian", BATCH), ("forward", 2 * BATCH)):
            step = StepConfig(
                kind=kind,
                active_layers=n,
                batch_size=batch,
                micro_batch_size=MICRO,
                seq_len=SEQ,
                optimizer="sophia",
            )
            entries.append(RstEntry(step=step, seconds=0.004 * n + 0.001))
    RstTable(device="made-up", date="2026-11-30", commit="test", torch_version="x", entries=entries).save(
        path
    )


def token_dir(path: Path) -> Path:
    """Two small domains (prose, code-like) in tools/research/ablate_data.py's file layout."""
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "sword", "crown", "love", "night", "day", "fair", "foul"]
    prose = [" ".join(rng.choice(words, 60)) + "." for _ in range(60)]
    code = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)]
    tok = train_tokenizer(prose + code, 300)
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    encode_documents(tok, prose[:50] + code[:250]).tofile(path / "train_all.bin")
    encode_documents(tok, prose[50:] + code[250:]).tofile(path / "val_all.bin")
    encode_documents(tok, prose[50:]).tofile(path / "val_prose.bin")
    encode_documents(tok, code[250:]).tofile(path / "val_code.bin")
    return path


def test_compare_methods_runs_every_method_and_writes_the_table_and_plot(tmp_path):
    made_up_table(tmp_path / "table.json")
    tokens = token_dir(tmp_path / "tokens")
    out = tmp_path / "out"
    model = [
        "model.d_model=32",
        f"model.n_layers={LAYERS}",
        "model.max_seq_len=32",
        "model.vocab_size=320",
        "model.attention.experts=2",
        "model.attention.heads_per_expert=1",
        "model.attention.kv_heads=1",
        "model.moe.num_experts=2",
        "model.moe.expert_hidden=16",
        f"data.seq_len={SEQ}",
        f"train.global_batch_size={BATCH}",
        f"train.micro_batch_size={MICRO}",
        "train.eval_tokens=1024",
        "train.method.irreducible_steps=3",  # after METHODS: overrides the comparison's 100
    ]
    cmd = [sys.executable, str(REPO / "tools/research/compare_methods.py"), "--tokens", str(tokens)]
    cmd += ["--table", str(tmp_path / "table.json"), "--budgets", "0.4", "--seeds", "3", "--jobs", "2"]
    done = subprocess.run(cmd + ["--out", str(out), *model], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(r["method"] for r in runs) == sorted(
        ["baseline", "layer_stacking", "layer_drop", "selective_backprop", "rho_loss", "lion", "sophia"]
    )
    for r in runs:
        assert r["steps"] >= 2 and r["rst_s"] <= 0.4 and r["final_lr"] < 0.2 * 3e-3, r["method"]
        assert set(r["domain_loss"]) == {"prose", "code"} and np.isfinite(r["val_loss"])
    base = next(r for r in runs if r["method"] == "baseline")
    assert base["steps"] == int(0.4 // 0.042)  # 4 layers, AdamW: 0.042 s per step
    # the last step ends at 0.378 s of 0.4 and no tenth fits: it trains at the schedule's final value (0)
    assert base["final_lr"] == 0.0
    text = (out / "results.md").read_text()
    assert "| rho_loss |" in text and "ppl prose" in text
    assert (out / "val_loss_vs_rst.png").stat().st_size > 1000
    assert (out / "curves_vs_rst.png").stat().st_size > 1000
