"""Argument helpers shared by the user-facing tools."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dsmoe.model import RoutingRule  # noqa: E402


def add_routing_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--top-k", type=int, help="keep the K most probable experts per token")
    group.add_argument("--threshold", type=float, help="keep expert i when N * p_i > EPS (paper: 0.48)")
    group.add_argument("--dense", action="store_true", help="run every expert (the training computation)")


def routing_from_args(args: argparse.Namespace, default: RoutingRule) -> RoutingRule:
    if args.top_k is not None:
        return RoutingRule("top_k", k=args.top_k)
    if args.threshold is not None:
        return RoutingRule("threshold", eps=args.threshold)
    if args.dense:
        return RoutingRule()
    return default
