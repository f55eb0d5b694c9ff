"""Where the host spends a training step: a py-spy recording summarised by call site.

    py-spy record --nonblocking -r 250 --format raw -o spy.txt -- python benchmarks/bench_train.py ...
    python tools/host_profile.py spy.txt > host.md

The GPU idles whenever the host falls behind it: after a device synchronisation (the queue drains and the next
kernels wait for their launches) or when Python between launches is slower than the kernels. The kernel
profile (bench_train --profile) shows how long the GPU waited, not why; this shows why. It keeps the samples
inside Trainer.step, drops those compiling (dynamo, inductor, Triton's compiler: warm-up, not the steady
step), and files the rest under their innermost dsmoe / DeepSpeed frame, then lists what called each device
synchronize. `bash tools/device.sh host` records and summarises DS-MoE-1B.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

COMPILING = ("_dynamo/", "_inductor/", "triton/backends", "triton/runtime/cache", "sympy/", "importlib")
RUNNING_COMPILED = ("Runner.call", "static_triton_launcher")  # inductor's generated code at run time
OURS = ("dsmoe/", "deepspeed/", "parallel/", "megatron/")


def short(frame: str) -> str:
    """'fn (path/to/file.py:12)' -> 'fn (file.py:12)'."""
    return re.sub(r"\((?:.*/)?", "(", frame)


def summarise(lines, top: int = 25) -> str:
    by_site, sync_callers = collections.Counter(), collections.Counter()
    step = steady = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames, n = stack.split(";"), int(count)
        if not any(f.startswith("Trainer.step ") for f in frames):
            continue
        step += n
        compiling = any(c in f for f in frames for c in COMPILING)
        if compiling and not any(r in f for f in frames for r in RUNNING_COMPILED):
            continue
        steady += n
        ours = [f for f in frames if any(o in f for o in OURS)]
        by_site[short(ours[-1]) if ours else short(frames[-1])] += n
        if frames[-1].startswith("synchronize ") or "synchronize (" in frames[-1]:
            sync_callers[" <- ".join(short(f) for f in reversed(frames[-4:-1]))] += n
    if not steady:
        return "no samples inside Trainer.step (was the recording of a training run?)\n"
    out = [
        f"{step} samples inside Trainer.step, {steady} of them not compiling (the steady step); shares of those.",
        "",
        "| share | innermost dsmoe / DeepSpeed frame |",
        "|---|---|",
    ]
    out += [f"| {n / steady:.1%} | `{site}` |" for site, n in by_site.most_common(top)]
    out += ["", "Device synchronize, by caller (innermost first):", "", "| share | callers |", "|---|---|"]
    out += [f"| {n / steady:.1%} | `{callers}` |" for callers, n in sync_callers.most_common(8)]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recording", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    with args.recording.open() as f:
        print(summarise(f, args.top), end="")


if __name__ == "__main__":
    main()
