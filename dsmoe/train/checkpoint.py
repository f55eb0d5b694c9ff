"""Training checkpoints that are never half-written: the DeepSpeed checkpoint plus our state.

Layout of RUN_DIR/checkpoints/:
  step_00000100/          one complete checkpoint
    (DeepSpeed's model / optimizer / scheduler files)
    rng_rank{r}.pt        Python, NumPy and torch RNG states of rank r
    shard_tp{t}_ep{e}.safetensors   the parameters (fp32 masters) and Adam moments ('exp_avg/<name>',
                          'exp_avg_sq/<name>') held at tensor rank t, expert rank e, named as in the plain
                          model: parallel/layout.py joins them, so any layout can resume from them
                          (load_resharded; also the way back for ep > 1 without ZeRO, where DeepSpeed's
                          files hold only the first expert rank's optimizer state)
    tokenizer.json        the tokenizer the run trained
    dsmoe_state.json      our state (step, config, layout, budget, datasets) as JSON: with the shards, all that
                          exporting or evaluating a checkpoint reads, so neither unpickles anything (a
                          checkpoint from elsewhere could run code on load); DeepSpeed's files and the RNG
                          states are pickles, read only to resume one's own run
    manifest.json         every file above with its size and SHA-256; written last
    A checkpoint `dsmoe reshard` wrote holds only the shards (cut for its target layout), our state (marked
    "layout_free"), the tokenizer, rank 0's RNG states and the manifest: it resumes through the shards, each
    rank reading only its own file when the run's (tp, ep) is the one it was cut for.
  step_00000200.partial/  a save in progress (or one a killed process left behind): never loaded
  latest                  the tag of the newest complete checkpoint

A save writes everything under `<tag>.partial`, fsyncs it, writes the manifest, renames the directory to
`<tag>` and only then replaces `latest` (write to a temporary file, fsync, rename). A process killed at
any moment therefore leaves `latest` naming a complete checkpoint. Loading verifies the manifest; if
`latest` is missing, unreadable or names a damaged checkpoint, the newest complete one is used instead,
with a warning naming what was skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dsmoe import config as config_lib

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE = "dsmoe_state.json"
TRUST_PICKLE = (
    "it holds no dsmoe_state.json and parameter shards (saved before 2026-12-02), so reading it means "
    "unpickling DeepSpeed's files, which can run code: pass --trust-pickle (trust_pickle=True) if it is yours"
)
PARTIAL = ".partial"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged, or does not fit the run loading it."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path, sync: bool = False) -> str:
    """SHA-256 of a file; with sync, also make sure its bytes are on disk (when publishing a save)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p, sync=True)}
        for p in files
    }
    _write_atomic(directory / MANIFEST, json.dumps({"files": entries}, indent=1))


def verify(directory: Path) -> list[str]:
    """What is wrong with a checkpoint directory (empty list: complete and intact)."""
    manifest = directory / MANIFEST
    if not directory.is_dir():
        return [f"{directory.name} does not exist"]
    if not manifest.is_file():
        return [f"{directory.name} has no {MANIFEST} (its save never finished)"]
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return [f"{manifest} is unreadable ({e})"]
    problems = []
    for name, expected in entries.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}")
        elif _sha256(path) != expected["sha256"]:
            problems.append(f"{name} does not match its checksum")
    return problems


