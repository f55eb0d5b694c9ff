"""Deterministic samplers of packed sequences that resume at an exact position.

The token stream is cut into non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets).
Each epoch visits every window once in an order drawn from (seed, epoch), so sample number s is a pure
function of s: the sampler's whole state is the count of samples consumed. The global batch of step k
is samples [k*G, (k+1)*G); rank r's micro-batch m of it is the slice starting at (m * dp + r) * micro,
so any dp x accumulation split of the same global batch sees the same sequences.
"""

from __future__ import annotations

import numpy as np
import torch

from dsmoe.data.corpus import DataError


class WindowSampler:
    """Batches of samples, each a (seq_len + 1)-token window that is a pure function of its number."""

    seq_len: int

    def window(self, sample: int) -> np.ndarray:
        raise NotImplementedError  # PackedSampler (a token array), IndexedSampler (megatron-core datasets)

    def batch(self, first_sample: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (size, seq_len) int64, for samples first_sample .. first_sample+size-1."""
        return self.samples(range(first_sample, first_sample + size))

    def samples(self, numbers) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (len(numbers), seq_len) int64, for the given sample numbers in order
        (batch selection trains on samples picked from the whole forward batch)."""
        rows = np.stack([self.window(int(s)) for s in numbers]).astype(np.int64)
        rows_t = torch.from_numpy(rows)
        return rows_t[:, :-1], rows_t[:, 1:]

    def micro_batch(
        self, step: int, micro: int, dp_rank: int, dp: int, micro_batch_size: int, global_batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank `dp_rank`'s micro-batch number `micro` of optimizer step `step`."""
        first = step * global_batch_size + (micro * dp + dp_rank) * micro_batch_size
        return self.batch(first, micro_batch_size)


class PackedSampler(WindowSampler):
    """Maps a global sample index to a (seq_len + 1)-token window of a token array, shuffled per epoch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.windows_per_epoch = (len(tokens) - 1) // seq_len
        if self.windows_per_epoch < 1:
            raise DataError(f"corpus has {len(tokens)} tokens: too few for one sequence of {seq_len}")
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.windows_per_epoch, generator=gen)
        return self._perm

    def window(self, sample: int) -> np.ndarray:
        epoch, i = divmod(sample, self.windows_per_epoch)
        start = int(self._order(epoch)[i]) * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]


def eval_windows(
    tokens: np.ndarray, seq_len: int, max_tokens: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping (input, target) windows over held-out tokens, in order."""
    n = (len(tokens) - 1) // seq_len
    if max_tokens:
        n = min(n, max(1, max_tokens // seq_len))
    if n < 1:
        raise DataError(f"held-out split has {len(tokens)} tokens: too few for one window of {seq_len}")
    rows = torch.from_numpy(np.asarray(tokens[: n * seq_len + 1], dtype=np.int64))
    return [
        (rows[i * seq_len : (i + 1) * seq_len], rows[i * seq_len + 1 : (i + 1) * seq_len + 1])
        for i in range(n)
    ]
