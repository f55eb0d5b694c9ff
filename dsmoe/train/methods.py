"""The pure parts of NTNG's efficient-training methods (papers/no_train_no_gain.md): layer stacking, layer
dropping, selective backprop and RHO-loss. The loop decides when each applies and charges every pass it
runs to the RST clock (dsmoe/train/budget.py); nothing here keeps state between steps.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.model.transformer import DecoderLM

# --- Layer stacking (Gong et al. 2019 "progressive stacking"; NTNG's doubling variant) ---------------------


def stack_layers(model: DecoderLM) -> list[int]:
    """Double the depth in place: blocks L..2L-1 become copies of blocks 0..L-1 (new block L + i copies
    block i), each with its own parameters. Returns the source index of every block of the new model.

    What is preserved, and what is not: every copied block computes exactly the function of its source
    (same weights, so block L + i maps any input to what block i maps it to), and the new model's blocks
    run the old stack twice over: h_2L = S(S(h_0)), S being the old L blocks. The model's output is *not*
    preserved (unlike MSG growth, dsmoe/growth.py): stacking assumes the top half starts from a useful
    copy, not from a function-preserving one. Embedding, final norm and head are unchanged.
    """
    old = len(model.blocks)
    copies = [copy.deepcopy(block) for block in model.blocks]
    model.blocks.extend(copies)
    model.cfg.n_layers = 2 * old
    return list(range(old)) + list(range(old))


_BLOCK = re.compile(r"^(?P<prefix>(?:[^/]+/)?)blocks\.(?P<index>\d+)\.(?P<rest>.+)$")


def stack_state(state: dict[str, torch.Tensor], old_layers: int) -> dict[str, torch.Tensor]:
    """The model/optimizer state of the stacked model from the old one's, as NTNG copies it: new block
    L + i takes block i's values (master weights and every optimizer moment, for names 'blocks.i.x' and
    '<moment>/blocks.i.x', the format of dsmoe.train.checkpoint.full_state). Other names pass through."""
    out = dict(state)
    for name, value in state.items():
        match = _BLOCK.match(name)
        if match and int(match["index"]) < old_layers:
            out[f"{match['prefix']}blocks.{int(match['index']) + old_layers}.{match['rest']}"] = value.clone()
    return out


def stacked_layers_at(fraction: float, final_layers: int, double_at: Sequence[float]) -> int:
    """Active depth at budget fraction `fraction`: final_layers / 2^d with d the doublings still ahead
    (each doubling happens when the spent fraction reaches one of `double_at`)."""
    ahead = sum(1 for f in double_at if fraction < f)
    if final_layers % (2 ** len(double_at)):
        raise ValueError(f"{final_layers} layers cannot be halved {len(double_at)} times")
    return final_layers // 2**ahead


# --- Layer dropping (progressive stochastic depth: PLD, Zhang & He 2020, as NTNG runs it) --------------------


@dataclass(frozen=True, kw_only=True)
class LayerDropSchedule:
    """Keep probability of each block at each point of the budget.

    theta(f) = theta_bar + (1 - theta_bar) * exp(-gamma * f) falls from 1 towards theta_bar as the budget
    fraction f is spent (NTNG: gamma = gamma_factor / T with t and T in RST seconds, i.e. gamma * f here).
    The drop probability grows linearly with depth: block i of L (0-based) is dropped with probability
    (1 - theta(f)) * (i + 1) / L, so the first block is kept most often and the last is dropped with
    probability at most 1 - theta_bar. Defaults are NTNG's (arch.layer_drop: max_theta 0.5, gamma_factor
    100): theta is within 0.01 of theta_bar after 4% of the budget. Blocks are skipped, not rescaled.
    """

    theta_bar: float = 0.5
    gamma: float = 100.0

    def theta(self, fraction: float) -> float:
        return self.theta_bar + (1.0 - self.theta_bar) * math.exp(-self.gamma * fraction)

    def keep_probs(self, fraction: float, n_layers: int) -> list[float]:
        drop = 1.0 - self.theta(fraction)
        return [1.0 - drop * (i + 1) / n_layers for i in range(n_layers)]


def sample_active_layers(keep_probs: Sequence[float], generator: torch.Generator | None = None) -> list[int]:
    """Blocks that run this step: block i independently with probability keep_probs[i]. Every rank must
    draw the same set (seed the generator alike): a dropped block has no gradient to reduce."""
    draws = torch.rand(len(keep_probs), generator=generator)
    return [i for i, (u, p) in enumerate(zip(draws.tolist(), keep_probs, strict=True)) if u < p]


@contextmanager
def run_blocks(model: DecoderLM, indices: Sequence[int]) -> Iterator[DecoderLM]:
    """Within the context the model's forward runs only blocks `indices` (in that order); a skipped block
    is the identity, x -> x, as in stochastic depth. Wrap the forward only: backward needs no module.

    DecoderLM.forward iterates model.blocks; we swap in a ModuleList of the active blocks (the same module
    objects, so DeepSpeed's parameters and hooks are untouched) and put the full list back on exit.
    """
    full = model.blocks
    if any(not 0 <= i < len(full) for i in indices):
        raise ValueError(f"run_blocks: indices {list(indices)} out of range for {len(full)} blocks")
    model.blocks = nn.ModuleList([full[i] for i in indices])
    try:
        yield model
    finally:
        model.blocks = full


def release_dropped_grads(model: DecoderLM, indices: Sequence[int]) -> None:
    """Give the blocks outside `indices` no gradient (None) before the optimizer step, so they are not
    updated. Needed because DeepSpeed's gradient reduction fills a missing gradient with zeros, and a zero
    gradient still moves a parameter under AdamW (stale moments, weight decay), Lion and Sophia."""
    keep = set(indices)
    for i, block in enumerate(model.blocks):
        if i not in keep:
            for p in block.parameters():
                p.grad = None


# --- Batch selection: selective backprop (Jiang et al. 2019) and RHO-loss (Mindermann et al. 2022) ---------


def per_sequence_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token cross-entropy of each sequence, in fp32 (the LM loss before the batch mean)."""
    B, T, V = logits_BTV.shape
    loss_BT = F.cross_entropy(logits_BTV.float().reshape(B * T, V), targets_BT.reshape(-1), reduction="none")
    return loss_BT.view(B, T).mean(dim=1)


def selected_count(batch: int, fraction: float) -> int:
    """round(fraction x batch), refused unless it is exact and at least 1: the configured fraction is what
    gets gradient, not an approximation of it."""
    k = round(fraction * batch)
    if not 0.0 < fraction <= 1.0 or k < 1 or not math.isclose(k, fraction * batch, rel_tol=1e-9):
        raise ValueError(
            f"selecting a fraction {fraction} of {batch} sequences must give a whole number >= 1; choose the "
            f"forward batch as the training batch / fraction"
        )
    return k


def select_highest(scores_B: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (ascending) of the top `fraction` of scores; ties broken by index."""
    k = selected_count(scores_B.numel(), fraction)
    order = torch.sort(scores_B.detach().float(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def selective_backprop(
    per_sequence_loss_B: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective backprop: of a forward batch, backpropagate only the highest-loss `fraction`.

    Returns (selected indices, the mean loss over only those). Backward through that loss gives gradient to
    exactly the selected sequences. NTNG scores the batch in a no-grad forward pass (charged as a 'forward'
    entry) and trains on the selected sequences in a normal step; this function serves both forms.
    """
    indices = select_highest(per_sequence_loss_B, fraction)
    return indices, per_sequence_loss_B[indices].mean()


def reducible_loss(train_loss_B: torch.Tensor, irreducible_loss_B: torch.Tensor) -> torch.Tensor:
    """RHO-loss's score: training loss minus irreducible loss, the loss of a model trained on held-out
    data (Mindermann et al. 2022): high for points that are learnable, not yet learnt, and not noise."""
    if train_loss_B.shape != irreducible_loss_B.shape:
        raise ValueError(
            f"loss shapes differ: {tuple(train_loss_B.shape)} vs {tuple(irreducible_loss_B.shape)}"
        )
    return train_loss_B.detach().float() - irreducible_loss_B.detach().float().to(train_loss_B.device)


def rho_select(
    train_loss_B: torch.Tensor, irreducible_loss_B: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RHO-loss selection: (indices of the top `fraction` by reducible loss, the mean training loss over them)."""
    indices = select_highest(reducible_loss(train_loss_B, irreducible_loss_B), fraction)
    return indices, train_loss_B[indices].mean()
