"""KV-cache inference: prefill + decode equals recomputing the whole sequence; batched generation."""

from __future__ import annotations

import pytest
import torch

from dsmoe import config as config_lib
from dsmoe.infer import generate, sample_next
from dsmoe.model import Routing, RoutingRule, build


def model_for(moa: bool, qk_norm: bool = False):
    overrides = ["model.d_model=32", "model.n_layers=2", "model.max_seq_len=48", "model.vocab_size=96"]
    overrides += [
        "data.seq_len=32",
        "data.tokenizer_vocab_size=96",
        "model.moe.num_experts=4",
        "model.moe.expert_hidden=16",
    ]
    overrides += (
        [
            "model.attention.heads=0",
            "model.attention.experts=4",
            "model.attention.heads_per_expert=1",
            "model.attention.kv_heads=2",
        ]
        if moa
        else ["model.attention.experts=0", "model.attention.heads=4", "model.attention.kv_heads=2"]
    )
    overrides.append(f"model.attention.qk_norm={str(qk_norm).lower()}")
    torch.manual_seed(0)
    return build(config_lib.load(None, overrides).model).eval()


ROUTINGS = [Routing(), Routing(RoutingRule("top_k", k=1), RoutingRule("threshold", eps=0.9))]


@pytest.mark.parametrize("moa, qk_norm", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("routing", ROUTINGS, ids=["dense", "sparse"])
def test_cached_decoding_equals_full_recompute(moa, qk_norm, routing):
    model = model_for(moa, qk_norm)
    idx = torch.randint(0, 96, (3, 20))
    with torch.no_grad():
        full = model(idx, routing=routing).logits
        cache = model.new_cache(3, 20)
        pieces = [model(idx[:, :7], routing=routing, cache=cache).logits]  # prefill
        pieces.append(model(idx[:, 7:12], routing=routing, cache=cache).logits)  # a chunk after the prefix
        pieces += [model(idx[:, t : t + 1], routing=routing, cache=cache).logits for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 20


def test_cache_size_does_not_depend_on_attention_experts():
    assert model_for(True).new_cache(2).k.shape == model_for(False).new_cache(2).k.shape


def test_greedy_generation_matches_step_by_step_argmax():
    model = model_for(True)
    prompt = torch.randint(0, 96, (2, 5))
    out = generate(model, prompt, 10, routing=ROUTINGS[1], temperature=0)
    x = prompt
    with torch.no_grad():
        for _ in range(10):
            x = torch.cat([x, model(x, routing=ROUTINGS[1]).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, x)


def test_sampling_options_and_stops():
    model = model_for(False)
    prompt = torch.randint(0, 96, (4, 3))
    gen = torch.Generator().manual_seed(0)
    out = generate(model, prompt, 100, temperature=0.8, top_k=5, generator=gen)
    assert out.shape == (4, 48) and torch.equal(out[:, :3], prompt)  # capped at max_seq_len
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    picks = {int(sample_next(logits, 1.0, 2, 1.0)) for _ in range(50)}
    assert picks <= {2, 3}
    assert {int(sample_next(logits * 10, 1.0, 0, 0.5)) for _ in range(20)} == {3}
    eos = int(generate(model, prompt[:1], 1, temperature=0)[0, -1])
    stopped = generate(model, prompt[:1], 20, temperature=0, eos_id=eos)
    assert stopped.shape[1] == 4 and int(stopped[0, -1]) == eos


ENGINE_ROUTINGS = [
    Routing(),
    Routing(RoutingRule("top_k", k=2)),
    Routing(RoutingRule("top_k", k=4)),  # K = N
    Routing(RoutingRule("threshold", eps=0.9)),
]


@pytest.mark.parametrize("combine", ["sparse", "dense"])
@pytest.mark.parametrize("moa, qk_norm", [(False, False), (True, True)])
@pytest.mark.parametrize("routing", ENGINE_ROUTINGS, ids=["dense", "top2", "top4", "threshold"])
def test_engine_prefill_and_static_cache_decode_equal_the_model(moa, qk_norm, routing, combine):
    """The Engine (static cache, decode at a device position over the masked cache, sync-free top-K)
    gives the model's own full-sequence logits, for a prefill, a chunk after it, then one token a step, with
    the rule's experts run sparsely or all of them combined with the rule's weights (combine)."""
    from dsmoe.infer import Engine

    model = model_for(moa, qk_norm)
    idx = torch.randint(0, 96, (3, 20))
    with torch.no_grad():
        full = model(idx, routing=routing).logits
    engine = Engine(model, routing, batch=3, max_len=24, combine=combine)
    pieces = [engine.prefill(idx[:, :7], all_logits=True), engine.prefill(idx[:, 7:12], all_logits=True)]
    pieces += [engine.decode(idx[:, t : t + 1]).unsqueeze(1) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    engine.reset()
    torch.testing.assert_close(engine.prefill(idx[:, :5]), full[:, 4])


def test_compiled_engine_writes_the_cache_in_its_segments_and_equals_the_model():
    """Engine(compile=True): a decode step's pre segment writes the new K/V into the cache itself (inductor
    fuses the write into its RoPE kernel) and takes the MoA router's scores from the Q/K/V GEMM; logits
    and cache equal the model's and a prefill's, without a compiled version per layer."""
    from torch._dynamo.utils import counters

    from dsmoe.infer import Engine

    model = model_for(True, True)
    routing = Routing(RoutingRule("top_k", k=2))
    idx = torch.randint(0, 96, (3, 16))
    with torch.no_grad():
        full = model(idx, routing=routing).logits
    counters.clear()
    engine = Engine(model, routing, batch=3, max_len=20, compile=True)
    pieces = [engine.prefill(idx[:, :10], all_logits=True)]
    pieces += [engine.decode(idx[:, t : t + 1]).unsqueeze(1) for t in range(10, 16)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    prefilled = Engine(model, routing, batch=3, max_len=20)
    prefilled.prefill(idx)
    torch.testing.assert_close(engine.k, prefilled.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(engine.v, prefilled.v, rtol=1e-5, atol=1e-5)
    # prefill and decode: pre (first layer, later layers), post; not one per layer
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])


def test_dense_combine_equals_sparse_under_threshold_top_k():
    """Threshold-top-K sets K from the batch at hand (so a prefill is not the full sequence's forward): the
    Engine's two combines still give the same logits for the same calls."""
    from dsmoe.infer import Engine

    model = model_for(True, True)
    routing = Routing(RoutingRule("threshold_top_k", k=2, eps=0.9))
    idx = torch.randint(0, 96, (3, 12))
    runs = []
    for combine in ("sparse", "dense"):
        engine = Engine(model, routing, batch=3, max_len=16, combine=combine)
        steps = [engine.prefill(idx[:, :8], all_logits=True)]
        steps += [engine.decode(idx[:, t : t + 1]).unsqueeze(1) for t in range(8, 12)]
        runs.append(torch.cat(steps, dim=1))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-5)


def test_top_k_mask_equals_select_experts():
    """The dense combine's top-K mask (k rounds of max, fusable) against topk + scatter, ties included."""
    from dsmoe.infer import top_k_mask
    from dsmoe.model.moe import select_experts

    probs = torch.randn(300, 12).softmax(-1)
    for k in (1, 4, 12, 20):
        assert torch.equal(top_k_mask(probs, k), select_experts(probs, RoutingRule("top_k", k=k)))
    tied = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.4, 0.1]])
    assert top_k_mask(tied, 2).tolist() == [[True, True, False, False], [False, True, True, False]]


