"""A DataLoader over the step's micro-batches: worker processes read and pack the next batches while the step
runs, into pinned memory on a GPU.

Item j of the loader is this rank's micro-batch j % gas of step first_step + j // gas, a pure function of j
(the samplers' contract), so the batches are the same with any number of workers, and a resumed run starts
the loader at its checkpoint's step.
"""

from __future__ import annotations

import signal

import torch
from torch.utils.data import DataLoader, Dataset


class StepMicroBatches(Dataset):
    """This rank's micro-batches of steps first_step, first_step + 1, ..., in the order the step takes them."""

    def __init__(
        self,
        sampler,
        first_step: int,
        last_step: int,
        gas: int,
        batch_rank: int,
        batch_ranks: int,
        micro_batch_size: int,
        global_batch_size: int,
    ):
        self.sampler, self.first_step, self.gas = sampler, first_step, gas
        self.length = max(0, last_step - first_step) * gas
        self.slice = (batch_rank, batch_ranks, micro_batch_size, global_batch_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j: int):
        step, micro = divmod(j, self.gas)
        return self.sampler.micro_batch(self.first_step + step, micro, *self.slice)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # a worker packs batches; the step's threads need the cores
    # Ctrl-C and a scheduler's SIGTERM are the training process's to handle (a checkpoint, then a clean exit,
    # which stops the workers); a worker must not run its handler too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def step_batches(dataset: StepMicroBatches, num_workers: int, prefetch_factor: int, pin_memory: bool):
    """Yields, per step, the list of its `gas` micro-batches (tuples of CPU tensors, pinned on a GPU)."""
    loader = DataLoader(
        dataset,
        batch_size=None,  # items are whole micro-batches already
        shuffle=False,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers else None,
        persistent_workers=False,
        # its own generator: starting the iterator draws a base seed, which must not move the run's global
        # RNG stream (a resumed run restores that stream and would be one draw behind the uninterrupted one)
        generator=torch.Generator().manual_seed(0),
    )
    iterator = iter(loader)
    try:
        step: list = []
        for micro_batch in iterator:
            step.append(micro_batch)
            if len(step) == dataset.gas:
                yield step
                step = []
    finally:
        del (
            iterator
        )  # releasing the iterator stops its workers (a run that stops early closes this generator)