def complete_tags(run_dir: str | Path) -> list[str]:
    """Tags of checkpoint directories that finished saving (have a manifest), newest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    tags = [
        p.name
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(PARTIAL)
    ]
    return sorted((t for t in tags if (root / t / MANIFEST).is_file()), reverse=True)


def _read_latest(root: Path) -> str | None:
    try:
        tag = (root / "latest").read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return tag or None


def resume_tag(run_dir: str | Path) -> str | None:
    """The checkpoint to resume from: `latest` if intact, else the newest intact one (with a warning).

    None when the run has no checkpoint at all; CheckpointError when checkpoints exist but none is intact
    (restarting from scratch would silently throw the run away).
    """
    root = checkpoint_root(run_dir)
    named = _read_latest(root)
    candidates = ([named] if named else []) + [t for t in complete_tags(run_dir) if t != named]
    if not candidates:
        return None
    skipped = []
    for tag in candidates:
        problems = verify(root / tag)
        if not problems:
            if skipped:
                warnings.warn(
                    f"resuming from {root / tag}; skipped damaged checkpoints: {'; '.join(skipped)}",
                    stacklevel=2,
                )
            return tag
        skipped.append(f"{tag} ({', '.join(problems[:3])})")
    raise CheckpointError(
        f"no intact checkpoint in {root}: {'; '.join(skipped)}; move them away to start afresh"
    )


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def remove_partial_saves(run_dir: str | Path) -> None:
    """Delete what killed saves left behind (rank 0, before training starts)."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.endswith(PARTIAL) or p.name == "latest.tmp":
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def save(
    engine, run_dir: str | Path, step: int, client_state: dict, tokenizer_path: Path, rank: int, keep: int
) -> str:
    """Save a checkpoint after `step` optimizer steps, atomically (collective: every rank calls it).

    On a failed save (disk full, ...) the partial directory is removed and `latest` still names the
    previous checkpoint; the error says so.
    """
    root, tag = checkpoint_root(run_dir), tag_for(step)
    staging = root / (tag + PARTIAL)
    try:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()
        torch.save(rng_state(), staging / f"rng_rank{rank}.pt")
        if rank == 0:
            shutil.copyfile(tokenizer_path, staging / "tokenizer.json")
        client_state["dsmoe"]["engine"] = engine_counters(engine)
        if rank == 0:
            # What JSON cannot hold (none today) is written as text: exports read only config, step and depth.
            (staging / STATE).write_text(json.dumps(client_state["dsmoe"], indent=1, default=str))
        with _as_plain_deepspeed(engine):
            engine.save_checkpoint(str(root), tag=staging.name, client_state=client_state, save_latest=False)
        _save_shards(engine, staging)
        dist.barrier()
        if rank == 0:
            write_manifest(staging)
            shutil.rmtree(root / tag, ignore_errors=True)  # a save of this step from before a resume
            os.replace(staging, root / tag)
            _fsync_dir(root)
            _write_atomic(root / "latest", tag)
            prune(run_dir, keep)
    except OSError as e:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        previous = _read_latest(root)
        raise CheckpointError(
            f"saving {tag} failed ({e}); `latest` still names {previous or 'no checkpoint'}, "
            "free space (or fix the error) and run the same command to resume from there"
        ) from e
    dist.barrier()
    return tag


def prune(run_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (0: keep all); never the one `latest` names."""
    if keep <= 0:
        return
    root = checkpoint_root(run_dir)
    latest = _read_latest(root)
    for tag in complete_tags(run_dir)[keep:]:
        if tag != latest:
            shutil.rmtree(root / tag, ignore_errors=True)


def load(engine, run_dir: str | Path, tag: str, rank: int, same_layout: bool = True) -> dict:
    """Load checkpoint `tag` into `engine` and this rank's RNG; returns our client state.

    In another layout (world size, dp/ep/tp, ZeRO stage) DeepSpeed's files cannot be read: the
    layout-free shards are (load_resharded); RNG streams then restart from rank 0's saved state.
    """
    root = checkpoint_root(run_dir)
    dims = getattr(engine, "dsmoe_dims", None)
    # Without ZeRO, DeepSpeed keeps one optimizer state (the first expert rank's): expert ranks read ours.
    experts_apart = dims is not None and dims.ep > 1 and not engine.zero_optimization()
    if not same_layout or experts_apart:
        ours = read_client_state(root / tag, trust_pickle=True)  # resuming one's own run
        activation = ours["config"]["model"]["moe"]["activation"]
        load_resharded(engine, root / tag, ours["engine"], activation)
        own_rng = root / tag / f"rng_rank{rank}.pt"
        rng = own_rng if same_layout and own_rng.is_file() else root / tag / "rng_rank0.pt"
        set_rng_state(torch.load(rng, weights_only=False))
        return ours
    rng_file = root / tag / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"{root / tag} has no {rng_file.name}: it was saved by fewer ranks")
    with _as_plain_deepspeed(engine):
        load_path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {root / tag}")
    _load_shards(engine, root / tag)
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state["dsmoe"]


def _dims(engine):
    dims = getattr(engine, "dsmoe_dims", None)
    return dims if dims is not None and dims.tp * dims.ep > 1 else None


def _shard_name(dims) -> str:
    return f"shard_tp{dims.tp_rank}_ep{dims.ep_rank}.safetensors"


@contextlib.contextmanager
def _as_plain_deepspeed(engine):
    """DeepSpeed's MoE checkpoint path expects its own expert modules (one per expert, named
    deepspeed_moe.experts...) and would drop our stacked expert shards; DeepSpeed saves and loads everything
    else, while the expert shards go into our own files (_save_shards). ZeRO's per-rank optimizer partitions are per rank either way."""
    has_moe = engine.has_moe_layers
    engine.has_moe_layers = False
    try:
        yield
    finally:
        engine.has_moe_layers = has_moe


