"""Held-out evaluation: one fixed validation sample and one evaluator, for training and for exported models.

The sample is chosen once from the run's config (the first train.eval_tokens of the held-out works, or the
first validation sequences of an indexed blend) and every evaluation reads the same rows: the periodic
validation during training, the end-of-run report on the export, and dsmoe eval. The evaluator
reports the token-weighted mean next-token loss overall and per source (a blend's prefixes), and how much of
the model each routing rule ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dsmoe import config as config_lib
from dsmoe.data.corpus import load_corpus
from dsmoe.data.sampler import eval_windows
from dsmoe.data.tokenizer import load_tokenizer
from dsmoe.data.tokens import open_pretokenized
from dsmoe.model import TRAINING, Routing

HELD_OUT = "held-out"  # the one source of a corpus without a blend


@dataclass
class HeldOut:
    """The fixed validation sample: rows of seq_len + 1 tokens and the source each row came from."""

    rows: torch.Tensor
    """(N, seq_len + 1) int64 token ids: inputs are rows[:, :-1], next-token targets rows[:, 1:]."""
    source: torch.Tensor
    """(N,) int64 index into source_names."""
    source_names: list[str]

    @property
    def tokens(self) -> int:
        return self.rows.shape[0] * (self.rows.shape[1] - 1)

    def token_stream(self) -> np.ndarray:
        """The rows as one token array (consecutive rows of a token corpus share their boundary token)."""
        return torch.cat([self.rows[:, :-1].reshape(-1), self.rows[-1, -1:]]).numpy()

    def first(self, max_tokens: int) -> HeldOut:
        """The sample cut to its first max_tokens tokens (whole rows, at least one; 0: all)."""
        if not max_tokens:
            return self
        n = max(1, max_tokens // (self.rows.shape[1] - 1))
        return HeldOut(self.rows[:n], self.source[:n], self.source_names)

    @classmethod
    def from_tokens(cls, tokens, seq_len: int, max_tokens: int = 0, name: str = HELD_OUT) -> HeldOut:
        """Consecutive non-overlapping windows over a held-out token array, in order."""
        windows = eval_windows(tokens, seq_len, max_tokens)
        rows = torch.stack([torch.cat([inputs, targets[-1:]]) for inputs, targets in windows])
        return cls(rows, torch.zeros(len(windows), dtype=torch.long), [name])


def run_held_out(cfg: config_lib.Config, val_tokens, splits) -> HeldOut:
    """The fixed validation sample of a training run: windows of its held-out tokens, or the first validation
    sequences of its indexed blend (`splits`, dsmoe.data.indexed.IndexedSplits)."""
    if splits is None:
        return HeldOut.from_tokens(val_tokens, cfg.data.seq_len, cfg.train.eval_tokens)
    from dsmoe.data.indexed import validation_rows

    rows, source = validation_rows(splits, validation_samples(cfg))
    return HeldOut(rows, source, splits.source_names)


class PeriodicValidation:
    """train.eval_every: held-out loss of the training model on the fixed sample, on every rank (the decoder's
    rows shared over the data-parallel ranks; the encoder's masked batches, data parallel only, on each)."""

    def __init__(self, cfg: config_lib.Config, held_out: HeldOut, tokenizer_vocab: int, dims):
        self.cfg, self.held_out, self.dims = cfg, held_out, dims
        self.mlm_batches = None
        if cfg.model.is_encoder:
            from dsmoe.data.mlm import eval_batches

            self.mlm_batches = eval_batches(
                held_out.token_stream(),
                cfg.data.seq_len,
                cfg.mlm.eval_probability,
                tokenizer_vocab,
                batch_size=cfg.train.micro_batch_size,
                seed=cfg.train.seed,
            )

    def sparsity_curve(self, model) -> list[dict]:
        """Held-out perplexity of the training model under top-K (K = 1, 2, N/4, N/2) and the threshold rule
        (eps = 0.25, 0.48, 1), against the share of MLP experts each keeps: the curve DS-MoE is judged by."""
        from dsmoe.model import RoutingRule

        n = self.cfg.model.moe.num_experts
        rules = [
            ("top-K", f"K={k}", RoutingRule("top_k", k=k))
            for k in sorted({1, 2, n // 4, n // 2})
            if 0 < k < n
        ]
        rules += [
            ("threshold", f"eps={eps:g}", RoutingRule("threshold", eps=eps)) for eps in (0.25, 0.48, 1.0)
        ]
        points = []
        for family, label, rule in rules:
            r = evaluate(model, self.held_out, Routing(mlp=rule), self.cfg.train.micro_batch_size, self.dims)
            points.append(
                {"family": family, "label": label, "active": r.expert_active_fraction, "ppl": r.perplexity}
            )
        return points

    def run(self, model, step: int, logger) -> dict:
        if self.mlm_batches is not None:
            result = mlm_loss(model, self.mlm_batches, TRAINING, self.cfg.data.seq_len)
            model.train()
            figures = {
                "val_loss": result.loss,
                "val_ppl": result.perplexity,
                "val_mlm_accuracy": result.accuracy,
            }
        else:
            result = evaluate(model, self.held_out, TRAINING, self.cfg.train.micro_batch_size, self.dims)
            figures = result.metrics()
            if self.cfg.train.eval_sparsity and self.cfg.model.mlp == "moe":
                figures["val_sparsity"] = self.sparsity_curve(model)
        if logger is not None:
            sources = {
                k.split("/", 1)[1]: v for k, v in figures.items() if k.startswith("val_ppl/") and "/" in k
            }
            logger.write(
                f"step {step}: held-out loss {figures['val_loss']:.4f}, perplexity {figures['val_ppl']:.2f}"
                + (" (" + ", ".join(f"{k} {v:.2f}" for k, v in sources.items()) + ")" if sources else "")
            )
        return figures


def validation_samples(cfg: config_lib.Config) -> int:
    """Rows of the fixed sample of an indexed blend: train.eval_tokens in whole sequences."""
    return max(1, math.ceil(cfg.train.eval_tokens / cfg.data.seq_len))


def held_out_tokens(cfg: config_lib.Config, tokenizer_path: Path):
    """The validation works of the model's corpus, tokenised with the model's own tokenizer (corpora of token
    arrays; an indexed blend's held-out sample is dsmoe.evaluation.held_out_set)."""
    if cfg.data.corpus == "tokens":
        return open_pretokenized(cfg.data).val
    if cfg.data.corpus == "indexed":
        raise ValueError("an indexed blend has no held-out token array: use dsmoe.evaluation.held_out_set")
    corpus = load_corpus(cfg.data.corpus, cfg.data.val_works)
    tokenizer = load_tokenizer(tokenizer_path, cfg.data.eos_token)
    return tokenizer.encode_documents([corpus.val[k] for k in sorted(corpus.val)])


def held_out_set(cfg: config_lib.Config, tokenizer_path: Path, splits=None) -> HeldOut:
    """The run's fixed validation sample, from its saved config and tokenizer (indexed blends: from
    megatron-core's validation split, built here unless the run's `splits` are given)."""
    if cfg.data.corpus != "indexed":
        return HeldOut.from_tokens(
            held_out_tokens(cfg, tokenizer_path), cfg.data.seq_len, cfg.train.eval_tokens
        )
    from dsmoe.data.indexed import build_splits, validation_rows

    if splits is None:
        tokenizer = load_tokenizer(tokenizer_path, cfg.data.eos_token)
        splits = build_splits(
            cfg.data,
            tokenizer,
            cfg.data.seq_len,
            cfg.train.seed,
            cfg.data.train_samples,
            validation_samples(cfg),
        )
    rows, source = validation_rows(splits, validation_samples(cfg))
    return HeldOut(rows, source, splits.source_names)


@dataclass
class EvalResult:
    """Held-out next-token loss of a model under a routing rule, overall and per source."""

    routing: str
    perplexity: float
    tokens: int
    expert_active_fraction: float
    """Mean fraction of the MLP experts' parameters computed per token (1 for dense MLPs)."""
    attention_active_fraction: float
    """Mean fraction of the MoA experts' query/output projections computed per token (1 without MoA)."""
    param_active_fraction: float
    """Share of all non-embedding parameters computed per token (shared K/V and routers always run)."""
    loss: float = 0.0
    """Mean next-token cross-entropy (nats); perplexity = exp(loss)."""
    source_loss: dict[str, float] = field(default_factory=dict)
    """The same mean over each source's rows."""

    def row(self) -> str:
        return (
            f"{self.routing:<52} ppl {self.perplexity:8.2f}   MLP experts {100 * self.expert_active_fraction:5.1f}%"
            f"   attention experts {100 * self.attention_active_fraction:5.1f}%"
            f"   params {100 * self.param_active_fraction:5.1f}%"
        )

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        """Flat figures for metrics.jsonl and wandb: val_loss, val_ppl, and per source val_loss/NAME, ..."""
        out = {f"{prefix}_loss": self.loss, f"{prefix}_ppl": self.perplexity}
        if len(self.source_loss) > 1:
            for name, loss in self.source_loss.items():
                out[f"{prefix}_loss/{name}"] = loss
                out[f"{prefix}_ppl/{name}"] = math.exp(loss)
        return out


@torch.no_grad()
def evaluate(
    model, held_out: HeldOut, routing: Routing = TRAINING, batch_size: int = 16, dims=None
) -> EvalResult:
    """Mean next-token loss of `model` over the fixed sample. With `dims` (a parallel layout, during training)
    the rows are shared out over the data-parallel ranks and every rank runs the same number of equal
    forwards (expert and tensor parallelism and ZeRO-3 exchange in each), the last padded with weightless
    rows; the sums are taken over the world, so any layout gives the one-process figure."""
    if model.cfg.is_encoder:
        raise ValueError(
            "next-token loss is for decoders; evaluate an encoder with dsmoe.evaluation.mlm_loss"
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ranks, rank = (dims.batch_ranks, dims.batch_rank) if dims is not None else (1, 0)
    n, n_sources = held_out.rows.shape[0], len(held_out.source_names)
    chunk = batch_size * ranks
    # nll per source, tokens per source, MLP and attention experts run (token-weighted)
    sums = torch.zeros(2 * n_sources + 2, dtype=torch.float64, device=device)
    for start in range(0, n, chunk):
        picks = torch.arange(start + rank * batch_size, start + (rank + 1) * batch_size)
        real = picks < n
        if ranks == 1:  # one process: no peers to keep in step, so no padding
            picks = picks[real]
            real = real[real]
        picks = torch.where(real, picks, torch.zeros_like(picks))
        rows = held_out.rows[picks].to(device)
        x_BT, y_BT = rows[:, :-1], rows[:, 1:]
        out = model(x_BT, routing=routing)
        B, T = y_BT.shape
        nll_BT = model.cross_entropy(out.logits.reshape(B * T, -1), y_BT.reshape(-1), reduction="none").view(
            B, T
        )
        weight_B = real.to(device, torch.float64)
        source_B = held_out.source[picks].to(device)
        sums[:n_sources].index_add_(0, source_B, nll_BT.double().sum(1) * weight_B)
        sums[n_sources : 2 * n_sources].index_add_(0, source_B, weight_B * T)
        tokens = weight_B.sum() * T
        sums[-2] += (out.mlp.active_fraction.mean().double() if out.mlp else 1.0) * tokens
        sums[-1] += (out.attention.active_fraction.mean().double() if out.attention else 1.0) * tokens
    if dims is not None and dims.world_size > 1:
        dist.all_reduce(sums)
        sums /= dims.tp  # tensor-parallel ranks hold copies of their slice's figures
    model.train(was_training)
    nll, counts = sums[:n_sources], sums[n_sources : 2 * n_sources]
    total = float(counts.sum())
    loss = float(nll.sum()) / total
    mlp_frac, attention_frac = float(sums[-2]) / total, float(sums[-1]) / total
    return EvalResult(
        routing=str(routing),
        perplexity=math.exp(loss),
        tokens=int(total),
        expert_active_fraction=mlp_frac,
        attention_active_fraction=attention_frac,
        param_active_fraction=active_params(model, mlp_frac, attention_frac),
        loss=loss,
        source_loss={
            name: float(nll[i] / counts[i]) for i, name in enumerate(held_out.source_names) if counts[i] > 0
        },
    )


def active_params(model, mlp_frac: float, attention_frac: float) -> float:
    """Share of the non-embedding parameters computed per token when that share of the MLP and MoA experts
    runs (shared K/V projections and routers always run)."""
    total = model.num_params(exclude_embedding=True)
    skipped = model.num_expert_params() * (1.0 - mlp_frac) + model.num_attention_expert_params() * (
        1.0 - attention_frac
    )
    return (total - skipped) / total


@dataclass
class MLMResult:
    """Held-out masked-LM loss of an encoder under a routing rule, at one sequence length."""

    routing: str
    seq_len: int
    loss: float
    """Mean cross-entropy over the masked positions (nats)."""
    accuracy: float
    masked_tokens: int
    expert_active_fraction: float
    param_active_fraction: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def row(self) -> str:
        return (
            f"{self.routing:<28} seq {self.seq_len:5d}   MLM loss {self.loss:6.3f}   ppl {self.perplexity:8.2f}"
            f"   accuracy {100 * self.accuracy:5.1f}%   MLP experts {100 * self.expert_active_fraction:5.1f}%"
            f"   params {100 * self.param_active_fraction:5.1f}%"
        )


@torch.no_grad()
def mlm_loss(model, batches, routing: Routing, seq_len: int) -> MLMResult:
    """Masked-LM loss and accuracy of an EncoderMLM over (input_ids, attention_mask, labels) batches
    (dsmoe.data.mlm.eval_batches), summed over masked positions, and the share of parameters it ran."""
    model.eval()
    device = next(model.parameters()).device
    nll_sum, correct, n_masked, mlp_active = 0.0, 0, 0, 0.0
    for input_ids, attention_mask, labels in batches:
        out = model(input_ids.to(device), attention_mask.to(device), labels.to(device), routing=routing)
        nll_sum += out.lm_loss.item() * out.masked_tokens
        correct += int(out.correct)
        n_masked += out.masked_tokens
        mlp_active += (out.mlp.active_fraction.mean().item() if out.mlp else 1.0) * out.masked_tokens
    mlp_frac = mlp_active / n_masked
    total = model.num_params(exclude_embedding=True)
    return MLMResult(
        str(routing),
        seq_len,
        nll_sum / n_masked,
        correct / n_masked,
        n_masked,
        mlp_frac,
        (total - model.num_expert_params() * (1.0 - mlp_frac)) / total,
    )