def test_dense_combine_follows_the_measured_table(monkeypatch):
    """The Engine's automatic choice: every expert combined where the committed table measured the sparse path
    slower than dense on this device, at the measured size nearest in log(tokens); sparse elsewhere, and on
    devices without a table (CPU)."""
    from dsmoe import infer

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    top4, threshold = RoutingRule("top_k", k=4), RoutingRule("threshold", eps=1.0)
    assert not infer.dense_combine_wins(top4, 1, cuda)  # decode at batch 1: top-4 1.29x dense
    assert infer.dense_combine_wins(top4, 64, cuda)  # batch 64: 0.58x
    assert infer.dense_combine_wins(top4, 300, cuda)  # nearer 64 than 16384 in log
    assert not infer.dense_combine_wins(top4, 8 * 2048, cuda)  # prefill: 1.43x
    assert not infer.dense_combine_wins(threshold, 1, cuda)  # 1.05x
    assert all(infer.dense_combine_wins(threshold, n, cuda) for n in (20, 64))  # nearer 64: 0.54x
    assert not infer.dense_combine_wins(threshold, 8 * 2048, cuda)  # prefill: 1.14x
    assert not infer.dense_combine_wins(RoutingRule("dense"), 64, cuda)
    assert not infer.dense_combine_wins(top4, 64, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert not infer.dense_combine_wins(threshold, 64, cuda)
    with pytest.raises(ValueError, match="combine"):
        infer.Engine(model_for(False), Routing(), combine="fast")


def test_engine_generation_equals_generate_and_k_equal_n_equals_dense():
    from dsmoe.infer import Engine, generate_fast

    model = model_for(True)
    prompt = torch.randint(0, 96, (2, 5))
    for routing in (Routing(), Routing(RoutingRule("top_k", k=1))):
        expected = generate(model, prompt, 12, routing=routing, temperature=0)
        assert torch.equal(
            generate_fast(Engine(model, routing, batch=2), prompt, 12, temperature=0), expected
        )
    dense = Engine(model, Routing(), batch=2).prefill(prompt, all_logits=True)
    all_experts = Engine(model, Routing(RoutingRule("top_k", k=4)), batch=2).prefill(prompt, all_logits=True)
    torch.testing.assert_close(all_experts, dense, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention"):
        Engine(model, ROUTINGS[1])
    with pytest.raises(ValueError, match="max_len"):
        Engine(model, Routing(), batch=2, max_len=8).prefill(torch.zeros(2, 9, dtype=torch.long))


def test_split_k_decode_attention_is_refused_off_cuda(monkeypatch):
    """The kernel is Triton: asking for it on a CPU (outside Triton's interpreter) names the option."""
    from dsmoe.infer import Engine

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="attention_kernel"):
        Engine(model_for(True, True), Routing(), batch=1, max_len=16, attention_kernel=True)
