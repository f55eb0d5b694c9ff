"""Argument helpers shared by the user-facing tools: routing rules per layer type."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dsmoe.model import Routing, RoutingRule  # noqa: E402


def git_commit() -> str:
    """The commit a result was measured at, for the benchmark files. $DSMOE_COMMIT wins: the lent GPU gets
    a copy of the working tree whose .git may name an older commit (device calls set it); else HEAD, with
    ' dirty' when tracked files differ from it."""
    if os.environ.get("DSMOE_COMMIT"):
        return os.environ["DSMOE_COMMIT"]
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=repo).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown (no git here: name it when committing the result)"
    return head + (" dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def elapsed_ms(fn) -> float:
    """Milliseconds of one fn() call, by CUDA events around it (the host clock where there is no CUDA)."""
    if not torch.cuda.is_available():
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def cuda_ms(fn, repeats: int = 30, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `repeats` timed calls after `warmup` untimed ones (the benchmarks'
    one timer, so their figures are measured alike)."""
    for _ in range(warmup):
        fn()
    return statistics.median(elapsed_ms(fn) for _ in range(repeats))


def load_model_or_exit(path: str, trust_pickle: bool = False):
    """dsmoe.infer.load, or exit with status 2 and the reason in one line (the tools' common start)."""
    from dsmoe.config import ConfigError
    from dsmoe.infer import load
    from dsmoe.train.checkpoint import CheckpointError

    try:
        return load(path, trust_pickle)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def add_trust_pickle_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="read a run checkpoint saved before 2026-12-02 through DeepSpeed's pickled files (they can run "
        "code when loaded: only for checkpoints you trust); newer checkpoints need only safetensors and JSON",
    )


def add_routing_arguments(parser: argparse.ArgumentParser, mlp_prefix: str = "") -> None:
    for prefix, what in ((mlp_prefix, "MLP"), ("attention-", "MoA attention")):
        group = parser.add_mutually_exclusive_group()
        group.add_argument(
            f"--{prefix}top-k", type=int, metavar="K", help=f"{what}: keep the K most probable experts"
        )
        group.add_argument(
            f"--{prefix}threshold",
            type=float,
            metavar="EPS",
            help=f"{what}: keep expert i when N * p_i > EPS",
        )
        group.add_argument(
            f"--{prefix}threshold-top-k",
            type=float,
            metavar="EPS",
            help=f"{what}: top-K with K the batch-average count of the threshold rule",
        )
        group.add_argument(f"--{prefix}dense", action="store_true", help=f"{what}: run every expert")


def _rule(args: argparse.Namespace, prefix: str, default: RoutingRule) -> RoutingRule:
    if getattr(args, f"{prefix}top_k") is not None:
        return RoutingRule("top_k", k=getattr(args, f"{prefix}top_k"))
    if getattr(args, f"{prefix}threshold") is not None:
        return RoutingRule("threshold", eps=getattr(args, f"{prefix}threshold"))
    if getattr(args, f"{prefix}threshold_top_k") is not None:
        return RoutingRule("threshold_top_k", eps=getattr(args, f"{prefix}threshold_top_k"))
    if getattr(args, f"{prefix}dense"):
        return RoutingRule()
    return default


def routing_from_args(args: argparse.Namespace, default: Routing, mlp_prefix: str = "") -> Routing:
    """The routing the flags ask for; a layer type without flags keeps `default`'s rule."""
    return Routing(
        mlp=_rule(args, mlp_prefix, default.mlp), attention=_rule(args, "attention_", default.attention)
    )
