"""Shared fixtures: a small config, a session-wide token cache, and a one-process gloo group."""

from __future__ import annotations

import os

import pytest
import torch

from dsmoe import config as config_lib

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def small_overrides(run_dir, cache_dir) -> list[str]:
    """A model and run small enough for a step to take milliseconds on one CPU core."""
    return [
        "model.d_model=64",
        "model.n_layers=2",
        "model.max_seq_len=64",
        "model.attention.heads=0",
        "model.attention.experts=2",  # MoA: 2 experts x 2 query heads, sharing 2 K/V heads
        "model.attention.heads_per_expert=2",
        "model.attention.kv_heads=2",
        "model.moe.num_experts=4",
        "model.moe.expert_hidden=32",
        "data.seq_len=32",
        "data.tokenizer_vocab_size=512",
        f"data.cache_dir={cache_dir}",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.max_steps=8",
        "train.warmup_steps=2",
        "train.checkpoint_every=4",
        "train.eval_tokens=2048",
        "train.wandb=false",
        "train.progress=false",
        f"train.run_dir={run_dir}",
    ]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("token_cache")


@pytest.fixture
def small_cfg(tmp_path, cache_dir):
    """Returns a function building the small config with extra overrides."""

    def make(*extra: str, run_dir=None) -> config_lib.Config:
        return config_lib.load(None, small_overrides(run_dir or tmp_path / "run", cache_dir) + list(extra))

    return make


@pytest.fixture(scope="session")
def single_process_group():
    """torch.distributed with world size 1 over gloo, shared by the in-process training tests."""
    from parallel import groups

    groups.init(config_lib.ParallelConfig())
    torch.set_num_threads(1)  # deterministic and cheap; CI has 2 cores
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the lent GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
