"""Byte-level BPE trained locally, and a uint16 memmap token cache built once per corpus and tokenizer.

The cache directory is keyed by a hash of the corpus text and the tokenizer settings, built under a
temporary name and published by an atomic rename, so a killed build never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsmoe.config import DataConfig
from dsmoe.data.corpus import Corpus, DataError, load_corpus

EOS = "<|endoftext|>"
CACHE_FORMAT = 1  # bump when the cache layout changes


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round the vocabulary up to a multiple of 64: matmul-friendly shapes (papers/mosaicbert.md)."""
    return (n + multiple - 1) // multiple * multiple


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) over `texts`, with one end-of-text special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_documents(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """Concatenate documents, each followed by EOS, as uint16 token ids."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


@dataclass
class TokenData:
    """A prepared corpus: tokenizer file and train/val token memmaps."""

    directory: Path
    tokenizer_path: Path
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    """Tokenizer vocabulary size (unpadded)."""
    eos_id: int


def cache_key(corpus: Corpus, cfg: DataConfig) -> str:
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "vocab": cfg.tokenizer_vocab_size}).encode())
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        for name in sorted(docs):
            h.update(f"{split}/{name}\0".encode())
            h.update(docs[name].encode())
    return h.hexdigest()[:16]


def cache_dir_for(cfg: DataConfig, corpus: Corpus) -> Path:
    return Path(os.path.expanduser(cfg.cache_dir)) / f"{corpus.name}-{cache_key(corpus, cfg)}"


def prepare(cfg: DataConfig, texts_dir: Path | None = None) -> Path:
    """Build the tokenizer and token cache if absent; return its directory. Run on one rank."""
    corpus = load_corpus(cfg.corpus, cfg.val_works, texts_dir)
    final = cache_dir_for(cfg, corpus)
    if (final / "meta.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        train_docs = [corpus.train[k] for k in sorted(corpus.train)]
        val_docs = [corpus.val[k] for k in sorted(corpus.val)]
        tok = train_tokenizer(train_docs, cfg.tokenizer_vocab_size)
        tok.save(str(tmp / "tokenizer.json"))
        encode_documents(tok, train_docs).tofile(tmp / "train.bin")
        encode_documents(tok, val_docs).tofile(tmp / "val.bin")
        meta = {
            "corpus": corpus.name,
            "train_works": sorted(corpus.train),
            "val_works": sorted(corpus.val),
            "vocab_size": tok.get_vocab_size(),
            "eos_id": tok.token_to_id(EOS),
            "format": CACHE_FORMAT,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, final)  # atomic publish; another process may have won the race
        except OSError:
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def open_pretokenized(cfg: DataConfig) -> TokenData:
    """corpus=tokens: token files made elsewhere (e.g. base units of tools/ablate_data.py) and their tokenizer."""
    paths = {
        key: Path(os.path.expanduser(getattr(cfg, key)))
        for key in ("train_tokens", "val_tokens", "tokenizer")
    }
    for key, path in paths.items():
        if not path.is_file():
            raise DataError(f"data.{key}: {path} does not exist")
    train = np.memmap(paths["train_tokens"], dtype=np.uint16, mode="r")
    val = np.memmap(paths["val_tokens"], dtype=np.uint16, mode="r")
    for key, tokens in (("train_tokens", train), ("val_tokens", val)):
        if len(tokens) == 0:
            raise DataError(f"data.{key}: {paths[key]} holds no tokens")
    tok = Tokenizer.from_file(str(paths["tokenizer"]))
    return TokenData(
        paths["train_tokens"].parent,
        paths["tokenizer"],
        train,
        val,
        tok.get_vocab_size(),
        tok.token_to_id(EOS),
    )


def open_token_data(directory: Path) -> TokenData:
    """Open a prepared cache read-only (memmaps)."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"token cache {directory} is incomplete (no meta.json); delete it and run again")
    meta = json.loads(meta_path.read_text())
    train = np.memmap(directory / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(directory / "val.bin", dtype=np.uint16, mode="r")
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"token cache {directory} has an empty split; delete it and run again")
    return TokenData(directory, directory / "tokenizer.json", train, val, meta["vocab_size"], meta["eos_id"])
