"""The training run: data -> model -> DeepSpeed engine -> steps -> checkpoints -> export and evaluation.

`dsmoe.run.run(cfg)` is what `launchers/train.py` calls on every rank: a Trainer with the features cfg turns
on (features_for) and the end-of-run report. `Trainer.step` is one optimizer step, the part to read first; features (NTNG's budget and
methods, MSG growth, the encoder's loss weighting) attach through the hooks of dsmoe/train/feature.py and live
in their own modules. Running again with the same run_dir resumes from the last complete checkpoint and
continues the same loss curve.
"""

from __future__ import annotations

import contextlib
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
from dsmoe.config import Config, ConfigError
from dsmoe.data import PackedSampler, open_token_data, pad_vocab, prepare
from dsmoe.data.loader import StepMicroBatches, step_batches
from dsmoe.data.mlm import MLMBatches
from dsmoe.data.tokenizer import load_tokenizer
from dsmoe.data.tokens import TokenData, open_pretokenized, tokenizer_file
from dsmoe.evaluation import PeriodicValidation, run_held_out, validation_samples
from dsmoe.model import build
from dsmoe.model.attention import resolve_backend
from dsmoe.train import checkpoint, methods
from dsmoe.train import engine as engine_lib
from dsmoe.train.checkpoint import CheckpointError
from dsmoe.train.feature import Feature
from dsmoe.train.grow import apply_parallel
from dsmoe.train.logging import RunLogger
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

    if not (export_dir / "config.json").is_file() or not (export_dir / "model.safetensors").is_file():
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
                decision[4] = {k: v for k, v in ours.items() if k != "config"}  # features read theirs
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


def features_for(cfg: Config) -> list[Feature]:
    """The features of training cfg turns on (each in its own module; the Trainer names none of them)."""
    features: list[Feature] = []
    if cfg.train.budget.rst_hours > 0:
        from dsmoe.train.budgeted import BudgetedTraining

        features.append(BudgetedTraining())
    if cfg.growth.events:
        from dsmoe.train.grow import Growth

        features.append(Growth())
    if cfg.model.is_encoder:
        from dsmoe.train.mlm import MLMTokenWeights

        features.append(MLMTokenWeights())
    return features


