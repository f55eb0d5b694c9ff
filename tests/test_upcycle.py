"""Upcycling: a dense model (ours or a transformers Llama-style checkpoint) becomes a DS-MoE model with the
same logits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsmoe import config as config_lib
from dsmoe.model import build
from dsmoe.upcycle import UpcycleError, build_upcycled, dense_model, load_dense

REPO = Path(__file__).resolve().parent.parent


def dense_config(activation: str) -> config_lib.ModelConfig:
    cfg = config_lib.load(
        None,
        [
            "model.mlp=dense",
            "model.d_model=32",
            "model.n_layers=2",
            "model.vocab_size=64",
            "model.max_seq_len=32",
            "data.seq_len=32",
            "model.attention.experts=0",
            "model.attention.heads=4",
            "model.attention.kv_heads=2",
            "model.moe.num_experts=1",
            "model.moe.expert_hidden=48",
            f"model.moe.activation={activation}",
            "train.eval_top_k=1",
        ],
    )
    return cfg.model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("attention_experts", [0, 2])
def test_upcycled_model_has_the_dense_logits(activation, attention_experts):
    torch.manual_seed(0)
    cfg = dense_config(activation)
    dense = build(cfg).eval()
    moe, moe_cfg = build_upcycled(dense.state_dict(), cfg, experts=4, attention_experts=attention_experts)
    assert moe_cfg.mlp == "moe" and moe_cfg.moe.expert_hidden == 12 and moe.moe_layers
    assert len(moe.moa_layers) == (cfg.n_layers if attention_experts else 0)
    idx = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        want, got = dense(idx).logits, moe(idx).logits
    assert rel(got, want) <= 1e-5
    # uniform routers: what training starts from
    with torch.no_grad():
        out = moe(idx, idx)
    torch.testing.assert_close(out.mlp.expert_load, torch.full_like(out.mlp.expert_load, 0.25))


def test_upcycling_refuses_what_does_not_split():
    cfg = dense_config("gelu")
    with pytest.raises(UpcycleError, match="does not split into 5 experts"):
        build_upcycled(build(cfg).state_dict(), cfg, experts=5, attention_experts=0)
    with pytest.raises(UpcycleError, match="3 attention experts"):
        build_upcycled(build(cfg).state_dict(), cfg, experts=4, attention_experts=3)


def hf_checkpoint(kind: str, path: Path) -> torch.nn.Module:
    """A small random transformers model saved to disk (no download)."""
    import transformers

    common = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **common))
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_transformers_checkpoint_on_disk_upcycles(kind, tmp_path):
    torch.manual_seed(0)
    hf = hf_checkpoint(kind, tmp_path / kind)
    sd, cfg, tokenizer = load_dense(tmp_path / kind)
    assert tokenizer is None
    idx = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        want = hf(idx).logits
        dense = dense_model(sd, cfg.model)(idx).logits
        moe, _ = build_upcycled(sd, cfg.model, experts=4, attention_experts=2)
        got = moe(idx).logits
    assert rel(dense, want) <= 1e-5, "our dense model reads the transformers weights as they are"
    assert rel(got, want) <= 1e-5


def test_gpt2_is_refused_with_the_reason(tmp_path):
    import transformers

    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    ).save_pretrained(tmp_path)
    with pytest.raises(UpcycleError, match="not Llama-style"):
        load_dense(tmp_path)


def test_upcycle_command_writes_a_trainable_export(tmp_path):
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    hf_checkpoint("llama", tmp_path / "llama")
    cmd = [
        sys.executable,
        "-m",
        "dsmoe",
        "upcycle",
        str(tmp_path / "llama"),
        str(tmp_path / "moe"),
        "--experts",
        "4",
    ]
    refused = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and "--tokenizer" in refused.stderr
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(96)}, unk_token="t0")).save(
        str(tmp_path / "tok.json")
    )
    done = subprocess.run(
        [*cmd, "--attention-experts", "2", "--tokenizer", str(tmp_path / "tok.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "largest logit difference to the dense model" in done.stdout
    from dsmoe.export import load_export

    model, cfg, _, _ = load_export(tmp_path / "moe")
    assert cfg.model.moe.num_experts == 4 and cfg.model.attention.experts == 2
    train_cfg = config_lib.load(tmp_path / "moe" / "train.yaml", [])
    assert train_cfg.train.init_from == str((tmp_path / "moe").resolve())
