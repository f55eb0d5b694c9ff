"""Exported models load with transformers' Auto classes and generate like our own model."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dsmoe.hf  # noqa: F401  (registers model_type "dsmoe")
from dsmoe.export import export, load_export
from dsmoe.model import Routing, RoutingRule
from dsmoe.run import run

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


def small_export(tmp_path, moa: bool):
    """A random-init decoder (MoA or plain GQA attention, DS-MoE MLP) exported with a top-2 MLP rule."""
    from tokenizers import Tokenizer, models

    from dsmoe import config as config_lib
    from dsmoe.export import write_export
    from dsmoe.model import build

    overrides = ["model.d_model=32", "model.n_layers=2", "model.max_seq_len=24", "model.vocab_size=96"]
    overrides += ["data.seq_len=16", "data.tokenizer_vocab_size=96"]
    overrides += ["model.moe.num_experts=4", "model.moe.expert_hidden=16", "model.attention.kv_heads=2"]
    overrides += (
        ["model.attention.heads=0", "model.attention.experts=4", "model.attention.heads_per_expert=1"]
        if moa
        else ["model.attention.experts=0", "model.attention.heads=4"]
    )
    cfg = config_lib.load(None, overrides)
    torch.manual_seed(0)
    model = build(cfg.model).eval()
    routing = Routing(mlp=RoutingRule("top_k", k=2))
    tok = tmp_path / "tok.json"
    Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(str(tok))
    out = write_export(model, cfg, tok, tmp_path / "export", routing, 0)
    return model, routing, AutoModelForCausalLM.from_pretrained(out).eval()


@pytest.mark.parametrize("moa", [True, False], ids=["moa", "gqa"])
def test_generate_uses_the_kv_cache_and_equals_recompute_and_dsmoe_generate(tmp_path, moa):
    from dsmoe.infer import generate

    ours, routing, model = small_export(tmp_path, moa)
    prompt = torch.randint(1, 96, (3, 7))
    seen = []  # the (B, T) token ids every forward of the wrapped DecoderLM receives
    model.decoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(prompt, **kw, return_dict_in_generate=True, output_logits=True)
    assert seen == [(3, 7)] + [(3, 1)] * 9  # one prefill, then only the new token per step
    assert isinstance(cached.cache, dsmoe.hf.DSMoECache) and cached.cache.get_seq_length() == 7 + 9
    seen.clear()
    recomputed = model.generate(prompt, **kw, use_cache=False)
    assert seen == [(3, 7 + i) for i in range(10)]  # no cache: the whole prefix every step
    assert torch.equal(cached.sequences, recomputed)
    assert torch.equal(cached.sequences, generate(ours, prompt, 10, routing, temperature=0))

    with torch.no_grad():  # the step logits are dsmoe's own KV-cache decode logits
        cache = ours.new_cache(3, 17)
        logits = [ours(prompt, routing=routing, cache=cache).logits[:, -1]]
        logits += [
            ours(cached.sequences[:, t : t + 1], routing=routing, cache=cache).logits[:, -1]
            for t in range(7, 16)
        ]
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(logits), rtol=0, atol=1e-5)


def test_cached_sampling_and_beam_search_equal_full_recompute(tmp_path):
    _, _, model = small_export(tmp_path, moa=True)
    prompt = torch.randint(1, 96, (2, 5))
    sample = {"max_new_tokens": 8, "do_sample": True, "top_k": 20, "pad_token_id": 0}
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(1)
        runs.append(model.generate(prompt, **sample, use_cache=use_cache))
    assert torch.equal(*runs)
    beam = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(prompt, **beam), model.generate(prompt, **beam, use_cache=False))


@pytest.mark.parametrize("use_cache", [True, False])
def test_padded_prompts_are_refused(tmp_path, use_cache):
    _, _, model = small_export(tmp_path, moa=True)
    prompt = torch.randint(1, 96, (2, 6))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # a left-padded second prompt
    with pytest.raises(ValueError, match="equal-length prompts"):
        model.generate(prompt, attention_mask=mask, max_new_tokens=3, pad_token_id=0, use_cache=use_cache)


def test_cached_generation_past_max_seq_len_says_so(tmp_path):
    _, _, model = small_export(tmp_path, moa=False)
    prompt = torch.randint(1, 96, (1, 20))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len 24"):
        model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    # without a cache the model slides over its last max_seq_len tokens, as before
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
    assert out.shape == (1, 28)


def test_a_cache_passed_to_generate_continues_across_calls(tmp_path):
    _, _, model = small_export(tmp_path, moa=True)
    prompt = torch.randint(1, 96, (2, 6))
    kw = {"do_sample": False, "pad_token_id": 0}
    cache = model.new_cache(2)
    first = model.generate(prompt, max_new_tokens=4, cache=cache, **kw)
    assert cache.get_seq_length() == 6 + 3
    second = model.generate(first, max_new_tokens=6, cache=cache, **kw)  # prefills only the new token
    assert cache.get_seq_length() == 6 + 9
    assert torch.equal(second, model.generate(prompt, max_new_tokens=10, **kw))
