"""Argument helpers shared by the user-facing tools: routing rules per layer type."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

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


def load_model_or_exit(path: str):
    """dsmoe.infer.load, or exit with status 2 and the reason (the tools' common start)."""
    from dsmoe.infer import load
    from dsmoe.train.checkpoint import CheckpointError

    try:
        return load(path)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


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
