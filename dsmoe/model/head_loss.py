"""The LM head and its cross-entropy in one pass over chunks of tokens: no (tokens x vocabulary) logits.

With a real vocabulary (128k-152k ids) the logits of one micro-batch dwarf everything else: 8 x 2048 tokens
x 152k in fp32 are ~10 GB, and their gradient as much again. Here the tokens go through the head a chunk at
a time; each chunk's logits give its loss and, in the same pass, its gradients with respect to the hidden
states and the head's weight (softmax minus the one-hot target), so the backward pass only scales them.
The FLOPs are the plain path's (two GEMMs forward-side instead of one forward and two backward); the memory
is one chunk of logits, the hidden states' gradient and an fp32 gradient of the weight. Chunks hold about as
many logits as the hidden states hold numbers (tokens / ceil(V / D) rows each), as Liger Kernel's fused
linear cross-entropy sizes them.

Numerics match the plain path (`lm_head` in the training dtype, then fp32 cross-entropy): each chunk's
logits come out of the GEMM in the training dtype and are raised to fp32 for the softmax; the weight's
gradient sums its chunks in fp32.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100


def chunk_rows(tokens: int, vocab: int, hidden: int) -> int:
    """Rows per chunk: about tokens x hidden logits per chunk, a power of two."""
    chunks = math.ceil(vocab / hidden)
    return max(1, 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / chunks)))))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, b_V, targets_N, chunk: int, want_correct: bool):
        N = h_ND.shape[0]
        valid_N = targets_N != IGNORE_INDEX
        count = valid_N.sum()
        scale = 1.0 / count.clamp_min(1).float()  # the mean over the targets that count
        grads = any(ctx.needs_input_grad[:3])
        grad_h = torch.empty_like(h_ND) if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
            if ctx.needs_input_grad[1]
            else None
        )
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
            # the training dtype's GEMM, then fp32, as the plain path
            logits_CV = (h_CD @ w_VD.T if b_V is None else torch.addmm(b_V, h_CD, w_VD.T)).float()
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            safe_C = torch.where(v_C, t_C, 0)
            picked_C = logits_CV.gather(1, safe_C[:, None]).squeeze(1)
            total += torch.where(v_C, lse_C - picked_C, 0.0).sum()
            if want_correct:
                correct += ((logits_CV.argmax(-1) == t_C) & v_C).sum()
            if grads:  # d(mean loss)/d(logits) = (softmax - onehot) / count, on the counted rows
                g_CV = logits_CV.sub_(lse_C[:, None]).exp_()
                g_CV[torch.arange(len(t_C), device=t_C.device), safe_C] -= 1.0
                g_CV.mul_((v_C.float() * scale)[:, None])
                g_CV = g_CV.to(h_ND.dtype)
                if grad_h is not None:
                    grad_h[start : start + chunk] = g_CV @ w_VD
                if grad_w is not None:
                    grad_w += (g_CV.T @ h_CD).float()
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
        grad_w = (next(saved) * grad_loss).to(ctx.w_dtype) if ctx.has[1] else None
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
    chunk = chunk_rows(h_ND.shape[0], weight_VD.shape[0], weight_VD.shape[1])
    loss, correct = _LinearCrossEntropy.apply(h_ND, weight_VD, bias_V, targets_N, chunk, with_correct)
    return (loss, correct) if with_correct else loss

