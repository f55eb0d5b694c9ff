"""Calibrate reference system time (RST, papers/no_train_no_gain.md): time every step configuration the
NTNG methods produce for a config on this device, and write the table runs charge their budgets from.

    python tools/research/calibrate_rst.py --config configs/tiny.yaml [--repeats 10] [--warmup 3] [key=value ...]

What is timed, each with real steps of the real model through the DeepSpeed engine of dsmoe/train/engine.py
(one process: the reference system is one device running the whole global batch):
- train: one optimizer step (forward + backward of every micro-batch of train.global_batch_size, then
  the boundary step with clipping) with 1..L active blocks, for each --optimizers entry;
- forward: a no-grad scoring pass (logits and per-sequence loss) over --forward-batches x the global
  batch, for each active-block count (selective backprop and RHO-loss score larger batches);
- hessian: Sophia-G's Gauss-Newton-Bartlett pass (forward, labels sampled from the logits, backward,
  Hessian EMA update through engine.step), when sophia is among --optimizers;
- each --routings entry (dense: DS-MoE; sparse: model.moe.training=sparse) for DS-MoE models.
Fewer active blocks run through dsmoe.train.methods.run_blocks on the full model, as layer dropping and
(approximately: the optimizer also steps the inactive blocks, without gradients) stacking execute them.
Each entry is the median (or, with --statistic min, the minimum) of --repeats timed steps after --warmup
untimed ones (CUDA synchronised); a new engine first takes --warmup + 2 untimed steps.

Writes benchmarks/rst/<device>_<config>.json (or --out) with device, date, commit, torch version, the
command and the model config; model.vocab_size 0 is taken as data.tokenizer_vocab_size padded to 64
(the trained tokenizer's vocabulary is at most that; timing does not depend on the difference).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # tools/_cli.py
from _cli import git_commit  # noqa: E402

from dsmoe import config as config_lib  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
    except OSError:
        names = []
    cores = os.cpu_count() or 0
    return f"CPU {names[0] if names else 'unknown'} ({cores} cores, {torch.get_num_threads()} torch threads)"


def device_slug() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_engine(cfg, dims, optimizer: str):
    """The run's DeepSpeed engine; for lion / sophia the same config with that client optimizer."""
    import deepspeed

    from dsmoe.model import build
    from dsmoe.train import engine as engine_lib
    from dsmoe.train.optim import build_optimizer

    torch.manual_seed(cfg.train.seed)
    model = build(cfg.model)
    if optimizer == "adamw":
        return engine_lib.initialize(model, cfg, dims)
    t = cfg.train
    model = model.to(dims.device)
    extra = {"gnb_batch_tokens": t.global_batch_size * cfg.data.seq_len} if optimizer == "sophia" else {}
    client = build_optimizer(
        optimizer, engine_lib.param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), **extra
    )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=client, config=engine_lib.deepspeed_config(cfg, dims)
    )
    engine.dsmoe_dims, engine.dsmoe_clip = dims, t.grad_clip if engine_lib.we_clip(cfg) else 0.0
    return engine


def time_passes(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - started)
    return samples


def train_step(engine, micro_batches, active: int, hessian: bool = False) -> None:
    """One optimizer step with the first `active` blocks: forward + backward per micro-batch, then the
    boundary step. hessian: Sophia-G's GNB pass instead (labels sampled from the logits, h updated)."""
    from dsmoe.train import engine as engine_lib
    from dsmoe.train.methods import run_blocks
    from dsmoe.train.optim import sample_gnb_targets

    for micro, (x, y) in enumerate(micro_batches):
        with run_blocks(engine.module, range(active)):
            out = engine(x) if hessian else engine(x, y)
        if hessian:
            targets = sample_gnb_targets(out.logits).flatten()
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), targets)
        else:
            loss = out.loss
        engine.backward(loss)
        if micro < len(micro_batches) - 1:
            engine.step()  # accumulates; DeepSpeed updates only on the boundary
        else:
            engine.basic_optimizer.hessian_pass = hessian
            engine_lib.boundary_step(engine)


def scoring_pass(engine, micro_batches, active: int) -> None:
    """A no-grad forward over `micro_batches` with the first `active` blocks: logits and per-sequence loss."""
    from dsmoe.train.methods import per_sequence_loss, run_blocks

    with torch.no_grad(), run_blocks(engine.module, range(active)):
        for x, y in micro_batches:
            per_sequence_loss(engine(x).logits, y)


def scoring_size(multiple: float, global_batch: int, micro_batch: int) -> int:
    """Sequences in a scoring pass of `multiple` x the global batch: a whole number of micro-batches, as
    batch selection runs it (global_batch_size / fraction; config load refuses a fraction that is not)."""
    size = round(multiple * global_batch)
    if abs(size - multiple * global_batch) > 1e-6 or size % micro_batch or size <= 0:
        raise SystemExit(
            f"--forward-batches {multiple:g}: {multiple:g} x train.global_batch_size {global_batch} must be a "
            f"positive multiple of train.micro_batch_size {micro_batch}"
        )
    return size


