"""Corpus reading, tokenizer training, token caches and the resumable sampler."""

from dsmoe.data.corpus import DataError, load_corpus
from dsmoe.data.sampler import PackedSampler, eval_windows
from dsmoe.data.tokens import TokenData, open_token_data, pad_vocab, prepare

__all__ = [
    "DataError",
    "PackedSampler",
    "TokenData",
    "eval_windows",
    "load_corpus",
    "open_token_data",
    "pad_vocab",
    "prepare",
]
