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
from dsmoe.model import TRAINING, DecoderLM, Routing


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
    if model.cfg.is_encoder:
        raise ValueError(
            "next-token perplexity is for decoders; evaluate an encoder with dsmoe.infer.mlm_loss"
        )
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


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator=None
) -> torch.Tensor:
    """(B, V) last-position logits -> (B, 1) next tokens. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(
    model: DecoderLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    routing: Routing = TRAINING,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Batched sampling with a KV cache: one prefill of the (B, T) prompts, then one token per step.

    Prompts in a batch share one length (no padding). Stops early when every sequence emitted eos_id.
    """
    model.eval()
    B, T = prompt.shape
    total = min(T + max_new_tokens, model.cfg.max_seq_len)
    cache = model.new_cache(B, total)
    logits = model(prompt, routing=routing, cache=cache).logits[:, -1]
    tokens, finished = [prompt], torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for _ in range(total - T):
        next_token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            next_token = next_token.masked_fill(finished.unsqueeze(-1), eos_id)
            finished |= next_token.squeeze(-1) == eos_id
        tokens.append(next_token)
        if bool(finished.all()) or cache.length == total:
            break
        logits = model(next_token, routing=routing, cache=cache).logits[:, -1]
    return torch.cat(tokens, dim=1)
