"""GPU-only checks of the sparse inference paths (run on the lent GPU): the Triton gather-GEMV and the
sorted grouped GEMMs equal the portable loop, and the CUDA-graph decode equals eager decode."""

from __future__ import annotations

import pytest
import torch

from dsmoe.model.sparse import moe_topk_forward, route_topk

pytestmark = pytest.mark.gpu


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def share_close(a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
    """Share of the (sequence, step) logit rows of (B, S, V) within `tol` relative error. Under bf16, a
    different summation order (compiled kernels) flips a near-tied top-K choice now and then, which moves
    that token's logits a few percent; a real error moves every row."""
    a, b = a.double(), b.double()
    errors = (a - b).norm(dim=-1) / b.norm(dim=-1)
    return (errors < tol).double().mean().item()


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("tokens, k", [(1, 4), (3, 2), (64, 4), (2000, 4), (700, 32)])
@pytest.mark.parametrize("path", ["gemv", "grouped"])
def test_fast_expert_paths_equal_the_portable_loop(activation, tokens, k, path):
    torch.manual_seed(tokens + k)
    E, F, D = 32, 96, 320  # F, D not multiples of the kernels' blocks: the masks are exercised
    width = 2 * F if activation == "swiglu" else F
    w_in = (torch.randn(E, width, D, device="cuda") * 0.05).bfloat16()
    w_out = (torch.randn(E, F, D, device="cuda") * 0.05).bfloat16()
    x = torch.randn(tokens, D, device="cuda").bfloat16()
    probs = torch.randn(tokens, E, device="cuda").softmax(-1)
    weights, experts = probs.topk(k, dim=-1)
    with torch.no_grad():
        fast = moe_topk_forward(x, weights, experts, w_in, w_out, activation, path=path)
    reference = moe_topk_forward(
        x.double(), weights.double(), experts, w_in.double(), w_out.double(), activation, path="loop"
    )
    assert fast.dtype == torch.bfloat16 and fast.shape == (tokens, D)
    assert torch.isfinite(fast).all()
    assert relative_error(fast, reference) < 1e-2


@pytest.mark.parametrize("experts, k", [(32, 4), (12, 3), (8, 8)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_router_topk_equals_softmax_topk(experts, k, renormalize):
    torch.manual_seed(experts)
    h = torch.randn(16, 320, device="cuda").bfloat16()
    weight = (torch.randn(experts, 320, device="cuda") * 0.1).bfloat16()
    gates, ids = route_topk(h, weight, k, renormalize)
    probs = torch.softmax(h.double() @ weight.double().T, dim=-1)
    reference = probs.topk(k, dim=-1)
    values = reference.values / reference.values.sum(-1, keepdim=True) if renormalize else reference.values
    assert torch.equal(ids, reference.indices)  # random scores: no ties
    torch.testing.assert_close(gates.double(), values, rtol=1e-5, atol=1e-6)
    h[3] = float("nan")  # a NaN row picks valid expert ids (the experts' kernels index with them)
    _, ids = route_topk(h, weight, k, renormalize)
    assert int(ids.min()) >= 0 and int(ids.max()) < experts


@pytest.mark.parametrize("renormalize", [False, True])
def test_up_kernel_routing_equals_the_separate_top_k_launch(renormalize):
    """Decode's fused route (the up kernel's programs take the softmax and top-K of the router scores) gives
    the bits of route_topk's table fed to the same gather-GEMV, and writes that table for the down kernel."""
    from dsmoe.model.router import router_scores
    from dsmoe.model.sparse import gemv_routed_partials, gemv_topk_partials

    torch.manual_seed(1)
    E, F, D, k = 32, 256, 2048, 4  # DS-MoE-1B's experts
    w_in = (torch.randn(E, F, D, device="cuda") * 0.05).bfloat16()
    w_out = (torch.randn(E, F, D, device="cuda") * 0.05).bfloat16()
    router = (torch.randn(E, D, device="cuda") * 0.05).bfloat16()
    for tokens in (1, 16):
        x = torch.randn(tokens, D, device="cuda").bfloat16()
        gates, ids = route_topk(x, router, k, renormalize)
        separate = gemv_topk_partials(x, gates, ids, w_in, w_out, "gelu")
        routed = gemv_routed_partials(x, router_scores(x, router), k, renormalize, w_in, w_out, "gelu")
        assert torch.equal(routed, separate)


@pytest.mark.parametrize("rule", ["threshold", "threshold_top_k"])
def test_threshold_sparse_forward_is_bitwise_deterministic(rule):
    """The model's threshold paths (evaluation, prefill) give the same bits run after run: their combine is
    a token-major segment sum, not a scatter-add whose atomics land in any order (bf16, 4096 tokens)."""
    from dsmoe.model.moe import DSMoE, RoutingRule

    torch.manual_seed(0)
    layer = DSMoE(512, 16, 128, "gelu").to("cuda", torch.bfloat16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16)
    routing = RoutingRule(rule, k=4, eps=1.0)
    with torch.no_grad():
        first = layer(x, routing)[0]
        for _ in range(5):
            assert torch.equal(layer(x, routing)[0], first)


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_masked_forward_kernels_equal_the_torch_path_and_a_reference(act):
    """The threshold rules' sync-free path on CUDA (bf16; the up projection the Triton gather-GEMM) against
    its torch twin and an fp32 per-expert reference; a CUDA graph replays it."""
    from dsmoe.model.mlp import activate
    from dsmoe.model.sparse import moe_masked_forward

    torch.manual_seed(0)
    E, F, D, T = 16, 128, 512, 300
    w_in = torch.randn(E, F if act == "gelu" else 2 * F, D, device="cuda").mul(0.05).bfloat16()
    w_out = torch.randn(E, F, D, device="cuda").mul(0.05).bfloat16()
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    probs = torch.randn(T, E, device="cuda").mul(2).softmax(-1)
    keep = E * probs > 1.0
    keep[7] = False
    weights = probs * keep
    with torch.no_grad():
        fast = moe_masked_forward(x, weights, keep, w_in, w_out, act, kernels=True)
        twin = moe_masked_forward(x, weights, keep, w_in, w_out, act, kernels=False)
        ref = torch.zeros(T, D, device="cuda")
        for e in range(E):
            h = activate(x.float() @ w_in[e].float().T, act) @ w_out[e].float()
            ref += weights[:, e : e + 1] * keep[:, e : e + 1] * h
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = moe_masked_forward(x, weights, keep, w_in, w_out, act, kernels=True)
        graph.replay()
    assert relative_error(fast.float(), ref) < 1e-2
    assert relative_error(twin.float(), ref) < 1e-2
    assert torch.equal(replayed, fast)
    assert fast[7].abs().max() == 0


def small_moa_model():
    """bf16 on CUDA: MoA (4 experts x 2 query heads over 2 K/V heads), 8 MLP experts, 3 layers."""
    from dsmoe import config as config_lib
    from dsmoe.model import build

    overrides = [
        "model.d_model=256", "model.n_layers=3", "model.max_seq_len=128", "model.vocab_size=512",
        "data.seq_len=64", "data.tokenizer_vocab_size=512", "model.moe.num_experts=8",
        "model.moe.expert_hidden=64", "model.attention.heads=0", "model.attention.experts=4",
        "model.attention.heads_per_expert=2", "model.attention.kv_heads=2",
    ]  # fmt: skip
    torch.manual_seed(0)
    return build(config_lib.load(None, overrides).model).to("cuda", torch.bfloat16).eval()


@pytest.mark.parametrize("combine", ["sparse", "dense"])
@pytest.mark.parametrize("mlp", ["dense", "top_k", "threshold"])
@pytest.mark.parametrize("batch", [1, 20])
def test_cuda_graph_decode_equals_eager_decode(mlp, batch, combine):
    """The same engine steps with and without the captured graph, and compiled (bf16, MoA, grouped query
    heads). Sparse threshold routing is graph-safe at every size: the gather-GEMV's masked table for few
    tokens, every pair in a fixed slot of grouped GEMMs beyond (batch 20); every rule is, combined densely
    (every expert, the rule's weights)."""
    if mlp == "dense" and combine == "dense":
        pytest.skip("the dense rule has nothing to combine sparsely")
    from dsmoe.infer import Engine
    from dsmoe.model import Routing, RoutingRule

    model = small_moa_model()
    routing = {
        "dense": Routing(),
        "top_k": Routing(RoutingRule("top_k", k=2)),
        "threshold": Routing(RoutingRule("threshold", eps=1.0)),
    }[mlp]
    idx = torch.randint(0, 512, (batch, 40), device="cuda")
    start = 30  # a threshold prefill of 30 tokens runs the model's own sparse forward (fixed slots)
    logits = {}
    for graph, compile in ((False, False), (True, False), (True, True)):
        engine = Engine(
            model, routing, batch=batch, max_len=64, cuda_graph=graph, compile=compile, combine=combine
        )
        steps = [engine.prefill(idx[:, :start])]
        steps += [engine.decode(idx[:, t : t + 1]).clone() for t in range(start, start + 10)]
        logits[graph, compile] = torch.stack(steps, 1).float()
    assert relative_error(logits[True, False], logits[False, False]) < 1e-3  # the same kernels, replayed
    assert share_close(logits[True, True], logits[False, False], 1e-2) > 0.9  # compiled: fused roundings
    with torch.no_grad():
        full = model(idx[:, : start + 10], routing=routing).logits[:, start - 1 :].float()
    assert share_close(logits[True, False], full, 1e-2) > 0.9


def test_sparse_moa_on_cuda_is_deterministic_and_equals_the_reference():
    """MoA under a threshold rule on CUDA (every expert combined with the kept weights: no host sync) gives
    the same bits run after run, and equals the fp64 per-expert reference."""
    import copy

    from dsmoe.model.attention import rope_cos_sin
    from dsmoe.model.moe import RoutingRule, select_experts
    from tests.test_moa import make_attention, moa_cfg, reference_moa

    cfg = moa_cfg(8, 2, 2, d_model=256)
    layer = make_attention(cfg)  # fp64 on the CPU: the reference's copy
    gpu = copy.deepcopy(layer).to("cuda", torch.bfloat16)
    x = (torch.randn(2, 64, cfg.d_model) * 0.2).to("cuda", torch.bfloat16)
    rule = RoutingRule("threshold", eps=1.0)
    cos, sin = rope_cos_sin(64, cfg.head_dim, 10000.0, "cuda", torch.bfloat16)
    with torch.no_grad():
        first = gpu(x, cos, sin, rule)[0]
        for _ in range(3):
            assert torch.equal(gpu(x, cos, sin, rule)[0], first)
        keep = select_experts(gpu.router(x.reshape(-1, cfg.d_model)), rule)  # the GPU's own routing
        expected = reference_moa(layer, x.double().cpu(), keep.view(2, 64, 8).double().cpu())
    assert relative_error(first.double().cpu(), expected) < 3e-2


@pytest.mark.parametrize(
    "batch, heads, kv_heads, head_dim", [(1, 32, 2, 64), (64, 32, 2, 64), (3, 8, 2, 128)]
)
def test_split_k_decode_attention_equals_the_masked_torch_version(batch, heads, kv_heads, head_dim):
    """bf16 over a 2048-row cache, the position at the first row, inside and at the end: within bf16 rounding
    of the torch version over every row, and the same bits run to run (no atomics)."""
    from dsmoe.model.decode_attention import decode_attention, decode_attention_reference

    torch.manual_seed(0)
    S = 2048
    q = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, kv_heads, S, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    positions = torch.arange(S, device="cuda")
    for p in (0, 1, 700, S - 1):
        pos = torch.tensor(p, device="cuda")
        got = decode_attention(q, k, v, pos)
        assert relative_error(got, decode_attention_reference(q, k, v, pos, positions)) < 1e-2, p
        assert torch.equal(got, decode_attention(q, k, v, pos)), p


@pytest.mark.parametrize("batch", [1, 20])
def test_engine_decode_with_the_split_k_attention_equals_the_torch_attention(batch):
    """Graph-captured, compiled decode steps with the kernel (a custom op in the compiled segment, reading the
    position from the device as the graph replays) follow the torch attention's steps."""
    from dsmoe.infer import Engine
    from dsmoe.model import Routing, RoutingRule

    model = small_moa_model()
    idx = torch.randint(0, 512, (batch, 40), device="cuda")
    logits = {}
    for kernel in (False, True):
        engine = Engine(
            model, Routing(RoutingRule("top_k", k=2)), batch=batch, max_len=128, compile=True,
            attention_kernel=kernel,
        )  # fmt: skip
        steps = [engine.prefill(idx[:, :30])]
        steps += [engine.decode(idx[:, t : t + 1]).clone() for t in range(30, 40)]
        logits[kernel] = torch.stack(steps, 1).float()
    assert engine.cuda_graph
    assert share_close(logits[True], logits[False], 1e-2) > 0.9