MOMENTS = ("exp_avg", "exp_avg_sq")
"""AdamW's moments; Lion and Sophia-G name theirs in their `moments` attribute (dsmoe/train/optim.py)."""


def _inner_optimizer(engine):
    """torch's optimizer: DeepSpeed's ZeRO and bf16 optimizers wrap it, the plain path is it."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def moments_of(engine) -> tuple[str, ...]:
    """The per-parameter state tensors the engine's optimizer keeps (saved and restored by name)."""
    return tuple(getattr(_inner_optimizer(engine), "moments", MOMENTS))


def _adam_step(engine) -> float:
    for state in _inner_optimizer(engine).state.values():
        if "step" in state:
            return float(state["step"])
    return 0.0


def _master(engine, p) -> torch.Tensor:
    """The tensor torch's optimizer updates for `p` where DeepSpeed keeps no fragment links: `p` itself
    (fp32, no ZeRO), or its fp32 copy (bf16 without ZeRO on CPU: DeepSpeed's FP16_UnfusedOptimizer)."""
    fp16_groups, fp32_groups = (
        getattr(engine.optimizer, "fp16_groups", None),
        getattr(engine.optimizer, "fp32_groups", None),
    )
    if fp16_groups is not None and fp32_groups is not None:
        for low, high in zip(fp16_groups, fp32_groups, strict=True):
            for lp, hp in zip(low, high, strict=True):
                if lp is p:
                    return hp
    return p


def _moment(engine, p, key: str) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_optimizer_state

    value = safe_get_full_optimizer_state(p, key)  # ZeRO / bf16 optimizer: collective over p's data group
    if value is None:
        value = _inner_optimizer(engine).state.get(_master(engine, p), {}).get(key)
    return torch.zeros(p.shape, dtype=torch.float32) if value is None else value


def engine_counters(engine) -> dict:
    """What a resume in another layout needs besides the shards (layout-free scalars)."""
    return {
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "adam_step": _adam_step(engine),
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
    }


def full_state(engine) -> dict[str, torch.Tensor]:
    """This rank's parameters as fp32 masters under their plain names, with their Adam moments as
    '<moment>/<name>', on the CPU. Collective under ZeRO and the bf16 optimizer (every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    _link_optimizer_state(engine)
    tensors = {}
    for name, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p)
        tensors[name] = (
            (master if master is not None else _master(engine, p)).detach().float().cpu().contiguous()
        )
        for key in moments_of(engine):
            tensors[f"{key}/{name}"] = _moment(engine, p, key).detach().float().cpu().contiguous()
    return tensors


def _save_shards(engine, staging: Path) -> None:
    """Every parameter this (tp, ep) position of the layout holds, with its Adam moments, as fp32 under the
    plain model's names (moments as '<moment>/<name>'): with parallel/layout.py any layout can read them.
    Collective under ZeRO (every rank takes part); the first data-parallel replica writes."""
    from safetensors.torch import save_file

    dims = getattr(engine, "dsmoe_dims", None)
    if dims is None:
        return
    tensors = full_state(engine)
    if dims.dp_rank == 0:
        layout = {
            "tp": str(dims.tp),
            "ep": str(dims.ep),
            "tp_rank": str(dims.tp_rank),
            "ep_rank": str(dims.ep_rank),
        }
        save_file(tensors, staging / _shard_name(dims), metadata=layout)


def _load_shards(engine, directory: Path) -> None:
    """Put this position's parameters (and optimizer state, see _save_shards) back after DeepSpeed's load,
    which restored the first expert rank's copies everywhere."""
    from deepspeed.utils import safe_set_full_fp32_param
    from safetensors.torch import load_file

    dims = _dims(engine)
    if dims is None:
        return
    path = directory / _shard_name(dims)
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {path.name}: it was saved with another parallel layout")
    tensors = {k: v for k, v in load_file(path).items() if "/" not in k}
    params = dict(engine.module.named_parameters())
    if missing := params.keys() - tensors.keys():
        raise CheckpointError(f"{path} lacks {sorted(missing)[:5]}: it does not fit this model")
    with torch.no_grad():
        for name, p in params.items():
            value = tensors[name].to(p.device)
            if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
                safe_set_full_fp32_param(p, value)
            p.copy_(value.to(p.dtype))


