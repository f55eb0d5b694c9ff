"""Sparse inference: load an exported model or a run, and measure held-out perplexity under a routing rule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from dsmoe import config as config_lib
from dsmoe.data.corpus import load_corpus
from dsmoe.data.sampler import eval_windows
from dsmoe.data.tokens import encode_documents
from dsmoe.export import is_export, load_export, load_from_run
from dsmoe.model import DecoderLM, RoutingRule


@dataclass
class LoadedModel:
    model: DecoderLM
    cfg: config_lib.Config
    routing: RoutingRule
    """The rule the model was exported with (dense for a run directory)."""
    tokenizer_path: Path


def load(path: str | Path) -> LoadedModel:
    """An exported model directory (config.json) or a run directory (checkpoints/)."""
    path = Path(path)
    if is_export(path):
        model, cfg, routing, tok = load_export(path)
    else:
        model, cfg, tok, _ = load_from_run(path)
        routing = RoutingRule()
    return LoadedModel(model, cfg, routing, tok)


def held_out_tokens(cfg: config_lib.Config, tokenizer_path: Path):
    """The validation works of the model's corpus, tokenised with the model's own tokenizer."""
    corpus = load_corpus(cfg.data.corpus, cfg.data.val_works)
    return encode_documents(
        Tokenizer.from_file(str(tokenizer_path)), [corpus.val[k] for k in sorted(corpus.val)]
    )


@dataclass
class PerplexityResult:
    routing: str
    perplexity: float
    tokens: int
    expert_active_fraction: float
    """Mean fraction of the MLP experts' parameters computed per token."""
    param_active_fraction: float
    """Share of all (non-embedding) parameters computed per token."""

    def row(self) -> str:
        return (
            f"{self.routing:<22} ppl {self.perplexity:8.2f}   experts active {100 * self.expert_active_fraction:5.1f}%"
            f"   params active {100 * self.param_active_fraction:5.1f}%"
        )


@torch.no_grad()
def perplexity(
    model: DecoderLM, tokens, seq_len: int, routing: RoutingRule, max_tokens: int = 0, batch_size: int = 16
) -> PerplexityResult:
    """exp(mean next-token NLL) over consecutive held-out windows of `seq_len`."""
    model.eval()
    device = next(model.parameters()).device
    windows = eval_windows(tokens, seq_len, max_tokens)
    nll_sum, n_tokens, active_sum = 0.0, 0, 0.0
    for i in range(0, len(windows), batch_size):
        x = torch.stack([w[0] for w in windows[i : i + batch_size]]).to(device)
        y = torch.stack([w[1] for w in windows[i : i + batch_size]]).to(device)
        out = model(x, y, routing=routing)
        nll_sum += out.lm_loss.item() * y.numel()
        n_tokens += y.numel()
        if out.active_fraction is not None:
            active_sum += out.active_fraction.mean().item() * y.numel()
    expert_frac = active_sum / n_tokens if model.moe_layers else 1.0
    total = model.num_params(exclude_embedding=True)
    experts = model.num_expert_params()
    param_frac = (total - experts * (1.0 - expert_frac)) / total
    return PerplexityResult(str(routing), math.exp(nll_sum / n_tokens), n_tokens, expert_frac, param_frac)
