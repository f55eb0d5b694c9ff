"""What the benchmark and research drivers share: the commit a result was measured at, one timer. (The user
commands' argument helpers live in dsmoe/commands/args.py.)"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


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


def device_tag(device_name: str | None = None) -> str:
    """The short GPU name results are filed under (h100, h200, a100, b200: the model number in the device's
    name), or cpu. One function for every benchmark, so tools/regress.py finds a run's files by one tag."""
    if device_name is None:
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    found = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", device_name)
    return found.group(1).lower() if found else ("cpu" if device_name.lower().startswith("cpu") else "gpu")


def elapsed_ms(fn) -> float:
    """Milliseconds of one fn() call, by CUDA events around it (the host clock where there is no CUDA)."""
    if not torch.cuda.is_available():
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def cuda_ms(fn, repeats: int = 30, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `repeats` timed calls after `warmup` untimed ones (the benchmarks'
    one timer, so their figures are measured alike)."""
    for _ in range(warmup):
        fn()
    return statistics.median(elapsed_ms(fn) for _ in range(repeats))


def graph_ms(fn, repeats: int = 30, warmup: int = 2) -> float:
    """Median milliseconds of fn() replayed as one captured CUDA graph (no launch gaps between its kernels),
    after `warmup` calls on a side stream off the capture (compiles, autotuning); cuda_ms where CUDA is
    absent."""
    if not torch.cuda.is_available():
        return cuda_ms(fn, repeats, warmup)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_ms(graph.replay, repeats)
