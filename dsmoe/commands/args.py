"""Arguments the subcommands share: routing rules per layer type, --trust-pickle, loading a model."""

from __future__ import annotations

import argparse
import sys

from dsmoe.model import Routing, RoutingRule


def parser_for(doc: str, prog: str | None) -> argparse.ArgumentParser:
    """A subcommand's parser: its module docstring is its --help."""
    return argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def load_model_or_exit(path: str, trust_pickle: bool = False):
    """dsmoe.infer.load, or exit with status 2 and the reason in one line."""
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
