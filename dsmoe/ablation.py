"""Data-mixture ablation by modular training and merging (Na et al. 2024, papers/data_ablation.md).

Pieces that tools/research/ablate_data.py composes: the unit pool (equal-size base units per domain, one shared
tokenizer), token-weighted parameter averaging, and the rank statistics that say whether merged
proxies order mixtures the way trained mixture models do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsmoe.data.corpus import DataError
from dsmoe.data.domains import cut_domain, read_domains
from dsmoe.data.tokens import train_tokenizer


@dataclass
class UnitPool:
    """Token files of a prepared corpus: tokenizer, per-domain held-out, seed tokens, base units."""

    directory: Path
    domains: list[str]
    units: dict[str, Path]
    """'domain/k' -> uint16 token file, every one exactly unit_tokens long."""
    unit_tokens: int

    @property
    def tokenizer(self) -> Path:
        return self.directory / "tokenizer.json"

    @property
    def seed(self) -> Path:
        return self.directory / "seed.bin"

    @property
    def val_all(self) -> Path:
        return self.directory / "val_all.bin"

    def val(self, domain: str) -> Path:
        return self.directory / f"val_{domain}.bin"


def build_unit_pool(
    corpus_dir: Path,
    out_dir: Path,
    *,
    vocab_size: int,
    val_tokens: int,
    seed_tokens: int,
    unit_tokens: int,
    units_per_domain: int,
    domains: list[str] | None = None,
) -> UnitPool:
    """Tokenise every domain with one tokenizer and cut it; cached in out_dir by its settings."""
    settings = {
        "corpus": str(corpus_dir.resolve()),
        "vocab_size": vocab_size,
        "val_tokens": val_tokens,
        "seed_tokens": seed_tokens,
        "unit_tokens": unit_tokens,
        "units_per_domain": units_per_domain,
        "domains": domains,
    }
    meta_file = out_dir / "pool.json"
    if meta_file.is_file() and json.loads(meta_file.read_text())["settings"] == settings:
        meta = json.loads(meta_file.read_text())
        return UnitPool(
            out_dir, meta["domains"], {k: out_dir / v for k, v in meta["units"].items()}, unit_tokens
        )
    docs = read_domains(corpus_dir, domains)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One tokenizer for every domain and module: perplexities are compared between models sharing it.
    tok = train_tokenizer([d for name in sorted(docs) for d in docs[name]], vocab_size)
    tok.save(str(out_dir / "tokenizer.json"))
    units, seeds, vals = {}, [], []
    for name in sorted(docs):
        cut = cut_domain(name, docs[name], tok, val_tokens, seed_tokens, unit_tokens, units_per_domain)
        cut.val.tofile(out_dir / f"val_{name}.bin")
        vals.append(cut.val)
        seeds.append(cut.seed)
        for k, unit in enumerate(cut.units):
            units[f"{name}/{k}"] = f"unit_{name}_{k}.bin"
            unit.tofile(out_dir / units[f"{name}/{k}"])
    np.concatenate(seeds).tofile(out_dir / "seed.bin")
    np.concatenate(vals).tofile(out_dir / "val_all.bin")
    meta = {"settings": settings, "domains": sorted(docs), "units": units}
    meta_file.write_text(json.dumps(meta, indent=2))
    return UnitPool(out_dir, sorted(docs), {k: out_dir / v for k, v in units.items()}, unit_tokens)


def merge(state_dicts: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Parameter average sum_i w_i theta_i (weights normalised), accumulated in fp64, returned in fp32.

    fp64 accumulation makes the average of N copies of one model that model exactly.
    """
    if len(state_dicts) != len(weights) or not state_dicts:
        raise ValueError("merge needs one weight per state dict, and at least one")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"merge weights must sum to a positive number, got {weights}")
    keys = state_dicts[0].keys()
    for sd in state_dicts[1:]:
        if sd.keys() != keys:
            raise ValueError("merge needs models of the same architecture (parameter names differ)")
    merged = {}
    for key in keys:
        acc = torch.zeros_like(state_dicts[0][key], dtype=torch.float64)
        for sd, w in zip(state_dicts, weights, strict=True):
            if w:
                acc += (w / total) * sd[key].double()
        merged[key] = acc.float()
    return merged


def mixture_units(pool: UnitPool, mixture: dict[str, int]) -> list[str]:
    """The base units of a mixture given as {domain: number of units}, in a fixed order."""
    chosen = []
    for domain, count in sorted(mixture.items()):
        available = sorted(u for u in pool.units if u.split("/")[0] == domain)
        if domain not in pool.domains:
            raise DataError(f"mixture names domain {domain!r}, not in the pool: {pool.domains}")
        if count > len(available):
            raise DataError(f"mixture asks for {count} units of {domain!r}; the pool has {len(available)}")
        chosen += available[:count]
    return chosen


def rank(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as Spearman's rho needs."""
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for v in np.unique(values):
        tied = values == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def pearson(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def spearman(a, b) -> float:
    return pearson(rank(np.asarray(a, float)), rank(np.asarray(b, float)))
