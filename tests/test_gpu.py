"""GPU-only checks, run on the lent H100: bf16 DS-MoE numerics and a training run over NCCL."""

from __future__ import annotations

import math

import pytest
import torch

from dsmoe.model.moe import DSMoE, RoutingRule
from tests.test_moe import reference_moe

pytestmark = pytest.mark.gpu


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_dense_moe_bf16_on_cuda_matches_fp64_reference():
    torch.manual_seed(0)
    layer = DSMoE(256, 16, 64, "gelu")
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(4096, 256)
    y_ref = reference_moe(layer.double(), x.double())
    layer = layer.to("cuda", torch.bfloat16)
    y, _ = layer(x.to("cuda", torch.bfloat16))
    assert relative_error(y.cpu(), y_ref) < 1e-2
    y_sparse, _ = layer(x.to("cuda", torch.bfloat16), RoutingRule("top_k", k=16))
    assert relative_error(y_sparse.cpu(), y_ref) < 1e-2


@pytest.mark.usefixtures("single_process_group")
def test_training_runs_on_cuda_in_bf16(small_cfg, tmp_path):
    from dsmoe.run import run

    result = run(small_cfg("train.precision=bf16", "train.max_steps=6"))
    assert next(result.engine.module.parameters()).device.type == "cuda"
    assert all(math.isfinite(loss) for loss in result.losses) and result.losses[-1] < result.losses[0]
    assert result.summary["results"][0]["perplexity"] < 600


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_gemm_experts_equal_the_portable_loop(activation):
    from dsmoe.model.moe import grouped_expert_forward, grouped_gemm_available, select_experts

    torch.manual_seed(0)
    layer = DSMoE(256, 16, 64, activation)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    layer = layer.to("cuda", torch.bfloat16)
    x = torch.randn(3000, 256, device="cuda", dtype=torch.bfloat16)
    assert grouped_gemm_available(x), "the H100 path should use torch._grouped_mm"
    keep = select_experts(layer.router(x), RoutingRule("top_k", k=4))
    _, token_idx = keep.T.nonzero(as_tuple=True)
    x_sorted, counts = x[token_idx], keep.sum(0)
    grouped = grouped_expert_forward(x_sorted, counts, layer.w_in, layer.w_out, activation, grouped_gemm=True)
    looped = grouped_expert_forward(x_sorted, counts, layer.w_in, layer.w_out, activation, grouped_gemm=False)
    layer = layer.double()
    reference = grouped_expert_forward(x_sorted.double(), counts, layer.w_in, layer.w_out, activation)
    assert relative_error(grouped.cpu(), reference.cpu()) < 1e-2
    assert relative_error(looped.cpu(), reference.cpu()) < 1e-2


def test_sparse_training_backward_through_grouped_gemm():
    """SMoE training on Hopper runs its top-K experts through torch._grouped_mm: gradients equal the fp64
    loop's within bf16 tolerance."""
    torch.manual_seed(0)
    layer = DSMoE(256, 16, 64, "gelu", train_top_k=2)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    layer = layer.to("cuda", torch.bfloat16)
    reference = DSMoE(256, 16, 64, "gelu", train_top_k=2).double()  # the same bf16 values, in fp64
    reference.load_state_dict({k: v.double().cpu() for k, v in layer.state_dict().items()})
    x = torch.randn(2048, 256).bfloat16()
    y, aux = layer(x.cuda())
    (y.float().square().mean() + aux.balance_loss).backward()
    y_ref, aux_ref = reference(x.double())
    (y_ref.square().mean() + aux_ref.balance_loss).backward()
    assert relative_error(y.float().cpu(), y_ref) < 2e-2
    for (name, p), q in zip(layer.named_parameters(), reference.parameters(), strict=True):
        assert relative_error(p.grad.float().cpu(), q.grad) < 5e-2, name
