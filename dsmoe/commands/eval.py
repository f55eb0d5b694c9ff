"""Held-out perplexity of an exported model or a run, under a routing rule.

    dsmoe eval MODEL_OR_RUN_DIR [--top-k K | --threshold EPS | --dense] [--max-tokens N]

Prints perplexity on the run's fixed held-out sample (the held-out works, or the validation split of an
indexed blend, overall and per source) and the fraction of MLP expert parameters (and of all non-embedding
parameters) computed per token. Without a rule: the export's own rule, or dense for a run.
"""

from __future__ import annotations

import math
import sys

import torch

from dsmoe.commands.args import (
    add_routing_arguments,
    add_trust_pickle_argument,
    load_model_or_exit,
    parser_for,
    routing_from_args,
)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from dsmoe.data.corpus import DataError
    from dsmoe.evaluation import evaluate, held_out_set
    from dsmoe.report import held_out_name

    parser = parser_for(__doc__, prog)
    parser.add_argument("path", help="exported model directory or training run directory")
    parser.add_argument(
        "--max-tokens", type=int, default=0, help="evaluate the first this many tokens of the sample (0: all)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_routing_arguments(parser)
    add_trust_pickle_argument(parser)
    args = parser.parse_args(argv)
    loaded = load_model_or_exit(args.path, args.trust_pickle)
    rule = routing_from_args(args, loaded.routing)
    model = loaded.model.to(args.device)
    try:
        held_out = held_out_set(loaded.cfg, loaded.tokenizer_path).first(args.max_tokens)
    except DataError as e:  # an indexed run's sample is its validation split: the data must be where it was
        print(f"error: the held-out sample of {args.path} cannot be read: {e}", file=sys.stderr)
        return 2
    result = evaluate(model, held_out, rule, args.batch_size)
    print(f"{args.path}: held-out {held_out_name(loaded.cfg, held_out)}, {result.tokens} tokens")
    print(result.row())
    if len(result.source_loss) > 1:
        print(
            "  per source: " + ", ".join(f"{k} ppl {math.exp(v):.2f}" for k, v in result.source_loss.items())
        )
    return 0
