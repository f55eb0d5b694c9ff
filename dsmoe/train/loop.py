"""The training run: data -> model -> DeepSpeed engine -> steps -> checkpoints -> export and evaluation.

`run(cfg)` is what `launchers/train.py` calls on every rank. Running it again with the same run_dir
resumes from the last complete checkpoint and continues the same loss curve.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from dsmoe import config as config_lib
from dsmoe import growth
from dsmoe.config import Config, ConfigError
from dsmoe.data import PackedSampler, open_token_data, pad_vocab, prepare
from dsmoe.data.loader import StepMicroBatches, step_batches
from dsmoe.data.mlm import IGNORE_INDEX, MLMBatches
from dsmoe.data.tokenizer import load_tokenizer
from dsmoe.data.tokens import TokenData, open_pretokenized, tokenizer_file
from dsmoe.evaluation import PeriodicValidation, run_held_out, validation_samples
from dsmoe.model import build
from dsmoe.model.attention import resolve_backend
from dsmoe.train import checkpoint, methods
from dsmoe.train.checkpoint import CheckpointError
from dsmoe.train.grow import apply_parallel, grow_engine, stack_engine
from dsmoe.train.logging import RunLogger
from parallel import engine as engine_lib
from parallel import groups

# Sections a resumed run must share with the checkpoint it resumes; train.* may change (e.g. max_steps).
RESUME_MUST_MATCH = ("model", "data")  # the layout may change: checkpoints are resharded (checkpoint.py)
# Settings outside those sections that decide which samples each step reads.
RESUME_MUST_MATCH_KEYS = ("train.seed", "train.global_batch_size")
# Settings resolved when a run first starts ("" / 0: work it out); a resumed run keeps the saved value.
RESOLVED_AT_START = {"data.eos_token": "", "data.train_samples": 0}
# Data settings that say how to read, not what: a resumed run may change them.
RESUME_MAY_CHANGE = ("data.num_workers", "data.prefetch_factor", "data.cache_dir")


def _layout(config: dict, world_size: int) -> dict:
    """What DeepSpeed's own files depend on; a resume that changes any of it goes through our shards."""
    p = config["parallel"]
    return {
        "world_size": world_size,
        "ep": p["ep"],
        "tp": p["tp"],
        "zero_stage": p["zero_stage"],
        "precision": config["train"]["precision"],
    }


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    """Loss of each step this invocation ran."""
    summary: dict | None = None
    interrupted: bool = False
    """Stopped early by a signal or train.exit_at_step (a checkpoint was saved)."""
    engine: object = None
    """The DeepSpeed engine, for callers that continue in-process (tests, notebooks)."""
    budget: dict | None = None
    """Under train.budget: rst_s and wall_s spent (this and earlier invocations), budget_s, charges."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_resume_config(saved: dict, current: Config, run_dir: Path) -> None:
    """A resumed run must train the same model on the same data with the same layout."""
    now = config_lib.to_dict(current)
    saved = config_lib.with_defaults(saved, source=f"{run_dir} (saved config)")  # options added since
    diffs = []
    for section in RESUME_MUST_MATCH + (("mlm",) if current.model.is_encoder else ()):
        a, b = _flatten(saved.get(section, {}), section + "."), _flatten(now[section], section + ".")
        diffs += [
            f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}"
            for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)
            and k not in RESUME_MAY_CHANGE
            and not (k in RESOLVED_AT_START and RESOLVED_AT_START[k] in (a.get(k), b.get(k)))
        ]
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    diffs += [
        f"{k}: checkpoint {flat_saved.get(k)!r}, now {flat_now.get(k)!r} (it decides which samples each step reads)"
        for k in RESUME_MUST_MATCH_KEYS
        if flat_saved.get(k) != flat_now.get(k)
    ]
    if diffs:
        raise ConfigError(
            f"{run_dir} holds a run with a different configuration ({'; '.join(diffs)}); "
            "use another train.run_dir or the checkpoint's settings"
        )


def _resolved_data(cfg: Config, dims: groups.ParallelDims) -> TokenData:
    """Rank 0 prepares the token cache (tokenizer training, tokenization) or checks the given tokenizer and
    token files, everyone then opens them; an error reaches every rank. An indexed blend's datasets are
    opened later (_indexed_splits), once the vocabulary and the resume point are known."""
    outcome: list = [None, None]
    if dims.is_main:
        try:
            if cfg.data.corpus == "indexed":
                tok = load_tokenizer(cfg.data.tokenizer, cfg.data.eos_token)
                outcome[0] = str(tokenizer_file(tok, cfg.data.cache_dir))
            elif cfg.data.corpus == "shakespeare":
                outcome[0] = str(prepare(cfg.data))
            else:
                open_pretokenized(cfg.data)
        except Exception as e:  # every rank raises it, rather than the others waiting on rank 0
            outcome[1] = e
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    if cfg.data.corpus == "indexed":  # the end-of-document token as data.tokenizer declares it
        tok, path = load_tokenizer(cfg.data.tokenizer, cfg.data.eos_token), Path(outcome[0])
        return TokenData(path.parent, path, None, None, tok.vocab_size, tok.eos_id, tok.eos_token)
    if cfg.data.corpus == "tokens":
        return open_pretokenized(cfg.data)
    return open_token_data(Path(outcome[0]))


def _indexed_splits(cfg: Config, dims: groups.ParallelDims, token_data: TokenData):
    """megatron-core's training and validation datasets of data.blend, after rank 0 checked every prefix."""
    from dsmoe.data.indexed import build_splits, check_sources

    tok = load_tokenizer(cfg.data.tokenizer, token_data.eos_token)
    outcome: list = [[], None]
    if dims.is_main:
        try:
            outcome[0] = check_sources(cfg.data, tok, cfg.model.vocab_size)
        except Exception as e:  # every rank raises it, rather than the others waiting on rank 0
            outcome[1] = e
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    if dims.is_main:
        for warning in outcome[0]:
            print(f"warning: {warning}", flush=True)
        needed = cfg.train.max_steps * cfg.train.global_batch_size
        if needed > cfg.data.train_samples:
            print(
                f"warning: train.max_steps needs {needed} sequences but data.train_samples is "
                f"{cfg.data.train_samples} (fixed when the run started): the sample order repeats from its start",
                flush=True,
            )
    return build_splits(
        cfg.data, tok, cfg.data.seq_len, cfg.train.seed, cfg.data.train_samples, validation_samples(cfg)
    )


