"""Where a training step waits for the GPU: every host synchronisation in the Trainer's steps, by call site.

    python tools/sync_check.py --config configs/dsmoe_1b.yaml --steps 4 --from-step 2 train.compile=true

Runs a short training (no checkpoints, no export, no wandb) with torch.cuda.set_sync_debug_mode("warn") on from
step --from-step (earlier steps compile and warm up), and prints, per step, each synchronising call with the
innermost frames of dsmoe / DeepSpeed / megatron that led to it. A sync stalls the host until the GPU has caught
up, so the launches that follow it are no longer hidden behind GPU work (issue #25: host gaps). CUDA only.

The debug mode reports the syncs that tensor operations imply (.item(), nonzero, a copy to the host), not an
explicit torch.cuda.synchronize(): DeepSpeed's throughput timer called that around every micro-batch and this
tool did not see it (benchmarks/fa4_h100/). So explicit device syncs are counted too, filed as "synchronize()".
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsmoe import config as config_lib  # noqa: E402
from dsmoe.train.feature import Feature  # noqa: E402
from dsmoe.train.loop import Trainer, features_for  # noqa: E402

OURS = ("dsmoe/", "parallel/", "deepspeed/", "megatron/")


def call_site(stack: list[traceback.FrameSummary], depth: int) -> str:
    """The innermost `depth` frames in our code or the engines we drive (torch's own frames skipped)."""
    frames = [f for f in stack if any(part in f.filename for part in OURS) and "sync_check" not in f.filename]
    return " <- ".join(
        f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
        for f in reversed(frames[-depth:])
    )


class SyncWatch(Feature):
    """Turns the sync debug mode on for steps >= first and files each warning under its step and call site."""

    def __init__(self, first: int, depth: int):
        self.first, self.depth = first, depth
        self.sites: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        self.step = None
        self.device_synchronize = torch.cuda.synchronize

    def before_step(self, trainer, step: int) -> None:
        self.step = None
        self.device_synchronize()  # the previous step's tail is not this step's
        self.step = step if step >= self.first else None
        torch.cuda.set_sync_debug_mode("warn" if self.step is not None else "default")

    def explicit_synchronize(self, *args, **kwargs):
        """torch.cuda.synchronize, counted under its call site while a step is watched."""
        if self.step is not None:
            site = call_site(traceback.extract_stack()[:-1], self.depth)
            self.sites[self.step][f"synchronize(): {site}"] += 1
        return self.device_synchronize(*args, **kwargs)

    def after_step(self, trainer, step: int, record: dict) -> None:
        torch.cuda.set_sync_debug_mode("default")  # validation, logging, saving are not the step

    def showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:
        if self.step is not None and "synchroniz" in str(message):
            self.sites[self.step][call_site(traceback.extract_stack()[:-1], self.depth)] += 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/dsmoe_1b.yaml")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--from-step", type=int, default=2, help="first step watched (0-based)")
    parser.add_argument("--depth", type=int, default=3, help="frames of our code shown per site")
    parser.add_argument("--json", help="also write {step: {site: count}} here")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs CUDA (set_sync_debug_mode watches CUDA synchronisations)")
    run_dir = Path("/tmp/sync_check_run")
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = config_lib.load(
        args.config,
        [
            *args.overrides,
            f"train.max_steps={args.steps}",
            "train.checkpoint_every=0",
            f"train.warmup_steps={min(1, args.steps - 1)}",
            "train.export_at_end=false",
            "train.wandb=false",
            "train.progress=false",
            f"train.run_dir={run_dir}",
        ],
    )
    watch = SyncWatch(args.from_step, args.depth)
    warnings.simplefilter("always")
    warnings.showwarning = watch.showwarning
    torch.cuda.synchronize = watch.explicit_synchronize  # DeepSpeed's accelerator calls it through the module
    try:
        Trainer(cfg, features_for(cfg) + [watch]).run()
    finally:
        torch.cuda.synchronize = watch.device_synchronize
    torch.cuda.set_sync_debug_mode("default")
    for step in sorted(watch.sites):
        sites = watch.sites[step]
        print(f"step {step}: {sum(sites.values())} synchronising call(s)")
        for site, count in sites.most_common():
            print(f"  {count:4d}  {site or '(torch only)'}")
    if not watch.sites:
        print(f"no synchronising call in steps {args.from_step}..{args.steps - 1}")
    if args.json:
        Path(args.json).write_text(json.dumps({s: dict(c) for s, c in watch.sites.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