def calibrate(cfg, args, command: str):
    from dsmoe.train import engine as engine_lib
    from dsmoe.train.budget import RstEntry, RstTable, StepConfig
    from parallel import groups

    dims = groups.init(cfg.parallel)
    if dims.world_size != 1:
        raise SystemExit("calibrate_rst runs in one process: the reference system is one device")
    t, seq_len, vocab = cfg.train, cfg.data.seq_len, cfg.model.vocab_size
    gas = engine_lib.gradient_accumulation_steps(cfg, dims)
    layers = args.layers or list(range(1, cfg.model.n_layers + 1))
    routings = args.routings or [cfg.model.moe.training if cfg.model.mlp == "moe" else "dense"]
    if cfg.model.mlp != "moe" and routings != ["dense"]:
        raise SystemExit("--routings sparse needs DS-MoE MLPs (model.mlp: moe)")
    generator = torch.Generator().manual_seed(t.seed)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        shape = (t.micro_batch_size, seq_len)
        x = torch.randint(0, vocab, shape, generator=generator)
        return x.to(dims.device), torch.randint(0, vocab, shape, generator=generator).to(dims.device)

    micro_batches = [batch() for _ in range(gas)]
    forward_sizes = [
        scoring_size(multiple, t.global_batch_size, t.micro_batch_size) for multiple in args.forward_batches
    ]
    scoring_batches = [batch() for _ in range(max(forward_sizes, default=0) // t.micro_batch_size)]
    entries = []

    def measure(fn, **key) -> None:
        samples = time_passes(fn, args.warmup, args.repeats)
        step = StepConfig(micro_batch_size=t.micro_batch_size, seq_len=seq_len, **key)
        seconds = min(samples) if args.statistic == "min" else statistics.median(samples)
        entries.append(RstEntry(step=step, seconds=seconds, samples=samples))
        print(f"{step.describe()}: {1000 * entries[-1].seconds:.2f} ms", flush=True)

    for routing in routings:
        cfg.model.moe.training = routing
        for index, optimizer in enumerate(args.optimizers):
            engine = make_engine(cfg, dims, optimizer)
            for _ in range(
                args.warmup + 2
            ):  # a new engine's first steps are slow (allocations, thread pools)
                train_step(engine, micro_batches, max(layers))
            common = dict(batch_size=t.global_batch_size, routing=routing, optimizer=optimizer)
            for active in layers:
                measure(
                    lambda e=engine, a=active: train_step(e, micro_batches, a),
                    kind="train",
                    active_layers=active,
                    **common,
                )
                if optimizer == "sophia":
                    measure(
                        lambda e=engine, a=active: train_step(e, micro_batches, a, hessian=True),
                        kind="hessian",
                        active_layers=active,
                        **common,
                    )
                if index == 0:  # a forward pass costs the same under every optimizer
                    for size in forward_sizes:
                        passes = scoring_batches[: size // t.micro_batch_size]
                        measure(
                            lambda e=engine, a=active, p=passes: scoring_pass(e, p, a),
                            kind="forward",
                            active_layers=active,
                            batch_size=size,
                            routing=routing,
                        )
            engine.destroy()
    return RstTable(
        device=device_name(),
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        commit=git_commit(),
        torch_version=torch.__version__,
        command=command,
        precision=t.precision,
        model=config_lib.to_dict(cfg)["model"],  # moe.training: the last routing timed; entries say theirs
        timing=(
            f"DeepSpeed engine (dsmoe/train/engine.py, ZeRO {cfg.parallel.zero_stage}, {t.precision}), one process; "
            f"{args.statistic} of {args.repeats} steps after {args.warmup} warmup steps; random tokens"
        ),
        entries=entries,
    )


def check_monotone(table) -> list[str]:
    """More active blocks must cost more; a violation means the timing is noise-dominated."""
    warnings = []
    by_shape: dict = {}
    for e in table.entries:
        s = e.step
        by_shape.setdefault((s.kind, s.batch_size, s.routing, s.optimizer), []).append(
            (s.active_layers, e.seconds)
        )
    for shape, points in by_shape.items():
        points.sort()
        for (la, ta), (lb, tb) in zip(points, points[1:], strict=False):
            if tb <= ta:
                warnings.append(
                    f"{shape}: {lb} active layers ({tb * 1000:.2f} ms) not slower than {la} ({ta * 1000:.2f} ms)"
                )
    return warnings


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--layers", type=int, nargs="*", help="active-block counts (default: 1..model.n_layers)"
    )
    parser.add_argument(
        "--forward-batches",
        type=float,
        nargs="*",
        default=[1, 2],
        help="scoring-pass sizes as multiples of the global batch (selective backprop at fraction 1/2 scores 2x, "
        "at 0.8 1.25x)",
    )
    parser.add_argument("--optimizers", nargs="*", default=["adamw"], choices=["adamw", "lion", "sophia"])
    parser.add_argument("--routings", nargs="*", choices=["dense", "sparse"], help="DS-MoE training routings")
    parser.add_argument(
        "--statistic",
        choices=["median", "min"],
        default="median",
        help="per entry: median (the paper's) or min (on a machine shared with other work, which only adds time)",
    )
    parser.add_argument("--out", help="table path (default benchmarks/rst/<device>_<config>.json)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = [*args.overrides, "train.wandb=false", "train.progress=false"]
    try:
        cfg = config_lib.load(args.config, overrides)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg.model.vocab_size == 0:
        from dsmoe.data import pad_vocab

        cfg.model.vocab_size = pad_vocab(cfg.data.tokenizer_vocab_size)
    command = "python tools/research/calibrate_rst.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    table = calibrate(cfg, args, command)
    out = (
        Path(args.out)
        if args.out
        else REPO / "benchmarks" / "rst" / f"{device_slug()}_{Path(args.config).stem}.json"
    )
    table.save(out)
    noisy = [e.step.describe() for e in table.entries if statistics.median(e.samples) > 1.5 * min(e.samples)]
    if noisy:
        print(
            f"warning: {len(noisy)} entries have median > 1.5 x min (another process on this device?)",
            file=sys.stderr,
        )
    for warning in check_monotone(table):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{len(table.entries)} entries on {table.device} in {time.perf_counter() - started:.0f} s: {out}")
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
