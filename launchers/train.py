"""Entry point: `deepspeed launchers/train.py [--config configs/X.yaml] [key=value ...]`.

Also runs under `torchrun` and plain `python`. With no --config it trains configs/tiny.yaml.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo), without its warning


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a DS-MoE model.", epilog="Overrides: key=value, e.g. train.max_steps=50"
    )
    parser.add_argument("--config", default=None, help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)

    from dsmoe import config as config_lib

    try:
        cfg = config_lib.load(args.config, args.overrides)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from dsmoe.data.corpus import DataError
    from dsmoe.run import TrainingDiverged, run
    from dsmoe.train.checkpoint import CheckpointError

    started = time.perf_counter()
    try:
        result = run(cfg)
    except (config_lib.ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    if result.summary is not None:
        print(f"wall time {time.perf_counter() - started:.0f} s for {result.steps} steps", flush=True)
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
