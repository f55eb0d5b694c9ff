"""GPU-only checks of the encoder's fast paths (issue 7) against the plain references: the Triton ALiBi
varlen kernels against varlen_eager (output and gradients, fresh random inputs, lengths that do not fill a
tile), the whole EncoderMLM on the 'triton' backend against 'eager', and the compiled MLM head and
compiled blocks against the eager model."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from dsmoe.model import build
from dsmoe.model.attention import VARLEN_BACKENDS, Varlen, plan_attention
from tests.test_encoder import encoder_cfg

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def attention_and_grads(backend, varlen, qkv, grad_out, heads):
    qkv = qkv.detach().clone().requires_grad_(True)
    plan = plan_attention(backend, varlen, heads, qkv.dtype)
    out = VARLEN_BACKENDS[backend](*qkv.unbind(1), plan)
    out.backward(grad_out)
    return out.detach(), qkv.grad


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize(
    "lengths",
    [[128, 64, 1, 37, 128, 100], [512, 256, 300, 5, 511, 64], [65, 129, 191]],
    ids=["128", "512", "odd"],
)
@pytest.mark.parametrize("config", ["default", "large"])
def test_triton_varlen_alibi_matches_eager(lengths, head_dim, config):
    from dsmoe.model import alibi_triton

    saved = dict(alibi_triton.CONFIG)
    if config == "large":
        alibi_triton.CONFIG.update(fwd=(128, 64, 8), bwd=(64, 128, 8))
    try:
        torch.manual_seed(len(lengths) + head_dim)
        S, H = max(lengths), 12
        mask = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
        varlen = Varlen.from_mask(mask.to(CUDA))
        T = len(varlen.indices)
        qkv = torch.randn(T, 3, H, head_dim, device=CUDA, dtype=torch.bfloat16)
        grad_out = torch.randn(T, H, head_dim, device=CUDA, dtype=torch.bfloat16)
        out, grad = attention_and_grads("triton", varlen, qkv, grad_out, H)
        out_ref, grad_ref = attention_and_grads("eager", varlen, qkv.float(), grad_out.float(), H)
    finally:
        alibi_triton.CONFIG.update(saved)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert relative_error(out, out_ref) < 1e-2
    for i in range(3):  # dq, dk, dv
        assert relative_error(grad[:, i], grad_ref[:, i]) < 2e-2


@pytest.mark.parametrize("shape", [(1000, 3072), (37, 48)])
def test_triton_geglu_matches_torch(shape):
    from dsmoe.model.alibi_triton import geglu
    from dsmoe.model.mlp import activate

    T, inner = shape
    h = torch.randn(T, 2 * inner, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(T, inner, device=CUDA, dtype=torch.bfloat16)
    y = geglu(h)
    (dh,) = torch.autograd.grad(y, h, dy)
    h64 = h.detach().double().requires_grad_(True)
    y_ref = activate(h64, "geglu")
    (dh_ref,) = torch.autograd.grad(y_ref, h64, dy.double())
    assert relative_error(y, y_ref) < 1e-2 and relative_error(dh, dh_ref) < 1e-2


def mixed_batch(B, S, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (B, S), generator=gen)
    lengths = torch.randint(1, S + 1, (B,), generator=gen)
    lengths[0] = S
    mask = torch.arange(S)[None, :] < lengths[:, None]
    labels = torch.where((torch.rand(B, S, generator=gen) < 0.3) & mask, ids, -100)
    return ids.to(CUDA), mask.to(CUDA), labels.to(CUDA)


def model_loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(*batch)
    out.loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return out.logits.detach().float(), out.loss.detach().float(), grads


@pytest.mark.parametrize("fast", ["triton", "triton+compile"])
def test_encoder_fast_paths_match_eager_model(fast):
    """Same weights, same batch (rows of random lengths): loss, masked logits and every gradient of the fp32
    model on the fast path match the eager reference (attention 'eager', nothing compiled)."""
    extra = ["model.dropout=0.0", "model.max_seq_len=96", "model.mlp=dense", "model.moe.activation=geglu"]
    torch.manual_seed(0)
    ref = build(encoder_cfg(*extra, "model.attention.backend=eager").model).to(CUDA).train()
    torch.manual_seed(0)
    model = (
        build(encoder_cfg(*extra, "model.attention.backend=triton", "model.geglu_kernel=triton").model)
        .to(CUDA)
        .train()
    )
    assert type(model.blocks[0].mlp).__name__ == "TritonGeGLUMLP"
    model.load_state_dict(ref.state_dict())
    if fast.endswith("compile"):
        for block in model.blocks:
            block.compile(dynamic=True)
        model.compile_head()
    for seed in range(2):  # a second batch of other lengths: no stale plan or compiled shape
        batch = mixed_batch(6, 40 + 7 * seed, 180, seed)
        logits, loss, grads = model_loss_and_grads(model, batch)
        logits_ref, loss_ref, grads_ref = model_loss_and_grads(ref, batch)
        assert torch.isfinite(grads).all()
        assert abs(loss.item() - loss_ref.item()) < 2e-3 * abs(loss_ref.item())
        assert relative_error(logits, logits_ref) < 5e-3  # fp32 model: the kernels' dots run in tf32
        assert relative_error(grads, grads_ref) < 1e-2


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_encoder_step_with_host_mask_never_waits_for_the_gpu(compiled):
    """The Trainer keeps the attention mask and labels on the host (pinned): the step's forward and backward
    then run without one host sync (torch.cuda.set_sync_debug_mode('error') raises on any), with the same loss,
    logits and gradients, bit for bit, as with everything on the GPU (which syncs: checked too)."""
    extra = ["model.dropout=0.0", "model.max_seq_len=96", "model.attention.backend=triton"]
    torch.manual_seed(0)
    model = build(encoder_cfg(*extra, "model.geglu_kernel=triton").model).to(CUDA).train()
    if compiled:
        for block in model.blocks:
            block.compile(dynamic=True)
        model.compile_head()
    for seed in range(3):  # the first batch compiles; later ones are the steady state the check is about
        ids, mask, labels = mixed_batch(6, 40 + 7 * seed, 180, seed)
        host = (ids, mask.cpu().pin_memory(), labels.cpu().pin_memory())
        logits_ref, loss_ref, grads_ref = model_loss_and_grads(model, (ids, mask, labels))
        torch.cuda.synchronize()
        if seed > 0:
            with pytest.raises(RuntimeError, match="synchroniz"), sync_debug("error"):
                model(ids, mask, labels)  # the check would catch a sync: the GPU mask has them
        with sync_debug("error" if seed > 0 else "default"):
            model.zero_grad(set_to_none=True)
            out = model(*host)
            out.loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        assert torch.equal(out.loss.detach().float(), loss_ref)
        assert torch.equal(out.logits.detach().float(), logits_ref)
        assert (
            relative_error(grads, grads_ref) < 1e-6
        )  # same kernels; the index backward may add in any order


@contextlib.contextmanager
def sync_debug(mode: str):
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.usefixtures("single_process_group")
def test_launcher_compiled_triton_encoder_follows_the_eager_run(tmp_path, cache_dir):
    """train.compile on the encoder (dynamic-shape blocks + compiled MLM head, dsmoe/train/engine.py) with the
    Triton kernels trains like the eager SDPA model through the real loop."""
    from dsmoe.run import run
    from tests.test_encoder_train import tiny_mlm

    common = [
        "train.precision=bf16",
        "train.max_steps=4",
        "train.warmup_steps=1",
        "train.checkpoint_every=0",
        "train.export_at_end=false",
    ]
    eager = run(tiny_mlm(tmp_path / "eager", cache_dir, *common, "model.attention.backend=sdpa"))
    fast = run(
        tiny_mlm(
            tmp_path / "fast",
            cache_dir,
            *common,
            "train.compile=true",
            "model.attention.backend=triton",
            "model.geglu_kernel=triton",
        )
    )
    assert all(math.isfinite(v) for v in fast.losses)
    for a, b in zip(eager.losses, fast.losses, strict=True):
        assert math.isclose(a, b, rel_tol=2e-2), (eager.losses, fast.losses)
