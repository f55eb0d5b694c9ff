"""--format qwen3_moe: stock transformers loads the export as Qwen3-MoE, with our logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsmoe import config as config_lib
from dsmoe.export import export_qwen3_moe, load_from_run
from dsmoe.model import Routing, RoutingRule
from dsmoe.run import run
from dsmoe.train.checkpoint import CheckpointError
from tests.conftest import small_overrides

pytestmark = pytest.mark.usefixtures("single_process_group")


@pytest.mark.parametrize("tied", [True, False])
def test_qwen3_moe_export_matches_our_top_k(tmp_path, cache_dir, tied):
    overrides = small_overrides(tmp_path / "run", cache_dir) + [
        "train.max_steps=3",
        "train.export_at_end=false",
        "model.attention.experts=0",  # the small test shapes use MoA; Qwen3 attention is plain GQA
        "model.attention.heads=4",
        f"model.tie_embeddings={str(tied).lower()}",
    ]
    run(config_lib.load("configs/tiny_qwen3moe.yaml", overrides))
    out = export_qwen3_moe(tmp_path / "run", tmp_path / "qwen", top_k=2)
    qwen = AutoModelForCausalLM.from_pretrained(out)  # stock class: no dsmoe registration involved
    assert type(qwen).__name__ == "Qwen3MoeForCausalLM" and qwen.config.norm_topk_prob is False
    ours = load_from_run(tmp_path / "run")[0]
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("ROMEO:\nBut soft, what light through yonder window breaks?", return_tensors="pt")[
        "input_ids"
    ]
    with torch.no_grad():
        theirs = qwen(ids).logits
        mine = ours(ids, routing=Routing(mlp=RoutingRule("top_k", k=2))).logits
    torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5)


def test_qwen3_moe_export_refuses_other_architectures(small_cfg, tmp_path):
    run(small_cfg("train.max_steps=3", "train.export_at_end=false"))  # MoA + GeLU
    with pytest.raises(CheckpointError, match="SwiGLU experts.*not MoA.*qk_norm"):
        export_qwen3_moe(tmp_path / "run", tmp_path / "qwen", top_k=2)