def _initialise_from(model, export_dir: Path) -> None:
    """Start from an exported model's weights (continued pretraining); the shapes must match."""
    from safetensors.torch import load_model

    from dsmoe.export import is_export

    if not is_export(export_dir):
        raise ConfigError(f"train.init_from: {export_dir} is not an exported dsmoe model directory")
    try:
        load_model(model, str(export_dir / "model.safetensors"))
    except RuntimeError as e:
        raise ConfigError(f"train.init_from: {export_dir} does not fit this model: {str(e)[:500]}") from None


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


class StopSignals:
    """SIGTERM / SIGINT ask for a checkpoint at the next step boundary and a clean exit; a second one exits
    at once (safe: a checkpoint is only ever published complete)."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signal.Signals(signum).name
        print(f"\n{self.received} received: saving a checkpoint after this step, then exiting", flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _resume_point(
    cfg: Config, dims: groups.ParallelDims, run_dir: Path, tokenizer_path: Path
) -> tuple[str | None, bool, int, dict | None]:
    """The verified checkpoint to resume from, whether it was saved in this layout, and its step (rank 0
    decides, everyone follows), after checking it fits. Settings resolved when the run first started
    (RESOLVED_AT_START) are taken from the checkpoint."""
    decision: list = [None, None, True, 0, None, {}]
    if dims.is_main:
        try:
            tag = checkpoint.resume_tag(run_dir)
            if tag is not None:
                # resuming one's own run, whose DeepSpeed files are pickles DeepSpeed loads anyway
                ours = checkpoint.read_client_state(
                    checkpoint.checkpoint_root(run_dir) / tag, trust_pickle=True
                )
                check_resume_config(ours["config"], cfg, run_dir)
                if "datasets" in ours:  # an indexed blend: the same datasets, or other samples would follow
                    from dsmoe.data.indexed import dataset_identity

                    now_datasets = dataset_identity(cfg.data)
                    if now_datasets != ours["datasets"]:
                        raise CheckpointError(
                            f"the datasets of data.blend changed since {tag} was saved (prefix, documents, "
                            f"tokens: then {ours['datasets']}, now {now_datasets}): the resumed run would read "
                            "other samples; restore them or start a new train.run_dir"
                        )
                saved = _flatten(ours["config"])
                decision[5] = {
                    k: saved[k]
                    for k in RESOLVED_AT_START
                    if saved.get(k, RESOLVED_AT_START[k]) != RESOLVED_AT_START[k]
                }
                decision[3] = int(ours["step"])
                decision[4] = ours.get("budget")
                saved = _layout(ours["config"], ours.get("world_size", dims.world_size))
                now = _layout(config_lib.to_dict(cfg), dims.world_size)
                if ours.get("layout_free"):  # written by dsmoe reshard: shards only, no DeepSpeed files
                    shards = (
                        "its own shard per rank"
                        if (now["tp"], now["ep"]) == (saved["tp"], saved["ep"])
                        else (f"joining its tp {saved['tp']} x ep {saved['ep']} shards")
                    )
                    print(f"resuming {tag} from its layout-free shards (dsmoe reshard): {shards}", flush=True)
                    decision[2] = False
                elif saved != now:
                    changes = ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in saved if saved[k] != now[k])
                    print(
                        f"resuming {tag} in another layout ({changes}): resharding its checkpoint", flush=True
                    )
                    decision[2] = False
                saved_tokenizer = checkpoint.checkpoint_root(run_dir) / tag / "tokenizer.json"
                if saved_tokenizer.read_bytes() != tokenizer_path.read_bytes():
                    raise CheckpointError(
                        f"the tokenizer built from this run's data settings differs from {saved_tokenizer} "
                        "(the corpus or the tokenizers library changed): resume where the checkpoint was made, "
                        "or start a new train.run_dir"
                    )
            checkpoint.remove_partial_saves(run_dir)
            decision[0] = tag
        except Exception as e:  # every rank raises it, rather than the others waiting on rank 0
            decision[1] = e
    dist.broadcast_object_list(decision, src=0)
    if decision[1] is not None:
        raise decision[1]
    for key, value in decision[5].items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return decision[0], decision[2], decision[3], decision[4]


def run(cfg: Config) -> RunResult:
    dims = groups.init(cfg.parallel)
    engine_lib.gradient_accumulation_steps(
        cfg, dims
    )  # a batch the layout cannot split: say so before any work
    t = cfg.train
    if t.budget.rst_hours > 0:
        from dsmoe.train.budgeted import scoring_micro_batches

        scoring_micro_batches(cfg, dims)  # nor a batch-selection scoring batch
    run_dir = Path(t.run_dir)
    token_data = _resolved_data(cfg, dims)
    # The encoder adds its mask and padding tokens after the tokenizer's (dsmoe.data.mlm).
    needed = token_data.vocab_size + (2 if cfg.model.is_encoder else 0)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = pad_vocab(needed)
    elif cfg.model.vocab_size < needed:
        raise ConfigError(
            f"model.vocab_size {cfg.model.vocab_size} < tokenizer vocabulary {token_data.vocab_size}"
            + (" + the mask and padding tokens" if cfg.model.is_encoder else "")
        )
    cfg.data.eos_token = token_data.eos_token  # saved with the run: exports name it

    resume_from, same_layout, steps_done, budget_state = _resume_point(
        cfg, dims, run_dir, token_data.tokenizer_path
    )
    splits = None
    if cfg.data.corpus == "indexed":
        if cfg.data.train_samples == 0:  # a new run: as many as max_steps takes (a resumed one kept its own)
            cfg.data.train_samples = t.max_steps * t.global_batch_size
        splits = _indexed_splits(cfg, dims, token_data)
    datasets = None
    if splits is not None:
        from dsmoe.data.indexed import dataset_identity

        datasets = dataset_identity(cfg.data)
    budgeted = None
    if t.budget.rst_hours > 0:  # NTNG: the reference-time budget, its schedule and the method
        from dsmoe.train.budgeted import BudgetedRun

        budgeted = BudgetedRun(cfg, dims, budget_state if resume_from else None)
    if dims.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_lib.to_dict(cfg), indent=2))
        (run_dir / "tokenizer.json").write_bytes(token_data.tokenizer_path.read_bytes())
    dist.barrier()

    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model_cfg = copy.deepcopy(cfg.model)  # growth changes the model's own config, never the run's
    if budgeted is not None:
        model_cfg.n_layers = budgeted.depth  # layer stacking starts shallow
        if cfg.train.method.name == "rho_loss":  # the irreducible-loss model first (its cost is charged)
            budgeted.train_irreducible(token_data.train, charge=not resume_from)
    torch.manual_seed(t.seed)
    model = build(model_cfg)
    if t.init_from and not resume_from:
        _initialise_from(model, Path(t.init_from))
    active_growth = None
    if resume_from and cfg.growth.events:  # the shapes (and masks) the checkpoint was saved with
        active_growth = growth.replay(model, cfg.growth, steps_done, t.seed)
    dispatch = _expert_dispatch(cfg, model, dims)
    apply_parallel(model, dims, dispatch, active_growth)
    engine = engine_lib.initialize(model, cfg, dims, budgeted.clock if budgeted else None)
    gas = engine_lib.gradient_accumulation_steps(cfg, dims)
    start_step = 0
    if resume_from:
        start_step = int(checkpoint.load(engine, run_dir, resume_from, dims.rank, same_layout)["step"])
    else:
        torch.manual_seed(t.seed + 1 + dims.rank)  # per-rank stream for anything stochastic in training

    if splits is not None:  # megatron-core's packed, shuffled, blended samples
        from dsmoe.data.indexed import IndexedSampler

        sampler = IndexedSampler(splits.train, cfg.data.seq_len)
    else:
        train_tokens = budgeted.train_tokens(token_data.train) if budgeted else token_data.train
        sampler = PackedSampler(train_tokens, cfg.data.seq_len, t.seed)
    if cfg.model.is_encoder:  # (input_ids, attention_mask, labels): mixed lengths, masked
        sampler = MLMBatches(sampler, token_data.vocab_size, cfg.mlm, t.seed)
    # The fixed held-out sample: every rank evaluates it under train.eval_every, rank 0 at the end of the run.
    held_out = run_held_out(cfg, token_data.val, splits) if t.eval_every or dims.is_main else None
    validation = PeriodicValidation(cfg, held_out, token_data.vocab_size, dims) if t.eval_every else None
    loader = None
    if budgeted is None:  # batch selection reads its own larger batches
        workers = (
            cfg.data.num_workers if cfg.data.num_workers >= 0 else (2 if dims.device.type == "cuda" else 0)
        )
        loader = step_batches(
            StepMicroBatches(
                sampler,
                start_step,
                t.max_steps,
                gas,
                dims.batch_rank,
                dims.batch_ranks,
                t.micro_batch_size,
                t.global_batch_size,
            ),
            workers,
            cfg.data.prefetch_factor,
            pin_memory=dims.device.type == "cuda",
        )
    backend = (
        model.attention_backend(dims.device)
        if cfg.model.is_encoder
        else resolve_backend(cfg.model.attention.backend)
    )
    logger = None
    if dims.is_main:
        n_params, n_expert = model.num_params(), model.num_expert_params()
        print(
            f"dsmoe: {n_params / 1e6:.2f}M params ({n_expert / 1e6:.2f}M in experts), world {dims.world_size} "
            f"(dp {dims.dp} x ep {dims.ep} x tp {dims.tp}"
            + (f", experts reached by gathering {dispatch}" if dims.ep > 1 else "")
            + f"), device {dims.device.type}, attention {backend}, "
            f"precision {t.precision}, ZeRO {cfg.parallel.zero_stage}, "
            + (f"resuming from {resume_from}" if resume_from else "starting"),
            flush=True,
        )
        logger = RunLogger(run_dir, cfg, start_step, model.flops_per_token(cfg.data.seq_len), dims.world_size)

    def save(step: int) -> None:
        ours = {
            "step": step,
            "samples_consumed": step * t.global_batch_size,
            "world_size": dims.world_size,
            "config": config_lib.to_dict(cfg),
        }
        if budgeted is not None:
            ours["budget"] = budgeted.state()
        if datasets is not None:  # a resume checks that the datasets are the ones these samples came from
            ours["datasets"] = datasets
        checkpoint.save(
            engine, run_dir, step, {"dsmoe": ours}, token_data.tokenizer_path, dims.rank, t.keep_checkpoints
        )

    result = RunResult(run_dir, start_step, engine=engine)
    bad_steps, last_saved = 0, start_step
    finished = start_step == t.max_steps  # under a budget: when the next step does not fit
    plan = None
    if budgeted is not None:
        plan = budgeted.plan(start_step)
        if start_step == 0:
            budgeted.clock.require_one_step(plan.passes)
        finished = not budgeted.fits(plan)
    signals = StopSignals()  # installed right before the try that restores them, whatever is raised
    try:
        for step in range(start_step, t.max_steps if budgeted is None else 2**62):
            if finished:
                break
            started = time.perf_counter()  # a growth event's engine rebuild counts in its step's time
            if plan is not None:
                # layer stacking: double the depth (copies of the blocks) as often as the plan says
                while plan.depth > budgeted.depth:
                    engine = stack_engine(engine, cfg, dims, dispatch, budgeted.clock)
                    result.engine, budgeted.depth = engine, len(engine.module.blocks)
                    if dims.is_main:
                        print(f"step {step}: stacked to {budgeted.depth} layers", flush=True)
                budgeted.charge(plan, engine, step)
            if active_growth is not None:  # c for this step; at 1 the masks go (before any next event)
                e = active_growth.event
                active_growth.set_c(growth.ramp(step, e.step, e.ramp_steps))
                if active_growth.c == 1.0:
                    active_growth.finish()
                    active_growth = None
            for index, event in enumerate(cfg.growth.events):
                if event.step == step:  # the new parts start at c = 0
                    engine, active_growth = grow_engine(engine, cfg, dims, index, dispatch)
                    result.engine = engine
                    if dims.is_main:
                        print(
                            f"step {step}: grew {event.dim} to {event.size} "
                            f"({engine.module.num_params() / 1e6:.2f}M params), ramp over {event.ramp_steps} steps",
                            flush=True,
                        )
            lr = engine.get_lr()[0]
            sums, real_tokens = None, 0
            waited = time.perf_counter()
            if budgeted is not None:  # batch selection scores a larger batch first
                batches = budgeted.batches(step, sampler, engine, gas)
            else:
                batches = next(loader)
            data_wait_s = time.perf_counter() - waited  # the step's time spent waiting for its batches
            weights = _mlm_token_weights(batches, dims) if cfg.model.is_encoder else [1.0] * gas
            for micro, batch in enumerate(batches):
                # decoder: (inputs, targets); encoder: (input_ids, attention_mask, labels)
                real_tokens += int(batch[1].sum()) if cfg.model.is_encoder else batch[0].numel()
                batch = [part.to(dims.device, non_blocking=True) for part in batch]  # pinned on a GPU
                if plan is not None and len(plan.active) < plan.depth:  # layer dropping
                    with methods.run_blocks(engine.module, plan.active):
                        out = engine(*batch)
                else:
                    out = engine(*batch)
                w = weights[micro]
                engine.backward(out.loss if w == 1.0 else out.loss + (w - 1.0) * out.lm_loss)
                if micro < gas - 1:
                    engine.step()  # accumulates; DeepSpeed updates only on the boundary
                else:
                    if plan is not None and len(plan.active) < plan.depth:  # dropped blocks are not updated
                        methods.release_dropped_grads(engine.module, plan.active)
                    grad_norm, applied = engine_lib.boundary_step(engine)
                stats = _step_stats(out, w)
                sums = stats if sums is None else {k: sums[k] + stats[k] for k in sums}
            if plan is not None and plan.hessian:  # Sophia-G's curvature estimate, after the update
                budgeted.hessian_pass(engine, batches)
            # Mean over micro-batches and ranks (tensor-parallel ranks hold copies of their batch slice's
            # values, every slice equally many): equal to the single-process mean. The stop
            # request rides along as a last element: its sum is > 0 if any rank was signalled; before it, the
            # real (non-padding) tokens each rank trained on, summed (tensor-parallel ranks share theirs).
            stop = signals.received is not None or step + 1 == t.exit_at_step
            packed = torch.cat(
                [v.flatten() for v in sums.values()]
                + [sums["loss"].new_tensor([real_tokens / dims.tp, float(stop)])]
            )
            dist.all_reduce(packed)
            stop_now = bool(packed[-1] > 0)
            record = _unpack(packed[:-2] / (gas * dims.world_size), sums, step + 1)
            step_s = time.perf_counter() - started  # the all_reduce's .item()s above synchronised the device
            record.update(
                lr=lr,
                grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                tokens_per_s=float(packed[-2]) / step_s,
                step_s=step_s,
                data_wait_s=data_wait_s,
                memory_gib=peak_memory_gib(dims.device),
            )
            if budgeted is not None:
                record.update(
                    rst_s=budgeted.clock.spent_s, wall_s=budgeted.wall_s(), active_layers=len(plan.active)
                )
                plan = budgeted.plan(step + 1)
                finished = not budgeted.fits(plan)
            else:
                finished = step + 1 == t.max_steps
            if validation is not None and ((step + 1) % t.eval_every == 0 or finished):
                record.update(validation.run(engine.module, step + 1, logger))
            finite = applied and math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
            record["skipped"] = not finite
            bad_steps = 0 if finite else bad_steps + 1
            result.losses.append(record["loss"])
            result.steps = step + 1
            if logger:
                logger.log(record)
                if not finite:
                    print(f"step {step + 1}: non-finite loss or gradient norm, update skipped", flush=True)
            if bad_steps >= t.max_bad_steps:
                raise TrainingDiverged(
                    f"{bad_steps} consecutive steps up to step {step + 1} had a non-finite loss or gradient norm "
                    f"(train.max_bad_steps={t.max_bad_steps}); the last good checkpoint is "
                    f"{checkpoint.resume_tag(run_dir) or 'none'} in {run_dir}; lower train.lr or check the data"
                )
            due = t.checkpoint_every and ((step + 1) % t.checkpoint_every == 0 or finished or stop_now)
            if due and bad_steps == 0:  # never publish a state reached through skipped steps
                save(step + 1)
                last_saved = step + 1
            if stop_now:
                if dims.is_main and signals.received:
                    print(
                        f"stopped by {signals.received} after step {step + 1}: run the same command to resume",
                        flush=True,
                    )
                result.interrupted = True
                break
    finally:
        signals.restore()
        if loader is not None:
            loader.close()  # its worker processes stop here, also when the run raised

    if dims.is_main and dims.device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    dist.barrier()
    if budgeted is not None:
        c = budgeted.clock
        result.budget = dict(
            rst_s=c.spent_s,
            budget_s=c.budget_s,
            wall_s=budgeted.wall_s(),
            finished=finished,
            charges={p.describe(): n for p, n in c.charges.items()},
            clock=c.state_dict(),
        )
        if dims.is_main:
            print(
                f"RST budget: {c.spent_s:.2f} s of {c.budget_s:.2f} s spent in {result.steps} steps"
                + (" (finished)" if finished else "")
                + f"; wall {result.budget['wall_s']:.1f} s",
                flush=True,
            )
    if dims.is_main and t.export_at_end and finished and last_saved == result.steps:
        from dsmoe.train.report import encoder_report, final_report

        report = encoder_report if cfg.model.is_encoder else final_report
        result.summary = report(run_dir, cfg, logger, held_out)
    if logger:
        logger.close()
    return result


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: allocated on the GPU, resident on the host (CPU runs)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _expert_dispatch(cfg: Config, model, dims: groups.ParallelDims) -> str:
    from parallel.expert import choose_dispatch

    layers = model.moe_layers
    if not layers:
        return "tokens"
    params = layers[0].w_in.numel() + layers[0].w_out.numel()
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    return choose_dispatch(cfg.parallel.expert_dispatch, tokens, cfg.model.d_model, params, dims)


def _mlm_token_weights(batches: list, dims: groups.ParallelDims) -> list[float]:
    """Encoder: rows of mixed lengths give every micro-batch and rank its own number of predicted tokens, while
    DeepSpeed averages micro-batches and ranks equally. Micro-batch m's MLM loss is weighted by
    n_m x micro-batches x ranks / N (N: the step's predicted tokens over all ranks), so the step trains on, and
    logs, the token-weighted mean over the whole batch, as one process taking it at once does."""
    counts = torch.tensor([float((b[2] != IGNORE_INDEX).sum()) for b in batches], device=dims.device)
    total = counts.sum()
    dist.all_reduce(total)  # the encoder runs data parallel only: the world is the data-parallel group
    return (counts * (len(batches) * dims.world_size) / total.clamp_min(1.0)).tolist()


def _step_stats(out, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """A micro-batch's figures; `weight` scales its MLM loss and accuracy (_mlm_token_weights)."""
    lm = out.lm_loss.detach().float()
    stats = {"loss": out.loss.detach().float() + (weight - 1.0) * lm, "lm_loss": weight * lm}
    if getattr(out, "masked_tokens", 0):  # encoder: accuracy at the masked positions
        stats["mlm_accuracy"] = weight * out.correct.float() / out.masked_tokens
    for prefix, routing in (("", out.mlp), ("attention_", out.attention)):
        if routing is not None:
            stats[f"{prefix}mi_loss"] = routing.mi_loss.detach().float()
            stats[f"{prefix}router_entropy"] = routing.router_entropy.float()
            stats[f"{prefix}expert_load"] = routing.expert_load.float()
    return stats


def _unpack(packed: torch.Tensor, like: dict[str, torch.Tensor], step: int) -> dict:
    record, offset = {"step": step}, 0
    for name, value in like.items():
        chunk = packed[offset : offset + value.numel()].view(value.shape)
        offset += value.numel()
        record[name] = chunk.item() if value.dim() == 0 else chunk.tolist()
    return record
