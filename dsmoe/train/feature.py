"""What a feature of training (a research method, growth, the encoder's loss weighting) attaches to the Trainer.

The Trainer's core (dsmoe/train/loop.py) knows no feature by name: it calls every hook below, in this order,
at a fixed point of the run, on each feature it was given. A feature overrides the hooks it needs; the rest
are no-ops. Hooks receive the Trainer and may read or set its public attributes (cfg, dims, engine, model_cfg,
train_tokens, use_loader, finished, result); the docstrings say which they are meant to set.

Features of dsmoe: dsmoe.train.budgeted.BudgetedTraining (No Train No Gain: the reference-time budget,
layer stacking / dropping, batch selection, Sophia's Hessian pass), dsmoe.train.grow.Growth (MSG growth
events and ramps), dsmoe.train.mlm.MLMTokenWeights (the encoder's token-weighted MLM loss).
"""

from __future__ import annotations


class Feature:
    # --- before the loop -----------------------------------------------------------------------------------

    def setup(self, trainer) -> None:
        """After the data and the resume point are known (trainer.resumed: the checkpoint's state, or None),
        before the run directory is written: check settings, build state. May set trainer.use_loader =
        False when the feature reads its own batches (the `batches` hook)."""

    def before_model(self, trainer) -> None:
        """Right before the model is built from trainer.model_cfg (a copy: may change it, e.g. its depth),
        after the seed is set; may replace trainer.train_tokens (the tokens the sampler reads)."""

    def model_built(self, trainer, model) -> None:
        """The plain model, before parallelism and the engine (e.g. give it a resumed run's shapes)."""

    def started(self, trainer) -> None:
        """The engine exists and the checkpoint (if any) is loaded: trainer.start_step is the first step.
        May set trainer.finished (nothing left to do)."""

    # --- every step ----------------------------------------------------------------------------------------

    def before_step(self, trainer, step: int) -> None:
        """Before step `step`'s batches: may replace trainer.engine (a rebuilt model)."""

    def batches(self, trainer, step: int) -> list | None:
        """This step's micro-batches, or None to take the data loader's."""
        return None

    def active_blocks(self, trainer, step: int) -> list[int] | None:
        """The indices of the transformer blocks this step runs and updates, or None for all of them."""
        return None

    def micro_weights(self, trainer, batches: list):
        """A weight per micro-batch for its LM loss (1: as DeepSpeed averages them), or None: a list of
        floats, or a tensor on the device when computing them there spares the host a wait for the GPU."""
        return None

    def after_update(self, trainer, step: int, batches: list) -> None:
        """After the optimizer step (e.g. an extra pass that feeds the optimizer's state)."""

    def after_step(self, trainer, step: int, record: dict) -> None:
        """The step's record before validation, logging and saving: may add figures to it and set
        trainer.finished (a feature that decides when the run ends, e.g. a budget)."""

    def state(self) -> dict:
        """Entries for the checkpoint's state (JSON-serialisable), read back through trainer.resumed."""
        return {}

    # --- after the loop ------------------------------------------------------------------------------------

    def finish(self, trainer) -> None:
        """After the last step, before the end-of-run report (e.g. fill trainer.result)."""
