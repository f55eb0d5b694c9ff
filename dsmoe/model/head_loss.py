"""The LM head and its cross-entropy in one pass over chunks of tokens: no (tokens x vocabulary) logits.

With a real vocabulary (128k-152k ids) the logits of one micro-batch dwarf everything else: 8 x 2048 tokens
x 152k in fp32 are ~10 GB, and their gradient as much again. Here the tokens go through the head a chunk at
a time; each chunk's logits give its loss and, in the same pass, its gradients with respect to the hidden
states and the head's weight (softmax minus the one-hot target), so the backward pass only scales them.
The FLOPs are the plain path's (three GEMMs per chunk); the memory is one chunk of logits (at most
CHUNK_LOGIT_BYTES in fp32, whatever the token count), the hidden states' gradient and the weight's.

Numerics follow the plain path (`lm_head` in the training dtype, then fp32 cross-entropy): each chunk's
logits come out of the GEMM in the training dtype and are raised to fp32 for the softmax (one compiled
kernel on a GPU); the weight's gradient accumulates chunk by chunk in its own dtype (in-place GEMMs, as
Liger Kernel's fused linear cross-entropy does).
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100


CHUNK_LOGIT_BYTES = 2**30  # one chunk's fp32 logits: big GEMMs, few passes over the weight's gradient


def chunk_rows(tokens: int, vocab: int) -> int:
    """Rows per chunk: the most (a power of two) whose fp32 logits fit CHUNK_LOGIT_BYTES, at most all."""
    rows = 2 ** max(0, int(math.log2(max(1, CHUNK_LOGIT_BYTES // (4 * vocab)))))
    return max(1, min(tokens, rows))


def _loss_and_grad(logits_CV, t_C, v_C, scale, want_grad: bool, want_correct: bool):
    """One chunk: the summed loss of its counted rows, their correct count, and d(mean loss)/d(logits) =
    (softmax - onehot) x scale on the counted rows, in the logits' dtype."""
    f_CV = logits_CV.float()
    lse_C = torch.logsumexp(f_CV, dim=-1)
    safe_C = torch.where(v_C, t_C, 0)
    picked_C = f_CV.gather(1, safe_C[:, None]).squeeze(1)
    loss = torch.where(v_C, lse_C - picked_C, 0.0).sum()
    correct = ((f_CV.argmax(-1) == t_C) & v_C).sum() if want_correct else None
    if not want_grad:
        return loss, correct, None
    onehot_CV = torch.arange(f_CV.shape[1], device=f_CV.device)[None, :] == safe_C[:, None]
    g_CV = (torch.exp(f_CV - lse_C[:, None]) - onehot_CV.float()) * (v_C.float() * scale)[:, None]
    return loss, correct, g_CV.to(logits_CV.dtype)


_compiled_loss_and_grad = None


def loss_and_grad(*args):
    """_loss_and_grad, compiled on a GPU (the upcast, softmax, one-hot and scaling in one pass)."""
    global _compiled_loss_and_grad
    if not args[0].is_cuda:
        return _loss_and_grad(*args)
    if _compiled_loss_and_grad is None:
        _compiled_loss_and_grad = torch.compile(_loss_and_grad, dynamic=False)
    return _compiled_loss_and_grad(*args)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, b_V, targets_N, chunk: int, want_correct: bool):
        N = h_ND.shape[0]
        valid_N = targets_N != IGNORE_INDEX
        count = valid_N.sum()
        scale = 1.0 / count.clamp_min(1).float()  # the mean over the targets that count
        grads = any(ctx.needs_input_grad[:3])
        grad_h = torch.empty_like(h_ND) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w_VD) if ctx.needs_input_grad[1] else None
        grad_b = (
            torch.zeros(b_V.shape, dtype=torch.float32, device=b_V.device)
            if ctx.needs_input_grad[2]
            else None
        )
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        correct = torch.zeros((), dtype=torch.long, device=h_ND.device)
        for start in range(0, N, chunk):
            h_CD = h_ND[start : start + chunk]
            t_C, v_C = targets_N[start : start + chunk], valid_N[start : start + chunk]
            logits_CV = h_CD @ w_VD.T if b_V is None else torch.addmm(b_V, h_CD, w_VD.T)
            loss, right, g_CV = loss_and_grad(logits_CV, t_C, v_C, scale, grads, want_correct)
            del logits_CV
            total += loss
            if want_correct:
                correct += right
            if grad_h is not None:
                torch.mm(g_CV, w_VD, out=grad_h[start : start + chunk])
            if grad_w is not None:
                grad_w.addmm_(g_CV.T, h_CD)
            if grad_b is not None:
                grad_b += g_CV.float().sum(0)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.w_dtype = w_VD.dtype
        ctx.mark_non_differentiable(correct)
        return total * scale, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        saved = iter(ctx.saved_tensors)
        grad_h = next(saved) * grad_loss if ctx.has[0] else None  # a 0-dim factor keeps the dtype
        grad_w = next(saved) * grad_loss if ctx.has[1] else None
        grad_b = (next(saved) * grad_loss).to(ctx.w_dtype) if ctx.has[2] else None
        return grad_h, grad_w, grad_b, None, None, None


@torch.compiler.disable  # a loop over chunks: compiled regions around it break the graph here
def linear_cross_entropy(
    h_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    bias_V: torch.Tensor | None = None,
    with_correct: bool = False,
):
    """Mean cross-entropy of `h_ND @ weight_VD.T (+ bias_V)` against `targets_N` (IGNORE_INDEX rows left
    out), without the (N, V) logits. with_correct: also the count of rows whose most probable id is the
    target (the encoder's MLM accuracy)."""
    chunk = chunk_rows(h_ND.shape[0], weight_VD.shape[0])
    loss, correct = _LinearCrossEntropy.apply(h_ND, weight_VD, bias_V, targets_N, chunk, with_correct)
    return (loss, correct) if with_correct else loss
