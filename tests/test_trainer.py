"""A feature written here, outside dsmoe, attaches to the Trainer through its hooks (dsmoe/train/feature.py)
without any change to the training loop, and the run does what the feature says."""

from __future__ import annotations

import pytest
import torch

from dsmoe.train.feature import Feature
from dsmoe.train.logging import read_metrics
from dsmoe.train.loop import Trainer, features_for

pytestmark = pytest.mark.usefixtures("single_process_group")


class FreezeFirstBlock(Feature):
    """Keep block 0's weights as they were for the first `steps` optimizer steps (a warm-up freeze)."""

    def __init__(self, steps: int):
        self.steps, self.kept, self.seen = steps, None, {}

    def before_step(self, trainer, step: int) -> None:
        if step < self.steps and self.kept is None:
            self.kept = {n: p.detach().clone() for n, p in trainer.engine.module.blocks[0].named_parameters()}

    def after_update(self, trainer, step: int, batches: list) -> None:
        if step < self.steps:  # put the update of block 0 back
            with torch.no_grad():
                for name, p in trainer.engine.module.blocks[0].named_parameters():
                    p.copy_(self.kept[name])

    def after_step(self, trainer, step: int, record: dict) -> None:
        model = trainer.engine.module
        self.seen[step + 1] = {n: p.detach().clone() for n, p in model.named_parameters()}
        record["frozen_block"] = int(step < self.steps)  # a figure of its own in metrics.jsonl


def test_a_feature_from_outside_freezes_a_block_for_its_steps(small_cfg, tmp_path):
    common = ("train.max_steps=4", "train.checkpoint_every=0", "train.export_at_end=false")
    plain_cfg = small_cfg(*common, run_dir=tmp_path / "plain")
    Trainer(plain_cfg, features_for(plain_cfg)).run()
    cfg = small_cfg(*common, run_dir=tmp_path / "frozen")
    freeze = FreezeFirstBlock(steps=2)
    result = Trainer(cfg, features_for(cfg) + [freeze]).run()

    assert result.steps == 4
    initial = freeze.kept
    after = {
        step: {k[len("blocks.0.") :]: v for k, v in p.items() if k.startswith("blocks.0.")}
        for step, p in freeze.seen.items()
    }
    for step in (1, 2):  # the frozen steps leave block 0 exactly as it started
        assert all(torch.equal(after[step][n], initial[n]) for n in initial), step
    assert not any(
        torch.equal(after[4][n], initial[n]) for n in initial if n.endswith("weight")
    )  # then it trains
    assert not torch.equal(
        freeze.seen[2]["blocks.1.mlp.w_in"], freeze.seen[1]["blocks.1.mlp.w_in"]
    )  # the rest trains

    plain, frozen = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "frozen")
    assert [m["frozen_block"] for m in frozen] == [1, 1, 0, 0]
    assert frozen[0]["loss"] == plain[0]["loss"]  # the first step's loss comes before any update
    assert frozen[1]["loss"] != plain[1]["loss"]  # the second saw block 0 unchanged


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_no_device_synchronisation_per_micro_batch(small_cfg, tmp_path, monkeypatch, zero_stage):
    """A full device sync drains the GPU's queue, which then idles while the host launches the next
    micro-batch. DeepSpeed's throughput timer synchronises around every micro-batch unless told not to
    (dsmoe.train.engine.deepspeed_config); no sync may come per micro-batch from anywhere."""
    from deepspeed.accelerator import get_accelerator

    accelerator = type(get_accelerator())
    syncs = []
    synchronize = accelerator.synchronize
    monkeypatch.setattr(accelerator, "synchronize", lambda self, *a: syncs.append(1) or synchronize(self, *a))
    cfg = small_cfg(
        "train.max_steps=4",
        "train.global_batch_size=16",  # 4 micro-batches a step
        "train.checkpoint_every=0",
        "train.export_at_end=false",
        f"parallel.zero_stage={zero_stage}",
        run_dir=tmp_path / "run",
    )
    Trainer(cfg, features_for(cfg)).run()
    assert len(syncs) < 4, f"{len(syncs)} device syncs in 4 steps of 4 micro-batches"


def test_fp32_gradient_accumulation_reaches_deepspeeds_zero2_optimizer(small_cfg, tmp_path):
    """parallel.zero_fp32_grad_accumulation: DeepSpeed's ZeRO-2 optimizer sums a bf16 run's micro-batch gradients
    in one fp32 buffer (its default adds them in bf16)."""
    dtypes = {}
    for asked in (False, True):
        cfg = small_cfg(
            "train.max_steps=3",
            "train.checkpoint_every=0",
            "train.export_at_end=false",
            "parallel.zero_stage=2",
            "train.precision=bf16",
            f"parallel.zero_fp32_grad_accumulation={str(asked).lower()}",
            run_dir=tmp_path / str(asked),
        )
        trainer = Trainer(cfg, features_for(cfg))
        trainer.run()
        dtypes[asked] = trainer.engine.optimizer.gradient_accumulation_dtype
    assert dtypes == {False: torch.bfloat16, True: torch.float32}


def test_autotuned_compile_trains_as_the_default_compile(small_cfg, tmp_path, monkeypatch):
    """train.compile_mode reaches torch.compile of every block, the DS-MoE layers hand their GeLU x p to
    inductor (torch ops it can fuse into the GEMM's epilogue), and the loss curve stays the same."""
    from dsmoe.model.moe import DSMoE

    modes = []
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module,
        "compile",
        lambda self, *a, **kw: (
            modes.append((type(self).__name__, kw.get("mode"))) or compile_module(self, *a, **kw)
        ),
    )
    losses, fused = {}, {}
    for mode in ("default", "max-autotune-no-cudagraphs"):
        cfg = small_cfg(
            "train.max_steps=3",
            "train.checkpoint_every=0",
            "train.export_at_end=false",
            "train.compile=true",
            f"train.compile_mode={mode}",
            run_dir=tmp_path / mode,
        )
        trainer = Trainer(cfg, features_for(cfg))
        trainer.run()
        losses[mode] = [m["loss"] for m in read_metrics(tmp_path / mode)]
        fused[mode] = {b.mlp.fused for b in trainer.engine.module.blocks if isinstance(b.mlp, DSMoE)}
    blocks = len(trainer.engine.module.blocks)
    block_modes = [mode for name, mode in modes if name == "Block"]
    assert block_modes == ["default"] * blocks + ["max-autotune-no-cudagraphs"] * blocks
    assert fused == {"default": {True}, "max-autotune-no-cudagraphs": {False}}
    torch.testing.assert_close(losses["max-autotune-no-cudagraphs"], losses["default"], rtol=1e-5, atol=1e-5)