def load_resharded(engine, directory: Path, counters: dict, activation: str) -> None:
    """Load a checkpoint saved under another layout (or ZeRO stage): join each tensor from the saved shards,
    cut this rank's piece, and set the fp32 master, the Adam moments and the engine's counters. Every
    parameter must be found and every saved tensor placed: anything else is an error naming the keys."""

    files = shard_files(directory)
    if not files:
        raise CheckpointError(
            f"{directory} has no parameter shards (shard_tp*_ep*.safetensors): it can only be "
            "resumed in the layout that saved it"
        )
    dims = engine.dsmoe_dims
    if shards_layout(files) == (dims.tp, dims.ep):  # cut for this layout (dsmoe reshard): read our file only
        from safetensors.torch import load_file

        local = load_file(directory / _shard_name(dims))
    else:
        local = local_pieces(_unshard_checkpoint(files, activation, moments=True), dims, activation)
    params = dict(engine.module.named_parameters())
    wanted = {k for n in params for k in (n, *(f"{m}/{n}" for m in moments_of(engine)))}
    if missing := sorted(wanted - local.keys()):
        raise CheckpointError(f"{directory} lacks {len(missing)} tensors this model needs: {missing[:8]}")
    if unexpected := sorted(local.keys() - wanted):
        raise CheckpointError(
            f"{directory} holds {len(unexpected)} tensors this model has no place for: {unexpected[:8]}"
        )
    set_state(engine, local, counters)


def set_state(engine, local: dict[str, torch.Tensor], counters: dict) -> None:
    """Set every parameter's fp32 master and Adam moments from this rank's pieces (`full_state`'s keys),
    and the engine's counters and schedule position (`engine_counters`)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _create_optimizer_state(engine, counters["adam_step"])
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            value = local[name].to(p.device)
            if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
                safe_set_full_fp32_param(p, value)
                for key in moments_of(engine):
                    safe_set_full_optimizer_state(p, local[f"{key}/{name}"].to(p.device), key)
            else:
                master = _master(engine, p)
                master.copy_(value.to(master.dtype))
                state = _inner_optimizer(engine).state[master]
                for key in moments_of(engine):
                    state[key] = local[f"{key}/{name}"].to(device=master.device, dtype=master.dtype)
            p.copy_(value.to(p.dtype))
    engine.global_steps = counters["global_steps"]
    engine.global_samples = counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]
    scheduler = engine.lr_scheduler
    if hasattr(scheduler, "sync"):  # an RST budget's scheduler: the LR is a function of the run's clock
        scheduler.sync()
    elif scheduler is not None and counters["lr_scheduler"] is not None:
        # Only the position: the parameter groups (and their base rates) are this layout's own.
        scheduler.last_epoch = counters["lr_scheduler"]["last_epoch"]
        scheduler._step_count = counters["lr_scheduler"]["_step_count"]
        for group, base, factor in zip(
            scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _link_optimizer_state(engine) -> None:
    """(Re)build DeepSpeed's links from parameters to their pieces of the Adam state. DeepSpeed links them
    once, right after the first parameter group's first step, when the later groups have no state yet."""
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1-2, bf16 optimizer
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def _create_optimizer_state(engine, adam_step: float) -> None:
    """torch's Adam state for every tensor it updates (zeros, with the saved step count), as its first step
    would create it, and DeepSpeed's links from parameters to their pieces of it."""
    inner = _inner_optimizer(engine)
    for group in inner.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            step = torch.tensor(adam_step, dtype=torch.float32, device=p.device if on_device else "cpu")
            inner.state[p] = {"step": step, **{key: torch.zeros_like(p) for key in moments_of(engine)}}
    _link_optimizer_state(engine)


def shard_files(checkpoint_dir: Path) -> list[Path]:
    return sorted(checkpoint_dir.glob("shard_tp*_ep*.safetensors"))


def shards_layout(files: list[Path]) -> tuple[int, int]:
    """The (tp, ep) layout the shards were cut for (every file names it; they must agree and be complete)."""
    from safetensors import safe_open

    layouts = set()
    for path in files:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if not {"tp", "ep"} <= meta.keys():
            raise CheckpointError(f"{path} does not say which layout it belongs to (no tp/ep metadata)")
        layouts.add((int(meta["tp"]), int(meta["ep"])))
    if len(layouts) != 1 or len(files) != next(iter(layouts))[0] * next(iter(layouts))[1]:
        raise CheckpointError(
            f"{files[0].parent} holds {len(files)} shards of layouts {sorted(layouts)}: not one complete layout"
        )
    return layouts.pop()


