"""Exported models load with transformers' Auto classes and generate like our own model."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dsmoe.hf  # noqa: F401  (registers model_type "dsmoe")
from dsmoe.export import export, load_export
from dsmoe.model import Routing, RoutingRule
from dsmoe.train.loop import run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("single_process_group")


@pytest.mark.parametrize("tied", [True, False])
def test_auto_classes_load_the_export_and_generate(small_cfg, tmp_path, tied):
    run(
        small_cfg(
            "train.max_steps=3", "train.export_at_end=false", f"model.tie_embeddings={str(tied).lower()}"
        )
    )
    routing = Routing(mlp=RoutingRule("top_k", k=2))
    out = export(tmp_path / "run", tmp_path / "hf", routing)
    ours, *_ = load_export(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "DSMoEForCausalLM" and model.routing == routing
    enc = tokenizer("ROMEO:\nWhat light", return_tensors="pt")
    torch.testing.assert_close(
        model(**enc).logits, ours(enc["input_ids"], routing=routing).logits, rtol=0, atol=0
    )
    labels_loss = model(**enc, labels=enc["input_ids"]).loss
    assert torch.isclose(
        labels_loss, ours(enc["input_ids"][:, :-1], enc["input_ids"][:, 1:], routing=routing).lm_loss
    )

    generated = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    x = enc["input_ids"]
    for _ in range(6):  # greedy decoding by hand with our model and the export's rule
        x = torch.cat([x, ours(x, routing=routing).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, x)
    assert tokenizer.decode(generated[0]).startswith("ROMEO:\nWhat light")
