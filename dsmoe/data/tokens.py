"""Byte-level BPE trained locally (or any local tokenizer), and a memmap token cache built once per corpus and
tokenizer: uint16 ids, or int32 for vocabularies above 65,536 entries.

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
from dsmoe.data.tokenizer import LocalTokenizer, load_tokenizer

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


def encode_documents(tok: Tokenizer, docs: list[str], eos_token: str = EOS) -> np.ndarray:
    """Concatenate documents, each followed by the end-of-document token, in the vocabulary's dtype."""
    return LocalTokenizer(tok, eos_token, "").encode_documents(docs)


def tokenizer_file(tok: LocalTokenizer, cache_dir: str) -> Path:
    """The tokenizer.json a run saves and its exports carry, written once per tokenizer under the cache."""
    path = Path(os.path.expanduser(cache_dir)) / "tokenizers" / tok.fingerprint[:16] / "tokenizer.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"tokenizer.json.tmp{os.getpid()}")
        tok.save(tmp)
        os.replace(tmp, path)
    return path


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
    eos_token: str = EOS


def cache_key(corpus: Corpus, cfg: DataConfig, tok: LocalTokenizer | None = None) -> str:
    settings = {"format": CACHE_FORMAT, "vocab": cfg.tokenizer_vocab_size}
    if tok is not None:  # a given tokenizer instead of the BPE trained here
        settings = {"format": CACHE_FORMAT, "tokenizer": tok.fingerprint, "eos": tok.eos_token}
    h = hashlib.sha256(json.dumps(settings).encode())
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        for name in sorted(docs):
            h.update(f"{split}/{name}\0".encode())
            h.update(docs[name].encode())
    return h.hexdigest()[:16]


def cache_dir_for(cfg: DataConfig, corpus: Corpus, tok: LocalTokenizer | None = None) -> Path:
    return Path(os.path.expanduser(cfg.cache_dir)) / f"{corpus.name}-{cache_key(corpus, cfg, tok)}"


def prepare(cfg: DataConfig, texts_dir: Path | None = None) -> Path:
    """Build the tokenizer (unless data.tokenizer names one) and token cache if absent; return its directory.
    Run on one rank."""
    corpus = load_corpus(cfg.corpus, cfg.val_works, texts_dir)
    given = load_tokenizer(cfg.tokenizer, cfg.eos_token) if cfg.tokenizer else None
    final = cache_dir_for(cfg, corpus, given)
    if (final / "meta.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        train_docs = [corpus.train[k] for k in sorted(corpus.train)]
        val_docs = [corpus.val[k] for k in sorted(corpus.val)]
        tok = given or LocalTokenizer(train_tokenizer(train_docs, cfg.tokenizer_vocab_size), EOS, "trained")
        tok.save(tmp / "tokenizer.json")
        tok.encode_documents(train_docs).tofile(tmp / "train.bin")
        tok.encode_documents(val_docs).tofile(tmp / "val.bin")
        meta = {
            "corpus": corpus.name,
            "train_works": sorted(corpus.train),
            "val_works": sorted(corpus.val),
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "eos_token": tok.eos_token,
            "dtype": np.dtype(tok.token_dtype).name,
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
    """corpus=tokens: token files made elsewhere (e.g. base units of tools/research/ablate_data.py) and their tokenizer;
    the files hold ids in the dtype the tokenizer's vocabulary needs (uint16, or int32 above 65,536)."""
    paths = {key: Path(os.path.expanduser(getattr(cfg, key))) for key in ("train_tokens", "val_tokens")}
    for key, path in paths.items():
        if not path.is_file():
            raise DataError(f"data.{key}: {path} does not exist")
    tok = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    dtype = tok.token_dtype
    arrays = {}
    for key, path in paths.items():
        if path.stat().st_size % np.dtype(dtype).itemsize:
            raise DataError(
                f"data.{key}: {path} is not a whole number of {np.dtype(dtype).name} ids (the dtype "
                f"data.tokenizer's vocabulary of {tok.vocab_size} needs): made with another tokenizer?"
            )
        arrays[key] = np.memmap(path, dtype=dtype, mode="r")
        if len(arrays[key]) == 0:
            raise DataError(f"data.{key}: {path} holds no tokens")
    return TokenData(
        paths["train_tokens"].parent,
        tokenizer_file(tok, cfg.cache_dir),
        arrays["train_tokens"],
        arrays["val_tokens"],
        tok.vocab_size,
        tok.eos_id,
        tok.eos_token,
    )


def open_token_data(directory: Path) -> TokenData:
    """Open a prepared cache read-only (memmaps)."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"token cache {directory} is incomplete (no meta.json); delete it and run again")
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta.get("dtype", "uint16"))
    train = np.memmap(directory / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(directory / "val.bin", dtype=dtype, mode="r")
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"token cache {directory} has an empty split; delete it and run again")
    return TokenData(
        directory,
        directory / "tokenizer.json",
        train,
        val,
        meta["vocab_size"],
        meta["eos_id"],
        meta.get("eos_token", EOS),
    )
