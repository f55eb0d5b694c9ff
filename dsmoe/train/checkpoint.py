"""Training checkpoints: the DeepSpeed checkpoint plus our state, and consolidation to one fp32 state dict.

Layout of RUN_DIR/checkpoints/:
  step_00000100/          one checkpoint (DeepSpeed's model/optimizer/scheduler files and ours)
    rng_rank{r}.pt        Python, NumPy and torch RNG states of rank r
    tokenizer.json        the tokenizer the run trained
  latest                  the tag of the newest complete checkpoint, written by DeepSpeed after every
                          rank finished saving; our files are written before it, so `latest` only ever
                          names a checkpoint that holds them.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINTS = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the run loading it."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def latest_tag(run_dir: str | Path) -> str | None:
    """The tag `latest` names, or None when the run has no complete checkpoint."""
    latest = checkpoint_root(run_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (checkpoint_root(run_dir) / tag).is_dir():
        raise CheckpointError(f"{latest} names {tag!r}, which does not exist")
    return tag


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: str | Path, step: int, client_state: dict, tokenizer_path: Path, rank: int) -> str:
    """Save a checkpoint after `step` optimizer steps (collective: every rank calls it)."""
    root, tag = checkpoint_root(run_dir), tag_for(step)
    (root / tag).mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), root / tag / f"rng_rank{rank}.pt")
    if rank == 0:
        shutil.copyfile(tokenizer_path, root / tag / "tokenizer.json")
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=True)
    return tag


def load(engine, run_dir: str | Path, rank: int) -> dict | None:
    """Load the latest checkpoint into `engine` and this rank's RNG; returns our client state or None."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    root = checkpoint_root(run_dir)
    rng_file = root / tag / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise CheckpointError(
            f"{root / tag} has no {rng_file.name}: it was saved by a run with fewer ranks; "
            "resume with the same number of processes"
        )
    load_path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {root / tag}")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def consolidated_state_dict(checkpoint_dir: str | Path, tag: str | None = None) -> tuple[dict, dict]:
    """One fp32 state dict from a checkpoint of any ZeRO stage and rank count, plus our client state.

    ZeRO 1-3 keep the fp32 master weights in optimizer shards: DeepSpeed's zero_to_fp32 merges them.
    Stage 0 keeps them whole: the module itself in fp32, or (bf16) the optimizer's fp32 groups, which
    we name from the parameter names saved with each optimizer group.
    """
    root = Path(checkpoint_dir)
    if tag is None:
        if not (root / "latest").is_file():
            raise CheckpointError(f"{root} has no 'latest' checkpoint")
        tag = (root / "latest").read_text().strip()
    model_states = root / tag / "mp_rank_00_model_states.pt"
    if not model_states.is_file():
        zero3 = root / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        model_states = zero3 if zero3.is_file() else model_states
    if not model_states.is_file():
        raise CheckpointError(f"{root / tag} holds no DeepSpeed model states: not a complete checkpoint")
    states = torch.load(model_states, map_location="cpu", weights_only=False)
    ours = states.get("dsmoe", {})
    config = ours.get("config", {})
    if config.get("parallel", {}).get("zero_stage", 0) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag), ours
    if config.get("train", {}).get("precision") == "fp32":
        return {k: v.float() for k, v in states["module"].items()}, ours
    optimizer = states["optimizer"]
    groups = optimizer["optimizer_state_dict"]["param_groups"]
    state_dict = {
        name: tensor.float()
        for group, fp32_tensors in zip(groups, optimizer["fp32_groups"], strict=True)
        for name, tensor in zip(group["param_names"], fp32_tensors, strict=True)
    }
    return state_dict, ours
