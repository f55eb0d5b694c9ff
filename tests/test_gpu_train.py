"""GPU-only: the training fast paths (fused fp32-out router GEMM, SDPA kernel choices, torch.compile'd
blocks, activation checkpointing) equal their plain references within bf16 tolerance (issue 5)."""

from __future__ import annotations

import math

import pytest
import torch

from dsmoe import config as config_lib
from dsmoe.model import attention as attention_lib
from dsmoe.model.attention import CausalSelfAttention, rope_cos_sin
from dsmoe.model.moe import DSMoE, Router
from dsmoe.model.transformer import Block, DecoderLM
from tests.test_model import kept_and_recomputed

pytestmark = pytest.mark.gpu

BF16_TOL = 2e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite values in the fast path"
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def model_cfg(*overrides: str) -> config_lib.ModelConfig:
    base = [
        "model.d_model=256",
        "model.n_layers=2",
        "model.max_seq_len=256",
        "model.vocab_size=512",
        "model.attention.heads=0",
        "model.attention.experts=4",
        "model.attention.heads_per_expert=2",
        "model.attention.kv_heads=2",
        "model.moe.num_experts=8",
        "model.moe.expert_hidden=64",
    ]
    return config_lib.load("configs/tiny.yaml", base + list(overrides)).model


