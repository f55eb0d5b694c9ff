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
from dsmoe.data.tokens import encode_documents, open_pretokenized
from dsmoe.export import is_export, load_export, load_from_run
from dsmoe.model import DecoderLM, Routing


@dataclass
class LoadedModel:
    model: DecoderLM
    cfg: config_lib.Config
    routing: Routing
    """The rule the model was exported with (dense for a run directory)."""
    tokenizer_path: Path


def load(path: str | Path) -> LoadedModel:
    """An exported model directory (config.json) or a run directory (checkpoints/)."""
    path = Path(path)
    if is_export(path):
        model, cfg, routing, tok = load_export(path)
    else:
        model, cfg, tok, _ = load_from_run(path)
        routing = Routing()
    return LoadedModel(model, cfg, routing, tok)


def held_out_tokens(cfg: config_lib.Config, tokenizer_path: Path):
    """The validation works of the model's corpus, tokenised with the model's own tokenizer."""
    if cfg.data.corpus == "tokens":
        return open_pretokenized(cfg.data).val
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
    """Mean fraction of the MLP experts' parameters computed per token (1 for dense MLPs)."""
    attention_active_fraction: float
    """Mean fraction of the MoA experts' query/output projections computed per token (1 without MoA)."""
    param_active_fraction: float
    """Share of all non-embedding parameters computed per token (shared K/V and routers always run)."""

    def row(self) -> str:
        return (
            f"{self.routing:<52} ppl {self.perplexity:8.2f}   MLP experts {100 * self.expert_active_fraction:5.1f}%"
            f"   attention experts {100 * self.attention_active_fraction:5.1f}%"
            f"   params {100 * self.param_active_fraction:5.1f}%"
        )


@torch.no_grad()
def perplexity(
    model: DecoderLM, tokens, seq_len: int, routing: Routing, max_tokens: int = 0, batch_size: int = 16
) -> PerplexityResult:
    """exp(mean next-token NLL) over consecutive held-out windows of `seq_len`, and the active shares."""
    model.eval()
    device = next(model.parameters()).device
    windows = eval_windows(tokens, seq_len, max_tokens)
    nll_sum, n_tokens, mlp_active, attention_active = 0.0, 0, 0.0, 0.0
    for i in range(0, len(windows), batch_size):
        x = torch.stack([w[0] for w in windows[i : i + batch_size]]).to(device)
        y = torch.stack([w[1] for w in windows[i : i + batch_size]]).to(device)
        out = model(x, y, routing=routing)
        nll_sum += out.lm_loss.item() * y.numel()
        n_tokens += y.numel()
        mlp_active += (out.mlp.active_fraction.mean().item() if out.mlp else 1.0) * y.numel()
        attention_active += (
            out.attention.active_fraction.mean().item() if out.attention else 1.0
        ) * y.numel()
    mlp_frac, attention_frac = mlp_active / n_tokens, attention_active / n_tokens
    total = model.num_params(exclude_embedding=True)
    skipped = model.num_expert_params() * (1.0 - mlp_frac) + model.num_attention_expert_params() * (
        1.0 - attention_frac
    )
    return PerplexityResult(
        str(routing),
        math.exp(nll_sum / n_tokens),
        n_tokens,
        mlp_frac,
        attention_frac,
        (total - skipped) / total,
    )
