"""Cut a run's checkpoint for another tensor/expert-parallel layout, into a new run directory.

    dsmoe reshard RUN_DIR OUT_RUN_DIR --tp T --ep E [--tag step_00000300]
    deepspeed --num_gpus N launchers/train.py --config CONFIG train.run_dir=OUT_RUN_DIR parallel.tp=T parallel.ep=E

Any layout can resume any checkpoint without this (each rank then joins every shard and cuts its piece,
holding the whole model and its Adam moments in host memory for a moment). Resharding once, on one machine,
lets each rank of the new layout read only its own shard: the way to resume a large model on many GPUs.
Reads only safetensors and JSON. The new run directory gets the checkpoint (parameters and Adam moments in
fp32, our state, the tokenizer, rank 0's RNG states) and the metrics up to its step, so the resumed run
continues the same loss curve; the data-parallel size and ZeRO stage are free to change at the resume.
"""

from __future__ import annotations

import sys

from dsmoe.commands.args import parser_for


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from dsmoe.config import ConfigError
    from dsmoe.train.checkpoint import CheckpointError, reshard

    parser = parser_for(__doc__, prog)
    parser.add_argument("run_dir")
    parser.add_argument("out_dir", metavar="out_run_dir")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the new layout")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size of the new layout")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest intact one)")
    args = parser.parse_args(argv)
    if args.tp < 1 or args.ep < 1:
        parser.error("--tp and --ep must be >= 1")
    try:
        out = reshard(args.run_dir, args.out_dir, args.tp, args.ep, args.tag)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"resharded {out.name} of {args.run_dir} for tp {args.tp} x ep {args.ep} into {out}; resume it with "
        f"train.run_dir={args.out_dir} parallel.tp={args.tp} parallel.ep={args.ep}"
    )
    return 0