def init_(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    for p in module.parameters():
        torch.nn.init.normal_(p, std=std) if p.dim() >= 2 else torch.nn.init.ones_(p)
    return module


def grads_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def _restore_switches():
    yield
    Router.fused = DSMoE.fused = True
    attention_lib.SDPA_PRIORITY = ()
    torch._dynamo.reset()


def test_fused_router_equals_the_fp32_upcast_router():
    torch.manual_seed(0)
    router = init_(Router(512, 32), std=0.5).to("cuda", torch.bfloat16)
    x = torch.randn(5000, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(5000, 32, device="cuda")
    results = []
    for fused in (False, True):
        Router.fused = fused
        router.zero_grad(set_to_none=True)
        x.grad = None
        probs = router(x)
        assert probs.dtype == torch.float32
        probs.backward(upstream)
        results.append((probs.detach(), x.grad.clone(), router.weight.grad.clone()))
    (p_ref, gx_ref, gw_ref), (p, gx, gw) = results
    assert rel(p, p_ref) < 1e-5  # bf16 products are exact in fp32: only the summation order differs
    assert rel(gx, gx_ref) < 1e-2 and rel(gw, gw_ref) < 1e-2  # the score gradient is rounded to bf16


@pytest.mark.parametrize("compiled", [False, True])
def test_triton_gelu_scale_equals_the_torch_elementwise_path(compiled):
    from dsmoe.model import moe_triton

    torch.manual_seed(0)
    layer = init_(DSMoE(512, 8, 96, "gelu"), std=0.1).to("cuda", torch.bfloat16)  # F = 96: masked tiles
    x = torch.randn(3001, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert moe_triton.available(x, "gelu")
    upstream = torch.randn(3001, 512, device="cuda", dtype=torch.bfloat16)
    results = []
    for fused in (False, True):
        DSMoE.fused = fused
        torch._dynamo.reset()
        run = torch.compile(layer) if compiled else layer
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y, aux = run(x)
        torch.autograd.backward([y, aux.mi_loss], [upstream, torch.ones_like(aux.mi_loss)])
        results.append((y.detach(), x.grad.clone(), grads_of(layer)))
    (y_ref, gx_ref, g_ref), (y, gx, g) = results
    assert rel(y, y_ref) < 1e-2 and rel(gx, gx_ref) < 1e-2
    assert g.keys() == g_ref.keys() == {"router.weight", "w_in", "w_out"}
    for name in g_ref:
        assert rel(g[name], g_ref[name]) < 1e-2, name


needs_flash4 = pytest.mark.skipif(
    attention_lib.flash_attn_4() is None,
    reason="flash-attn-4 not installed (tools/device_wheels.sh fa4-install)",
)


@pytest.mark.parametrize("experts", [0, 4])
@pytest.mark.parametrize(
    "backend, priority",
    [
        ("sdpa", ()),
        ("sdpa", ("CUDNN_ATTENTION",)),
        ("sdpa", ("FLASH_ATTENTION",)),
        ("sdpa", ("EFFICIENT_ATTENTION",)),
        pytest.param("flash4", (), marks=needs_flash4),  # FlashAttention-4, K/V grouped in the kernel
    ],
)
def test_fast_attention_kernels_equal_eager_attention(experts, backend, priority):
    """Forward and backward of each kernel on our (B, H, T, hd) heads, head_dim 64 as DS-MoE-1B."""
    torch.manual_seed(0)
    overrides = ["model.attention.heads=8"] if experts == 0 else []
    cfg = model_cfg("model.d_model=512", f"model.attention.experts={experts}", *overrides)
    attn = init_(CausalSelfAttention(cfg), std=0.03).to("cuda", torch.bfloat16)
    x = torch.randn(2, 256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(256, cfg.head_dim, 10000.0, "cuda")
    upstream = torch.randn(2, 256, 512, device="cuda", dtype=torch.bfloat16)
    outs = []
    for backend_, prio in (("eager", ()), (backend, priority)):
        attn.backend, attention_lib.SDPA_PRIORITY = backend_, prio
        attn.zero_grad(set_to_none=True)
        x.grad = None
        y, _ = attn(x, cos, sin)
        y.backward(upstream)
        outs.append((y.detach(), x.grad.clone(), grads_of(attn)))
    (y_ref, gx_ref, g_ref), (y, gx, g) = outs
    assert rel(y, y_ref) < BF16_TOL and rel(gx, gx_ref) < BF16_TOL
    for name in g_ref:
        assert rel(g[name], g_ref[name]) < BF16_TOL, name


@pytest.mark.parametrize("backend", ["sdpa", pytest.param("flash4", marks=needs_flash4)])
def test_compiled_block_equals_the_fp32_eager_block(backend):
    torch.manual_seed(0)
    cfg = model_cfg("model.d_model=512")  # head_dim 64, as DS-MoE-1B
    ref = init_(Block(cfg), std=0.03).to("cuda")
    ref.attn.backend = "eager"
    fast = init_(Block(cfg)).to("cuda", torch.bfloat16)
    fast.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    fast.attn.backend = backend  # flash4: FA4's custom ops inside the compiled block's graph
    fast.compile()
    from dsmoe.model.moe import TRAINING

    x = torch.randn(4, 256, 512, device="cuda")
    cos, sin = rope_cos_sin(256, cfg.head_dim, 10000.0, "cuda")
    upstream = torch.randn(4, 256, 512, device="cuda")
    results = []
    for block, dtype in ((ref, torch.float32), (fast, torch.bfloat16)):
        xin = x.detach().to(dtype).requires_grad_()  # a leaf of its own for each block
        y, attn_aux, mlp_aux = block(xin, cos, sin, TRAINING)
        torch.autograd.backward(
            [y, attn_aux.mi_loss, mlp_aux.mi_loss],
            [upstream.to(dtype), torch.ones(()).cuda(), torch.ones(()).cuda()],
        )
        results.append(
            (y.detach(), attn_aux.mi_loss.detach(), mlp_aux.mi_loss.detach(), xin.grad, grads_of(block))
        )
    (y_ref, ma_ref, mm_ref, gx_ref, g_ref), (y, ma, mm, gx, g) = results
    assert rel(y, y_ref) < BF16_TOL and rel(gx, gx_ref) < BF16_TOL
    assert math.isclose(ma, ma_ref, rel_tol=1e-2, abs_tol=1e-4) and math.isclose(
        mm, mm_ref, rel_tol=1e-2, abs_tol=1e-4
    )
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert rel(g[name], g_ref[name]) < 3e-2, name


@pytest.mark.parametrize("compiled", [False, True])
def test_activation_checkpointing_equals_keeping_activations(compiled):
    torch.manual_seed(0)
    cfg = model_cfg()
    model = DecoderLM(cfg).to("cuda", torch.bfloat16)
    if compiled:
        for block in model.blocks:
            block.compile()
    idx = torch.randint(0, 512, (4, 256), device="cuda")
    (loss_ref, g_ref), (loss, g) = kept_and_recomputed(model, idx)
    assert math.isclose(loss.float(), loss_ref.float(), rel_tol=1e-3)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert rel(g[name], g_ref[name]) < BF16_TOL, name


@pytest.mark.usefixtures("single_process_group")
def test_compiled_checkpointed_training_follows_the_eager_run(small_cfg, tmp_path):
    from dsmoe.run import run

    common = [
        "train.precision=bf16",
        "train.max_steps=4",
        "train.checkpoint_every=0",
        "train.export_at_end=false",
    ]
    eager = run(small_cfg(*common, run_dir=tmp_path / "eager"))
    fast = run(
        small_cfg(
            *common, "train.compile=true", "train.activation_checkpointing=true", run_dir=tmp_path / "fast"
        )
    )
    assert all(math.isfinite(v) for v in fast.losses)
    for a, b in zip(eager.losses, fast.losses, strict=True):
        assert math.isclose(a, b, rel_tol=2e-2), (eager.losses, fast.losses)