def reshard(
    run_dir: str | Path, out_dir: str | Path, tp: int, ep: int, tag: str | None = None, progress=print
) -> Path:
    """Write checkpoint `tag` (default: the newest intact) of `run_dir` into the new run directory `out_dir`,
    its parameters and Adam moments cut for tensor-parallel size `tp` and expert-parallel size `ep`, so a run
    resumed there in that layout has each rank read only its own shard (resuming in another layout joins
    every shard on every rank). Reads only safetensors and JSON; the metrics up to the step come along, so the
    resumed run continues the same curve. Returns the new checkpoint directory."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    tag = tag or resume_tag(run_dir)
    if tag is None:
        raise CheckpointError(f"{run_dir} has no checkpoint")
    source = checkpoint_root(run_dir) / tag
    if problems := verify(source):
        raise CheckpointError(f"{source} is not intact: {'; '.join(problems[:3])}")
    files = shard_files(source)
    if not files or not (source / STATE).is_file():
        raise CheckpointError(
            f"{source} has no layout-free shards and dsmoe_state.json (saved before 2026-12-02): resume it "
            "once in any layout and let it save, then reshard that checkpoint"
        )
    from_tp, from_ep = shards_layout(files)
    ours = read_client_state(source)
    activation = ours["config"]["model"]["moe"]["activation"]
    ours["config"]["parallel"].update(tp=tp, ep=ep, dp=0)
    # What the layout must divide (experts by ep, heads and widths by tp): a ConfigError naming the key.
    config_lib.from_dict(ours["config"], source=f"{source} resharded for tp {tp} x ep {ep}")
    out_root = checkpoint_root(out_dir)
    if out_root.exists() and any(out_root.iterdir()):
        raise CheckpointError(f"{out_root} already holds checkpoints: reshard into a new run directory")
    staging = out_root / (tag + PARTIAL)
    staging.mkdir(parents=True)
    progress(f"joining the {len(files)} shards of {source}")
    full = _unshard_checkpoint(files, activation, moments=True)
    for t in range(tp):
        for e in range(ep):
            position = SimpleNamespace(tp=tp, ep=ep, tp_rank=t, ep_rank=e)
            pieces = local_pieces(full, position, activation)
            layout = {"tp": str(tp), "ep": str(ep), "tp_rank": str(t), "ep_rank": str(e)}
            save_file(pieces, staging / _shard_name(position), metadata=layout)
            progress(f"wrote {_shard_name(position)}")
    for name in ("tokenizer.json", "rng_rank0.pt"):  # copied as bytes: nothing is unpickled here
        shutil.copyfile(source / name, staging / name)
    ours["layout_free"] = True
    ours["resharded_from"] = {"checkpoint": str(source.resolve()), "tp": from_tp, "ep": from_ep}
    (staging / STATE).write_text(json.dumps(ours, indent=1, default=str))
    write_manifest(staging)
    os.replace(staging, out_root / tag)
    _fsync_dir(out_root)
    _write_atomic(out_root / "latest", tag)
    step = int(ours["step"])
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.is_file():
        kept = [
            line for line in metrics.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step
        ]
        (Path(out_dir) / "metrics.jsonl").write_text("".join(kept))
    return out_root / tag


def _unshard_checkpoint(files: list[Path], activation: str, moments: bool = False) -> dict:
    """The plain model's state dict from the shards of every (tp, ep) position (with moments: also the
    Adam moments, as '<moment>/<name>')."""
    from safetensors import safe_open

    pieces: dict[str, dict] = {}
    tp = ep = 1
    for path in files:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            tp, ep = int(meta["tp"]), int(meta["ep"])
            where = (int(meta["tp_rank"]), int(meta["ep_rank"]))
            for name in f.keys():
                if "/" not in name or moments:
                    pieces.setdefault(name, {})[where] = f.get_tensor(name)
    if len(files) != tp * ep:
        raise CheckpointError(
            f"{files[0].parent} holds {len(files)} shards, its layout tp {tp} x ep {ep} needs {tp * ep}"
        )
    return join_pieces(pieces, tp, ep, activation)


def join_pieces(pieces: dict[str, dict], tp: int, ep: int, activation: str) -> dict[str, torch.Tensor]:
    """Whole tensors (parameters, and moments as '<moment>/<name>') from each one's pieces by (tp_rank,
    ep_rank), placed as parallel/layout.py says."""
    from parallel.layout import placement, unshard

    return {
        name: unshard(p, placement(name.split("/")[-1], activation), tp, ep) for name, p in pieces.items()
    }


def local_pieces(full: dict[str, torch.Tensor], dims, activation: str) -> dict[str, torch.Tensor]:
    """This rank's pieces of whole tensors (join_pieces' inverse)."""
    from parallel.layout import placement, shard

    return {
        name: shard(
            t, placement(name.split("/")[-1], activation), dims.tp_rank, dims.tp, dims.ep_rank, dims.ep
        )
        for name, t in full.items()
    }


def read_client_state(checkpoint_dir: Path, trust_pickle: bool = False) -> dict:
    """Our part of a checkpoint's client state (step, config, layout). With `trust_pickle` (resuming one's own
    run: DeepSpeed unpickles its files anyway) the objects exactly as saved, from DeepSpeed's model states;
    without, only the JSON copy, so reading a checkpoint from elsewhere runs none of its code."""
    layout_free = not any((checkpoint_dir / n).is_file() for n in MODEL_STATES)  # as dsmoe reshard writes
    if trust_pickle and not layout_free:
        states = _model_states(checkpoint_dir)
        return torch.load(states, map_location="cpu", weights_only=False, mmap=True).get("dsmoe", {})
    if not (checkpoint_dir / STATE).is_file():
        raise CheckpointError(f"{checkpoint_dir}: {TRUST_PICKLE}")
    try:
        return json.loads((checkpoint_dir / STATE).read_text())
    except ValueError as e:
        raise CheckpointError(f"{checkpoint_dir / STATE} is not valid JSON ({e})") from None


MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def _model_states(checkpoint_dir: Path) -> Path:
    for name in MODEL_STATES:
        if (checkpoint_dir / name).is_file():
            return checkpoint_dir / name
    raise CheckpointError(f"{checkpoint_dir} holds no DeepSpeed model states: not a complete checkpoint")


def consolidated_state_dict(
    checkpoint_dir: str | Path, tag: str | None = None, trust_pickle: bool = False
) -> tuple[dict, dict]:
    """One fp32 state dict from a checkpoint (verify it first) of any ZeRO stage and rank count, plus our state.

    A checkpoint with our JSON state and layout-free shards (every save since 2026-12-02) is read from those
    alone: safetensors and JSON, no pickle. Older ones need `trust_pickle`: ZeRO 1-3 keep the fp32 master
    weights in optimizer shards, which DeepSpeed's zero_to_fp32 merges; stage 0 keeps them whole, the module
    itself in fp32, or (bf16) the optimizer's fp32 groups, named from each group's saved parameter names.
    """
    root = Path(checkpoint_dir)
    tag = tag or _read_latest(root)
    if tag is None:
        raise CheckpointError(f"{root} has no 'latest' checkpoint")
    files = shard_files(root / tag)
    if files and (root / tag / STATE).is_file():
        ours = read_client_state(root / tag)
        activation = ours.get("config", {}).get("model", {}).get("moe", {}).get("activation", "gelu")
        return _unshard_checkpoint(files, activation), ours
    if not trust_pickle:
        raise CheckpointError(f"{root / tag}: {TRUST_PICKLE}")
    states = torch.load(_model_states(root / tag), map_location="cpu", weights_only=False)
    ours = states.get("dsmoe", {})
    config = ours.get("config", {})
    if files:  # tensor/expert-parallel layout: join the shards
        return _unshard_checkpoint(
            files, config.get("model", {}).get("moe", {}).get("activation", "gelu")
        ), ours
    if config.get("parallel", {}).get("zero_stage", 0) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag), ours
    if config.get("train", {}).get("precision") == "fp32":
        return {k: v.float() for k, v in states["module"].items()}, ours
    optimizer = states["optimizer"]
    groups = optimizer["optimizer_state_dict"]["param_groups"]
    state_dict = {
        name: tensor.float()
        for group, fp32_tensors in zip(groups, optimizer["fp32_groups"], strict=True)
        for name, tensor in zip(group["param_names"], fp32_tensors, strict=True)
    }
    return state_dict, ours
