"""Multi-domain corpora cut into equal-size base units (papers/data_ablation.md).

A corpus is a directory of named domains, each a directory of `.txt` files (one document each) or
`.jsonl` files (one document per line, in its "text" field). Each domain is tokenised with one shared
tokenizer and cut, in a fixed shuffled document order, into: held-out tokens, tokens for the shared seed
model, and base units of exactly `unit_tokens` tokens each (equal sizes keep mixture weights honest).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from dsmoe.data.corpus import DataError
from dsmoe.data.tokens import encode_documents


def read_domain(directory: Path) -> list[str]:
    """The documents of one domain directory."""
    docs: list[str] = []
    for path in sorted(directory.rglob("*")):
        if path.suffix == ".txt":
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
        elif path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if line.strip():
                    try:
                        docs.append(json.loads(line)["text"])
                    except (ValueError, KeyError, TypeError):
                        raise DataError(f"{path}:{n}: not a JSON object with a 'text' field") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"domain {directory.name!r} ({directory}) has no .txt or .jsonl documents")
    return docs


def read_domains(root: Path, names: list[str] | None = None) -> dict[str, list[str]]:
    """Domains of a corpus directory (all of them, or those named), each a list of documents."""
    if not root.is_dir():
        raise DataError(
            f"corpus directory {root} does not exist (make one with tools/research/prepare_corpus.py)"
        )
    available = sorted(p.name for p in root.iterdir() if p.is_dir())
    names = names or available
    missing = [n for n in names if n not in available]
    if missing:
        raise DataError(f"domains {missing} are not in {root}; available: {available}")
    return {name: read_domain(root / name) for name in names}


@dataclass
class DomainTokens:
    """One domain, tokenised and cut."""

    name: str
    val: np.ndarray
    seed: np.ndarray
    units: list[np.ndarray]


def cut_domain(
    name: str,
    docs: list[str],
    tok: Tokenizer,
    val_tokens: int,
    seed_tokens: int,
    unit_tokens: int,
    max_units: int,
) -> DomainTokens:
    """Tokenise a domain in a fixed shuffled document order and cut held-out, seed and equal base units."""
    order = list(range(len(docs)))
    random.Random(f"dsmoe-domain-{name}").shuffle(order)  # stable across runs and machines
    tokens = encode_documents(tok, [docs[i] for i in order])
    val, seed = tokens[:val_tokens], tokens[val_tokens : val_tokens + seed_tokens]
    rest = tokens[val_tokens + seed_tokens :]
    n_units = min(max_units, len(rest) // unit_tokens)
    if len(val) < val_tokens or n_units < 1:
        raise DataError(
            f"domain {name!r} has {len(tokens)} tokens: too few for {val_tokens} held-out + {seed_tokens} seed + "
            f"one unit of {unit_tokens}; add text or make the units smaller"
        )
    units = [rest[i * unit_tokens : (i + 1) * unit_tokens] for i in range(n_units)]
    return DomainTokens(name, val, seed, units)
