"""Held-out perplexity of an exported model or a run, under a routing rule.

    python tools/eval_ppl.py MODEL_OR_RUN_DIR [--top-k K | --threshold EPS | --dense] [--max-tokens N]

Prints perplexity on the held-out works and the fraction of MLP expert parameters (and of all
non-embedding parameters) computed per token. Without a rule: the export's own rule, or dense for a run.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _cli import add_routing_arguments, load_model_or_exit, routing_from_args

from dsmoe.infer import held_out_tokens, perplexity


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", help="exported model directory or training run directory")
    parser.add_argument(
        "--max-tokens", type=int, default=0, help="evaluate at most this many tokens (0: all)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_routing_arguments(parser)
    args = parser.parse_args()
    loaded = load_model_or_exit(args.path)
    rule = routing_from_args(args, loaded.routing)
    model = loaded.model.to(args.device)
    tokens = held_out_tokens(loaded.cfg, loaded.tokenizer_path)
    result = perplexity(model, tokens, loaded.cfg.data.seq_len, rule, args.max_tokens, args.batch_size)
    print(f"{args.path}: held-out {', '.join(loaded.cfg.data.val_works)}, {result.tokens} tokens")
    print(result.row())
    return 0


if __name__ == "__main__":
    sys.exit(main())
