"""Masked-language-model batches for the encoder (BERT's 80/10/10 rule at MosaicBERT's rates).

Rows come from the same packed token windows as the decoder's (PackedSampler), so the resumable position
is still the count of samples consumed. Row s keeps a length drawn from [mlm.min_seq_len, seq_len] and
its masks from a generator seeded by (seed, s): a pure function of s, so any dp x accumulation split and
any resume see the same rows, lengths and masks.

Special tokens: the byte-level BPE has only <|endoftext|>; the encoder adds the mask token at id
`tokenizer_vocab` and the padding token at `tokenizer_vocab + 1` (the export writes both into its
tokenizer), and pads the vocabulary to a multiple of 64 after them.
"""

from __future__ import annotations

import numpy as np
import torch

from dsmoe.config import MLMConfig
from dsmoe.data.sampler import PackedSampler, eval_windows
from dsmoe.data.tokens import pad_vocab

IGNORE_INDEX = -100
MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|pad|>"
EVAL_SALT = 7_919  # evaluation masks come from their own stream


def special_ids(tokenizer_vocab: int) -> tuple[int, int]:
    """(mask id, pad id): the two ids after the tokenizer's own."""
    return tokenizer_vocab, tokenizer_vocab + 1


def encoder_vocab_size(tokenizer_vocab: int) -> int:
    """The encoder's embedding rows: the tokenizer's, mask and pad, padded to a multiple of 64
    (MosaicBERT: 30522 -> 30528)."""
    return pad_vocab(tokenizer_vocab + 2)


def mask_tokens(
    ids_S: torch.Tensor, length: int, probability: float, tokenizer_vocab: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of the first `length` tokens of one row: round(probability x length) positions (at least
    one) are predicted; of them 80% become the mask token, 10% a random token, 10% stay as they are.
    Returns (input ids, labels) with IGNORE_INDEX at positions not predicted."""
    mask_id, _ = special_ids(tokenizer_vocab)
    n_masked = max(1, round(probability * length))
    positions = torch.randperm(length, generator=generator)[:n_masked]
    replace = torch.rand(n_masked, generator=generator)
    random_ids = torch.randint(tokenizer_vocab, (n_masked,), generator=generator)
    labels = torch.full_like(ids_S, IGNORE_INDEX)
    labels[positions] = ids_S[positions]
    inputs = ids_S.clone()
    inputs[positions] = torch.where(
        replace < 0.8, mask_id, torch.where(replace < 0.9, random_ids, ids_S[positions])
    )
    return inputs, labels


def collate(
    rows: list[np.ndarray],
    lengths: list[int],
    seq_len: int,
    probability: float,
    tokenizer_vocab: int,
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (B, seq_len): rows cut to their lengths, masked, padded."""
    _, pad_id = special_ids(tokenizer_vocab)
    B = len(rows)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.int64)
    labels = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((B, seq_len), dtype=torch.bool)
    for b, (row, length, gen) in enumerate(zip(rows, lengths, generators, strict=True)):
        ids = torch.from_numpy(np.asarray(row[:length], dtype=np.int64))
        input_ids[b, :length], labels[b, :length] = mask_tokens(
            ids, length, probability, tokenizer_vocab, gen
        )
        attention_mask[b, :length] = True
    return input_ids, attention_mask, labels


class MLMBatches:
    """Training batches for the encoder: PackedSampler windows, mixed lengths, masked at mlm.probability."""

    def __init__(self, sampler: PackedSampler, tokenizer_vocab: int, mlm: MLMConfig, seed: int):
        self.sampler, self.tokenizer_vocab, self.mlm, self.seed = sampler, tokenizer_vocab, mlm, seed

    def _generator(self, sample: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + sample)

    def batch(self, first_sample: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seq_len = self.sampler.seq_len
        samples = range(first_sample, first_sample + size)
        generators = [self._generator(s) for s in samples]
        lengths = [
            int(torch.randint(self.mlm.min_seq_len, seq_len + 1, (), generator=g))
            if self.mlm.min_seq_len
            else seq_len
            for g in generators
        ]
        rows = [self.sampler.window(s) for s in samples]
        return collate(rows, lengths, seq_len, self.mlm.probability, self.tokenizer_vocab, generators)

    def micro_batch(
        self, step: int, micro: int, dp_rank: int, dp: int, micro_batch_size: int, global_batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rank `dp_rank`'s micro-batch `micro` of optimizer step `step` (the decoder's slicing)."""
        first = step * global_batch_size + (micro * dp + dp_rank) * micro_batch_size
        return self.batch(first, micro_batch_size)


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    probability: float,
    tokenizer_vocab: int,
    max_tokens: int = 0,
    batch_size: int = 16,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Held-out MLM batches: consecutive full windows of seq_len tokens, masked at `probability` (15%) with
    a fixed stream, so every evaluation of a model sees the same masks."""
    windows = [w[0].numpy() for w in eval_windows(tokens, seq_len, max_tokens)]
    generators = [
        torch.Generator().manual_seed(seed * 1_000_003 + EVAL_SALT + i) for i in range(len(windows))
    ]
    return [
        collate(
            windows[i : i + batch_size],
            [seq_len] * len(windows[i : i + batch_size]),
            seq_len,
            probability,
            tokenizer_vocab,
            generators[i : i + batch_size],
        )
        for i in range(0, len(windows), batch_size)
    ]
