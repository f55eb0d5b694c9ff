"""Lion and Sophia-G, the efficient optimizers NTNG compares with AdamW (papers/no_train_no_gain.md).

Both are plain torch optimizers, so DeepSpeed takes them as client optimizers and still owns the step
(ZeRO partitioning, bf16 master weights, clipping, skipping): pass one to `deepspeed.initialize` as
dsmoe/train/engine.py passes AdamW. Like that AdamW, each honours `overflow`: set, step() leaves parameters
and state untouched (DeepSpeed's plain fp32 path reads the same attribute to count a skipped step).
Their per-parameter state is torch's AdamW layout where it can be: a float32 'step' tensor and the
tensors named in `moments` (what dsmoe.train.checkpoint saves per parameter; Adam's are exp_avg and
exp_avg_sq).

Lion's update is the maintained `lion-pytorch` package's (lucidrains; its Triton variant, `use_triton`, is
a next step once tested on a GPU); DeepSpeed's own FusedLion needs a compiled op. Sophia's authors publish
no package (`sophia-opt` on PyPI is a community copy, last released 2024), so SophiaG is ours. Both are
tested against the update rules (tests/test_methods.py).
"""

from __future__ import annotations

import lion_pytorch
import torch
import torch.nn.functional as F


class Lion(lion_pytorch.Lion):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2), the update of
    the maintained `lion-pytorch` package:

        c = beta1 * m + (1 - beta1) * g
        theta = theta * (1 - lr * weight_decay) - lr * sign(c)
        m = beta2 * m + (1 - beta2) * g

    with what DeepSpeed and our checkpoints need around it: `overflow` (a skipped step leaves parameters
    and state alone) and a float32 'step' per parameter beside its 'exp_avg', as torch's AdamW keeps.
    Every coordinate moves by exactly lr (the sign), so the paper's lr is 3-10x smaller than AdamW's and
    its weight decay 3-10x larger, keeping lr x weight_decay about the same.
    """

    overflow = False
    moments = ("exp_avg",)

    def __init__(
        self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0
    ):
        if lr <= 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"Lion: need lr > 0, weight_decay >= 0, betas in [0, 1); got {lr}, {weight_decay}, {betas}"
            )
        super().__init__(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)

    @torch.no_grad()
    def step(self, closure=None):
        if self.overflow:
            if closure is None:
                return None
            with torch.enable_grad():
                return closure()
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:  # the package keeps no step count; our checkpoints read one
                    state = self.state[p]
                    state["step"] = state.get("step", torch.tensor(0.0)) + 1
        return loss


class SophiaG(torch.optim.Optimizer):
    """Sophia-G (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer", Algorithm 3 with
    the Gauss-Newton-Bartlett estimator), in the form of the authors' code:

        m = beta1 * m + (1 - beta1) * g                              every step
        theta = theta * (1 - lr * weight_decay)
        theta = theta - lr * sign(m) * min(|m| / (rho * B * h + eps), 1)
        h = beta2 * h + (1 - beta2) * g_hat * g_hat                   every k steps (a "Hessian pass")

    g_hat is the gradient of the mean cross-entropy against labels *sampled* from the model's own softmax
    (`sample_gnb_targets`) over a batch of B tokens; B * g_hat^2 is the GNB estimate of the Gauss-Newton
    diagonal, so rho * B * h is the paper's gamma * h_t and the min(., 1) is its per-coordinate clip to 1
    (step size at most lr). Before the first Hessian pass h = 0 and every coordinate moves by lr * sign(m).

    The loop owns the schedule of Hessian passes (`hessian_interval` is stored for it to read): after the
    GNB backward, either call `update_hessian()` (reads p.grad now: DeepSpeed's plain fp32 path, where the
    engine's parameters are the optimizer's), or set `hessian_pass = True` and step the engine: the next
    step() then updates h from the gradients DeepSpeed hands it (reduced over ranks, unscaled, in its fp32
    partitions under ZeRO and bf16) and leaves the parameters alone.
    """

    overflow = False
    moments = ("exp_avg", "hessian")

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        gnb_batch_tokens: int = 1,
        hessian_interval: int = 10,
        eps: float = 1e-15,
    ):
        if lr < 0 or weight_decay < 0 or rho <= 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"SophiaG: need lr >= 0, weight_decay >= 0, rho > 0, betas in [0, 1); got {lr}, {weight_decay}, "
                f"{rho}, {betas}"
            )
        if gnb_batch_tokens < 1 or hessian_interval < 1:
            raise ValueError("SophiaG: gnb_batch_tokens and hessian_interval must be positive")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps)
        super().__init__(params, defaults)
        self.gnb_batch_tokens = gnb_batch_tokens
        self.hessian_interval = hessian_interval
        self.hessian_pass = False

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)  # parameter updates (Hessian passes not counted)
            state["exp_avg"] = torch.zeros_like(p)
            state["hessian"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def update_hessian(self) -> None:
        """h = beta2 * h + (1 - beta2) * g_hat^2 from the gradients held now (those of the GNB loss)."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.to(p.dtype)
                self._state(p)["hessian"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.overflow:
            return loss
        if self.hessian_pass:
            self.hessian_pass = False
            self.update_hessian()
            return loss
        for group in self.param_groups:
            lr, beta1, wd = group["lr"], group["betas"][0], group["weight_decay"]
            scale = group["rho"] * self.gnb_batch_tokens
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["step"] += 1
                m = state["exp_avg"].mul_(beta1).add_(p.grad.to(p.dtype), alpha=1 - beta1)
                ratio = (m.abs() / (scale * state["hessian"] + group["eps"])).clamp_(max=1.0)
                p.mul_(1 - lr * wd).addcmul_(m.sign(), ratio, value=-lr)
        return loss


def sample_gnb_targets(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Labels y_hat ~ softmax(logits) per position, for Sophia-G's GNB loss CE(logits, y_hat).

    logits: (..., V); returns (...) int64 on the logits' device. Sampled by inverting the CDF (one uniform
    per position, searchsorted in the cumulative probabilities): exact, and on CPU 10x faster than
    torch.multinomial at (2048, 4096). The expected square of the GNB loss's gradient is the Gauss-Newton
    diagonal (tests/test_methods.py checks it on softmax regression).
    """
    probs_NV = F.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1)
    cdf_NV = probs_NV.cumsum(dim=-1)
    u_N1 = torch.rand(cdf_NV.shape[0], 1, generator=generator, device=cdf_NV.device) * cdf_NV[:, -1:]
    targets_N = torch.searchsorted(cdf_NV, u_N1, right=True).squeeze(1)
    return targets_N.clamp_(max=logits.shape[-1] - 1).view(logits.shape[:-1])


def build_optimizer(
    name: str, param_groups: list[dict], lr: float, betas: tuple[float, float], **kw
) -> torch.optim.Optimizer:
    """The optimizer `name` (lion | sophia) over `param_groups` (dsmoe.train.engine.param_groups' output:
    their per-group weight_decay is kept)."""
    if name == "lion":
        return Lion(param_groups, lr=lr, betas=betas, **kw)
    if name == "sophia":
        return SophiaG(param_groups, lr=lr, betas=betas, **kw)
    raise ValueError(f"unknown optimizer {name!r}: lion | sophia (AdamW is dsmoe.train.engine's)")