class Trainer:
    """One training run: data -> model -> DeepSpeed engine -> steps -> checkpoints -> export and evaluation.

    `run()` is the loop and `step()` one optimizer step: batches, forward/backward per micro-batch, update,
    log, validate, save. Features (dsmoe/train/feature.py) attach at fixed points through their hooks.
    """

    def __init__(self, cfg: Config, features: list[Feature] = ()):
        self.cfg, self.features = cfg, list(features)
        self.dims = dims = groups.init(cfg.parallel)
        engine_lib.gradient_accumulation_steps(cfg, dims)  # a batch the layout cannot split: say so first
        t = cfg.train
        self.run_dir = Path(t.run_dir)
        self.token_data = _resolved_data(cfg, dims)
        _resolve_vocab(cfg, self.token_data)
        self.resume_from, same_layout, steps_done, self.resumed = _resume_point(
            cfg, dims, self.run_dir, self.token_data.tokenizer_path
        )
        self.splits = None
        if cfg.data.corpus == "indexed":
            if (
                cfg.data.train_samples == 0
            ):  # a new run: as many as max_steps takes (a resumed one kept its own)
                cfg.data.train_samples = t.max_steps * t.global_batch_size
            self.splits = _indexed_splits(cfg, dims, self.token_data)
        self.datasets = None
        if self.splits is not None:
            from dsmoe.data.indexed import dataset_identity

            self.datasets = dataset_identity(cfg.data)
        self.use_loader, self.steps_done = True, steps_done
        self.max_steps: int | None = t.max_steps  # None: a feature ends the run (a budget)
        self.clock = None  # a feature's RST clock, which drives the LR schedule instead of the step count
        self._hook("setup")
        if dims.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(config_lib.to_dict(cfg), indent=2))
            (self.run_dir / "tokenizer.json").write_bytes(self.token_data.tokenizer_path.read_bytes())
        dist.barrier()

        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.model_cfg = copy.deepcopy(cfg.model)  # growth changes the model's own config, never the run's
        self.train_tokens = self.token_data.train
        self._hook("before_model")
        torch.manual_seed(t.seed)
        model = build(self.model_cfg)
        if t.init_from and not self.resume_from:
            _initialise_from(model, Path(t.init_from))
        self.active_growth = None  # set by the growth feature: parallelism applies its masks
        self._hook("model_built", model)
        self.dispatch = _expert_dispatch(cfg, model, dims)
        apply_parallel(model, dims, self.dispatch, self.active_growth)
        self.engine = engine_lib.initialize(model, cfg, dims, self.clock)
        self.gas = engine_lib.gradient_accumulation_steps(cfg, dims)
        self.start_step = 0
        if self.resume_from:
            loaded = checkpoint.load(self.engine, self.run_dir, self.resume_from, dims.rank, same_layout)
            self.start_step = int(loaded["step"])
        else:
            torch.manual_seed(t.seed + 1 + dims.rank)  # per-rank stream for anything stochastic in training

        if self.splits is not None:  # megatron-core's packed, shuffled, blended samples
            from dsmoe.data.indexed import IndexedSampler

            self.sampler = IndexedSampler(self.splits.train, cfg.data.seq_len)
        else:
            self.sampler = PackedSampler(self.train_tokens, cfg.data.seq_len, t.seed)
        if cfg.model.is_encoder:  # (input_ids, attention_mask, labels): mixed lengths, masked
            self.sampler = MLMBatches(self.sampler, self.token_data.vocab_size, cfg.mlm, t.seed)
        # The fixed held-out sample: every rank evaluates it under train.eval_every, rank 0 at the end of the run.
        self.held_out = (
            run_held_out(cfg, self.token_data.val, self.splits) if t.eval_every or dims.is_main else None
        )
        self.validation = (
            PeriodicValidation(cfg, self.held_out, self.token_data.vocab_size, dims) if t.eval_every else None
        )
        self.loader = self._loader() if self.use_loader else None
        self.logger = self._announce(model) if dims.is_main else None
        self.result = RunResult(self.run_dir, self.start_step, engine=self.engine)
        self.finished = self.start_step == t.max_steps
        self._hook("started")

    # --- the core ------------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        result = self.result
        self.bad_steps, self.last_saved = 0, self.start_step
        signals = StopSignals()  # installed right before the try that restores them, whatever is raised
        try:
            step = self.start_step
            while not self.finished and (self.max_steps is None or step < self.max_steps):
                stop_now = self.step(step, signals)
                step += 1
                if stop_now:
                    if self.dims.is_main and signals.received:
                        print(
                            f"stopped by {signals.received} after step {step}: run the same command to resume",
                            flush=True,
                        )
                    result.interrupted = True
                    break
        finally:
            signals.restore()
            if self.loader is not None:
                self.loader.close()  # its worker processes stop here, also when the run raised
        if self.dims.is_main and self.dims.device.type == "cuda":
            print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        dist.barrier()
        self._hook("finish")  # the budget's summary, the end-of-run export and report (dsmoe.run)
        if self.logger:
            self.logger.close()
        return result

    def step(self, step: int, signals: StopSignals) -> bool:
        """Optimizer step `step` (0-based): True when the run must stop after it (a signal, train.exit_at_step)."""
        t, dims = self.cfg.train, self.dims
        started = time.perf_counter()  # an engine rebuild (growth, stacking) counts in its step's time
        self._hook("before_step", step)
        engine = self.result.engine = self.engine
        lr = engine.get_lr()[0]
        waited = time.perf_counter()
        batches = self._first("batches", step) or next(self.loader)
        data_wait_s = time.perf_counter() - waited  # the step's time spent waiting for its batches
        weights = self._first("micro_weights", batches)
        weights = [1.0] * self.gas if weights is None else weights
        active = self._first("active_blocks", step)  # None: every block
        sums, real_tokens = None, 0
        for micro, batch in enumerate(batches):
            # decoder: (inputs, targets); encoder: (input_ids, attention_mask, labels)
            real_tokens += int(batch[1].sum()) if self.cfg.model.is_encoder else batch[0].numel()
            batch = self._on_device(batch)
            with (
                methods.run_blocks(engine.module, active) if active is not None else contextlib.nullcontext()
            ):
                out = engine(*batch)
            w = weights[micro]  # a float, or a 0-dim tensor on the device (never read back: no sync)
            engine.backward(
                out.loss if isinstance(w, float) and w == 1.0 else out.loss + (w - 1.0) * out.lm_loss
            )
            if micro < self.gas - 1:
                engine.step()  # accumulates; DeepSpeed updates only on the boundary
            else:
                if active is not None:  # blocks that did not run are not updated
                    methods.release_dropped_grads(engine.module, active)
                grad_norm, applied = engine_lib.boundary_step(engine)
            stats = _step_stats(out, w)
            sums = stats if sums is None else {k: sums[k] + stats[k] for k in sums}
        self._hook("after_update", step, batches)
        # Mean over micro-batches and ranks (tensor-parallel ranks hold copies of their batch slice's values,
        # every slice equally many): equal to the single-process mean. The stop request rides along as a last
        # element: its sum is > 0 if any rank was signalled; before it, the real (non-padding) tokens each
        # rank trained on, summed (tensor-parallel ranks share theirs).
        stop = signals.received is not None or step + 1 == t.exit_at_step
        packed = torch.cat(
            [v.flatten() for v in sums.values()]
            + [sums["loss"].new_tensor([real_tokens / dims.tp, float(stop)])]
        )
        dist.all_reduce(packed)
        means = packed[:-2] / (self.gas * dims.world_size)
        values = torch.cat([means, packed[-2:]]).tolist()  # the step's one read of its figures: a host sync
        stop_now = values[-1] > 0
        record = _unpack(values[:-2], sums, step + 1)
        step_s = time.perf_counter() - started  # the read above waited for the device
        record.update(
            lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            tokens_per_s=values[-2] / step_s,
            step_s=step_s,
            data_wait_s=data_wait_s,
            memory_gib=peak_memory_gib(dims.device),
        )
        self.finished = step + 1 == self.max_steps
        self._hook("after_step", step, record)  # a feature may end the run sooner or later (a budget)
        if self.validation is not None and ((step + 1) % t.eval_every == 0 or self.finished):
            record.update(self.validation.run(self.engine.module, step + 1, self.logger))
        finite = applied and math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
        record["skipped"] = not finite
        self.bad_steps = 0 if finite else self.bad_steps + 1
        self.result.losses.append(record["loss"])
        self.result.steps = step + 1
        if self.logger:
            self.logger.log(record)
            if not finite:
                print(f"step {step + 1}: non-finite loss or gradient norm, update skipped", flush=True)
        if self.bad_steps >= t.max_bad_steps:
            raise TrainingDiverged(
                f"{self.bad_steps} consecutive steps up to step {step + 1} had a non-finite loss or gradient norm "
                f"(train.max_bad_steps={t.max_bad_steps}); the last good checkpoint is "
                f"{checkpoint.resume_tag(self.run_dir) or 'none'} in {self.run_dir}; lower train.lr or check the data"
            )
        due = t.checkpoint_every and ((step + 1) % t.checkpoint_every == 0 or self.finished or stop_now)
        if due and self.bad_steps == 0:  # never publish a state reached through skipped steps
            self.save(step + 1)
            self.last_saved = step + 1
        return stop_now

    def _on_device(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        """A micro-batch for the model (pinned by the loader on a GPU, so the copies do not block). The
        encoder's attention mask and labels stay on the host, where EncoderMLM.forward finds the packing and
        the masked positions without a host sync."""
        host = (1, 2) if self.cfg.model.is_encoder else ()
        return [
            part if i in host else part.to(self.dims.device, non_blocking=True)
            for i, part in enumerate(batch)
        ]

    def save(self, step: int) -> None:
        t = self.cfg.train
        ours = {
            "step": step,
            "samples_consumed": step * t.global_batch_size,
            "world_size": self.dims.world_size,
            "config": config_lib.to_dict(self.cfg),
        }
        for feature in self.features:
            ours.update(feature.state())
        if (
            self.datasets is not None
        ):  # a resume checks that the datasets are the ones these samples came from
            ours["datasets"] = self.datasets
        checkpoint.save(
            self.engine,
            self.run_dir,
            step,
            {"dsmoe": ours},
            self.token_data.tokenizer_path,
            self.dims.rank,
            t.keep_checkpoints,
        )

    # --- helpers -------------------------------------------------------------------------------------------

    def _hook(self, name: str, *args) -> None:
        for feature in self.features:
            getattr(feature, name)(self, *args)

    def _first(self, name: str, *args):
        """The first feature's answer that is not None (None when none answers)."""
        for feature in self.features:
            answer = getattr(feature, name)(self, *args)
            if answer is not None:
                return answer
        return None

    def _loader(self):
        cfg, t, dims = self.cfg, self.cfg.train, self.dims
        workers = (
            cfg.data.num_workers if cfg.data.num_workers >= 0 else (2 if dims.device.type == "cuda" else 0)
        )
        micro_batches = StepMicroBatches(
            self.sampler,
            self.start_step,
            t.max_steps,
            self.gas,
            dims.batch_rank,
            dims.batch_ranks,
            t.micro_batch_size,
            t.global_batch_size,
        )
        return step_batches(
            micro_batches, workers, cfg.data.prefetch_factor, pin_memory=dims.device.type == "cuda"
        )

    def _announce(self, model) -> RunLogger:
        cfg, t, dims = self.cfg, self.cfg.train, self.dims
        backend = (
            model.attention_backend(dims.device)
            if cfg.model.is_encoder
            else resolve_backend(cfg.model.attention.backend)
        )
        n_params, n_expert = model.num_params(), model.num_expert_params()
        print(
            f"dsmoe: {n_params / 1e6:.2f}M params ({n_expert / 1e6:.2f}M in experts), world {dims.world_size} "
            f"(dp {dims.dp} x ep {dims.ep} x tp {dims.tp}"
            + (f", experts reached by gathering {self.dispatch}" if dims.ep > 1 else "")
            + f"), device {dims.device.type}, attention {backend}, "
            f"precision {t.precision}, ZeRO {cfg.parallel.zero_stage}, "
            + (f"resuming from {self.resume_from}" if self.resume_from else "starting"),
            flush=True,
        )
        return RunLogger(
            self.run_dir, cfg, self.start_step, model.flops_per_token(cfg.data.seq_len), dims.world_size
        )


def _resolve_vocab(cfg: Config, token_data: TokenData) -> None:
    """model.vocab_size from the tokenizer (padded) or checked against it; the end-of-document token."""
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


def _unpack(values: list[float], like: dict[str, torch.Tensor], step: int) -> dict:
    """The record of `like`'s figures, read back from their flat concatenation `values`."""
    record, offset = {"step": step}, 0
    for name, value in like.items():
        chunk = values[offset : offset + value.numel()]
        offset += value.numel()
        record[name] = chunk[0] if value.dim() == 0 else torch.tensor(chunk).view(value.shape).tolist()
    return record
