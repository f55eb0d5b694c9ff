"""The fused LM head + cross-entropy (train.head_loss): the plain path's loss and gradients without logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsmoe.model.head_loss import IGNORE_INDEX, chunk_rows, linear_cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_the_plain_head_and_loss(dtype, bias, monkeypatch):
    from dsmoe.model import head_loss

    torch.manual_seed(0)
    N, D, V = 300, 16, 200
    monkeypatch.setattr(
        head_loss, "CHUNK_LOGIT_BYTES", 40 * 4 * V
    )  # 10 chunks of 32 rows, the last one short
    assert chunk_rows(N, V) == 32
    h = torch.randn(N, D, dtype=dtype, requires_grad=True)
    w = torch.randn(V, D, dtype=dtype, requires_grad=True)
    b = torch.randn(V, dtype=dtype, requires_grad=True) if bias else None
    t = torch.randint(0, V, (N,))
    t[::7] = IGNORE_INDEX
    h.data[:40] = w.data[t[:40].clamp_min(0)] * 4  # some rows predict their target: a non-zero count
    loss, correct = linear_cross_entropy(h, w, t, b, with_correct=True)
    (2.0 * loss).backward()  # the upstream gradient scales everything
    got = [p.grad.clone() for p in (h, w, b) if p is not None]
    for p in (h, w, b):
        if p is not None:
            p.grad = None
    logits = h @ w.T if b is None else torch.addmm(b, h, w.T)
    want = F.cross_entropy(logits.float(), t)
    (2.0 * want).backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss, want, **tol)
    for g, p in zip(got, [p for p in (h, w, b) if p is not None], strict=True):
        assert g.dtype == p.dtype
        torch.testing.assert_close(g, p.grad, **tol)
    counted = t != IGNORE_INDEX
    assert correct.item() == ((logits.argmax(-1) == t) & counted).sum().item() > 0


def test_no_logits_are_kept_for_backward():
    """What autograd keeps for the backward pass is hidden-state and weight sized, never (N, V)."""
    N, D, V = 256, 8, 1024
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    t = torch.randint(0, V, (N,))
    kept = []

    def pack(x):
        kept.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        linear_cross_entropy(h, w, t).backward()
    assert max(kept) <= V * D < N * V
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        F.cross_entropy(h @ w.T, t).backward()
    assert max(kept) == N * V  # the plain path keeps the logits


@pytest.mark.usefixtures("single_process_group")
def test_training_with_the_fused_head_follows_the_same_curve(small_cfg, tmp_path, monkeypatch):
    from dsmoe.model import head_loss
    from dsmoe.run import run
    from dsmoe.train.logging import read_metrics

    calls, fused = [], head_loss._LinearCrossEntropy.apply
    monkeypatch.setattr(head_loss._LinearCrossEntropy, "apply", lambda *a: calls.append(1) or fused(*a))
    curves = {}
    for mode in ("fused", "logits"):
        cfg = small_cfg(
            "train.max_steps=3",
            "train.export_at_end=false",
            f"train.head_loss={mode}",
            run_dir=tmp_path / mode,
        )
        run(cfg)
        curves[mode] = [m["loss"] for m in read_metrics(tmp_path / mode)]
        assert (len(calls) > 0) == (mode == "fused")
        calls.clear()
    torch.testing.assert_close(curves["fused"], curves["logits"], rtol=1e-5, atol=1e-6)


def test_the_encoder_head_fused_equals_its_plain_head():
    from dsmoe.config import load
    from dsmoe.model import EncoderMLM

    cfg = load("configs/tiny_mlm.yaml", ["model.vocab_size=512", "model.n_layers=1"]).model
    torch.manual_seed(0)
    model = EncoderMLM(cfg)
    ids = torch.randint(0, 512, (2, 24))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, ::3] = ids[:, ::3]
    results = {}
    for fused in (True, False):
        model.zero_grad()
        model.fused_head_loss = linear_cross_entropy if fused else None
        out = model(ids, labels=labels)
        out.lm_loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fused] = (out.lm_loss.detach(), out.correct, grads, out.logits)
    assert results[True][3] is None and results[False][3] is not None
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    assert results[True][1] == results[False][1]
    assert results[True][2].keys() == results[False][2].keys()
    for name, g in results[True][2].items():
        torch.testing.assert_close(g, results[False][2][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["ours", "liger"])
def test_gpu_fused_head_at_a_real_vocabulary(kind):
    """bf16 on the GPU at Qwen's vocabulary: the plain path's loss and gradients, in a fraction of its memory."""
    from dsmoe.train.engine import liger_linear_cross_entropy

    if kind == "liger":
        pytest.importorskip("liger_kernel")
    fused = linear_cross_entropy if kind == "ours" else liger_linear_cross_entropy
    torch.manual_seed(0)
    N, D, V = 4096, 2048, 151936
    h = (torch.randn(N, D, device="cuda") * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(V, D, device="cuda") * 0.02).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    t[::9] = IGNORE_INDEX
    results = {}
    for name, fn in (("fused", fused), ("plain", lambda h, w, t: F.cross_entropy((h @ w.T).float(), t))):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn(h, w, t)
        loss.backward()
        torch.cuda.synchronize()
        results[name] = (
            loss.detach(),
            h.grad.clone(),
            w.grad.clone(),
            torch.cuda.max_memory_allocated() - base,
        )
    (lf, hf, wf, mf), (lp, hp, wp, mp) = results["fused"], results["plain"]
    torch.testing.assert_close(lf, lp, rtol=1e-3, atol=1e-3)
    for got, want in ((hf, hp), (wf, wp)):
        error = float((got.float() - want.float()).norm() / want.float().norm())
        assert error < 1e-2, f"{kind}: gradient differs by {error:.1e} (relative norm)"
    logits_bytes = N * V * 4
    assert mf < mp - logits_bytes, f"{kind}: peak {mf / 2**30:.2f} GiB vs plain {mp / 2**30:.2f} GiB"
