"""Tokenize raw text into megatron-core's indexed dataset (PREFIX.bin + PREFIX.idx) and a PREFIX.json sidecar.

    dsmoe prepare-data INPUT [INPUT ...] --tokenizer TOK --out PREFIX [--text-key text]
        [--workers N] [--no-append-eos] [--eos-token T] [--strict]

INPUT: files, globs or directories (every supported file under one, sorted) of .jsonl, .jsonl.gz, .jsonl.zst
and .parquet (a document per line or row, in --text-key) and .txt (one document per file). TOK: a tokenizer
directory (AutoTokenizer, local files) or a tokenizer.json. Megatron-LM and NeMo read PREFIX as their own
(one document per sequence, ids then the end-of-document token); PREFIX.json says which tokenizer made it.

Bad records (invalid JSON, no text, empty text, not UTF-8) are counted and skipped; --strict stops at the
first. Exit status 2: a bad input or tokenizer (before any work), a bad record under --strict, or nothing
to write; nothing is published then. PREFIX counts as written only once PREFIX.idx exists (written last).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from dsmoe.commands.args import parser_for


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from dsmoe.data.corpus import DataError
    from dsmoe.data.prepare_data import prepare_indexed
    from dsmoe.data.tokenizer import load_tokenizer

    parser = parser_for(__doc__, prog)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="input files, globs or directories")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory or tokenizer.json")
    parser.add_argument(
        "--out", required=True, metavar="PREFIX", help="writes PREFIX.bin, PREFIX.idx, PREFIX.json"
    )
    parser.add_argument("--text-key", default="text", help="JSON field or Parquet column of the text")
    parser.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        help="tokenizing processes (default: the cores this process may use; 0: in the main process)",
    )
    parser.add_argument(
        "--append-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end each document with the tokenizer's end-of-document token",
    )
    parser.add_argument(
        "--eos-token", default="", help="the end-of-document token, if not the tokenizer's own"
    )
    parser.add_argument("--strict", action="store_true", help="the first bad record stops the run (status 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    try:
        # The sidecar records the tokenizer as the user named it, not as resolved on this machine.
        tokenizer = dataclasses.replace(load_tokenizer(args.tokenizer, args.eos_token), source=args.tokenizer)
        summary = prepare_indexed(
            args.inputs,
            tokenizer,
            args.out,
            text_key=args.text_key,
            workers=args.workers,
            append_eos=args.append_eos,
            strict=args.strict,
            progress=not args.no_progress,
        )
    except DataError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the cause printed
        return 2
    print(summary.report())
    return 0
