"""Faults and bad input: atomic checkpoints, fallback, NaN steps, signals, and the errors users see."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsmoe import config as config_lib
from dsmoe.config import ConfigError
from dsmoe.export import export, load_from_run
from dsmoe.model import Routing
from dsmoe.run import TrainingDiverged, run
from dsmoe.train import checkpoint
from dsmoe.train.checkpoint import CheckpointError
from dsmoe.train.logging import read_metrics
from parallel import groups
from tests.conftest import small_overrides

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("single_process_group")
NO_EXPORT = "train.export_at_end=false"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted 8-step run (checkpoints at 4 and 8): the curve every recovery must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run(
        config_lib.load(None, small_overrides(run_dir, cache_dir) + [NO_EXPORT, "train.keep_checkpoints=0"])
    )
    return result.losses


def test_checkpoints_are_published_complete_and_pruned(small_cfg, tmp_path):
    run(small_cfg(NO_EXPORT, "train.checkpoint_every=2", "train.keep_checkpoints=2"))
    root = tmp_path / "run" / "checkpoints"
    assert checkpoint.complete_tags(tmp_path / "run") == ["step_00000008", "step_00000006"]
    assert (root / "latest").read_text() == "step_00000008"
    assert not [p for p in root.iterdir() if p.name.endswith(".partial") or p.name.endswith(".tmp")]
    manifest = json.loads((root / "step_00000008" / "manifest.json").read_text())["files"]
    assert {"rng_rank0.pt", "tokenizer.json", "mp_rank_00_model_states.pt"} <= set(manifest)
    assert checkpoint.verify(root / "step_00000008") == []


def test_damaged_latest_falls_back_with_a_warning(small_cfg, tmp_path, reference):
    run(small_cfg(NO_EXPORT, "train.exit_at_step=6", "train.checkpoint_every=3", "train.keep_checkpoints=0"))
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step_00000006"
    states = root / "step_00000006" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    states.write_bytes(bytes(data))
    (root / "step_00000009.partial").mkdir()  # what a save killed midway leaves
    with pytest.warns(
        UserWarning, match=r"step_00000006 \(mp_rank_00_model_states.pt does not match its checksum"
    ):
        resumed = run(small_cfg(NO_EXPORT, "train.checkpoint_every=3", "train.keep_checkpoints=0"))
    assert resumed.losses == reference[3:]  # resumed from step 3, same curve
    assert not (root / "step_00000009.partial").exists()


def test_garbage_latest_pointer_and_no_intact_checkpoint(small_cfg, tmp_path):
    run(small_cfg(NO_EXPORT, "train.exit_at_step=4"))
    root = tmp_path / "run" / "checkpoints"
    (root / "latest").write_bytes(b"\xff\xfe garbage")
    assert checkpoint.resume_tag(tmp_path / "run") == "step_00000004"
    (root / "step_00000004" / "rng_rank0.pt").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint .*rng_rank0.pt is missing"):
        run(small_cfg(NO_EXPORT))


def test_disk_full_while_saving_keeps_the_previous_latest(small_cfg, tmp_path, monkeypatch):
    real_save = checkpoint.torch.save

    def failing_save(obj, path, *args, **kwargs):
        if ".partial" in str(path) and "step_00000008" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(
        CheckpointError,
        match=r"saving step_00000008 failed .*No space left.*`latest` still names step_00000004",
    ):
        run(small_cfg(NO_EXPORT))
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step_00000004"
    assert not (root / "step_00000008.partial").exists() and not (root / "step_00000008").exists()


class NaNAt:
    """Wraps the model so that chosen forward calls return a NaN loss (a stand-in for a numeric blow-up)."""

    def __init__(self, calls: set[int]):
        self.calls, self.count = calls, 0

    def __call__(self, model):
        original = model.forward

        def forward(*args, **kwargs):
            self.count += 1
            out = original(*args, **kwargs)
            if self.count in self.calls:
                out.loss = out.loss * float("nan")
            return out

        model.forward = forward
        return model


def test_nan_step_is_skipped_and_training_goes_on(small_cfg, tmp_path, monkeypatch, reference):
    import dsmoe.train.loop as loop

    build = loop.build
    monkeypatch.setattr(loop, "build", lambda cfg: NaNAt({6})(build(cfg)))  # step 3, second micro-batch
    result = run(small_cfg(NO_EXPORT))
    metrics = read_metrics(tmp_path / "run")
    assert [m["skipped"] for m in metrics] == [False, False, True] + [False] * 5
    assert result.losses[:2] == reference[:2] and result.steps == 8
    assert all(torch.isfinite(p).all() for p in result.engine.module.parameters())
    assert torch.tensor(result.losses[3:]).isfinite().all()


def test_persistent_nan_stops_with_the_last_good_checkpoint(small_cfg, tmp_path, monkeypatch):
    import dsmoe.train.loop as loop

    build = loop.build
    monkeypatch.setattr(loop, "build", lambda cfg: NaNAt(set(range(11, 100)))(build(cfg)))  # from step 6 on
    with pytest.raises(
        TrainingDiverged, match=r"2 consecutive steps up to step 7 .*last good checkpoint is step_00000004"
    ):
        run(small_cfg(NO_EXPORT, "train.max_bad_steps=2"))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000004"


def test_incompatible_parallel_sizes_are_refused():
    with pytest.raises(
        ConfigError, match=r"parallel.dp x parallel.ep x parallel.tp = 2 x 1 x 1 = 2, but the world size is 1"
    ):
        groups.init(config_lib.ParallelConfig(dp=2), source="exp.yaml")


def test_tokenizer_that_does_not_match_the_checkpoint(small_cfg, tmp_path):
    run(small_cfg(NO_EXPORT, "train.exit_at_step=4"))
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzz-not-ours"] = 999_999
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    (ckpt / "manifest.json").unlink()
    checkpoint.write_manifest(ckpt)  # an intact checkpoint, but of another tokenizer
    with pytest.raises(CheckpointError, match="tokenizer built from this run's data settings differs"):
        run(small_cfg(NO_EXPORT))


def test_exporting_inconsistent_shards_names_the_file(small_cfg, tmp_path):
    run(small_cfg(NO_EXPORT, "train.max_steps=4", "parallel.zero_stage=2"))
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    shard = next(ckpt.glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated, as a crashed copy would leave it
    with pytest.raises(CheckpointError, match=rf"{shard.name} has \d+ bytes, the manifest says"):
        export(tmp_path / "run", tmp_path / "out", Routing(), tag="step_00000004")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        load_from_run(tmp_path / "run")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, cache_dir):
    overrides = small_overrides(tmp_path / "run", cache_dir) + [
        NO_EXPORT,
        "train.max_steps=400",
        "train.checkpoint_every=1000",
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "launchers/train.py", *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while len(read_metrics(tmp_path / "run")) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "SIGTERM received" in output and "run the same command to resume" in output
    stopped_at = checkpoint.resume_tag(tmp_path / "run")
    assert stopped_at is not None and 3 <= int(stopped_at.removeprefix("step_")) < 400
    step = int(stopped_at.removeprefix("step_"))
    assert len(read_metrics(tmp_path / "run")) == step
    again = subprocess.run(
        [sys.executable, "launchers/train.py", *overrides, f"train.exit_at_step={step + 2}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and f"resuming from {stopped_at}" in again.stdout
    assert len(read_metrics(tmp_path / "run")) == step + 2


@pytest.mark.slow
def test_short_chaos_run_survives_three_kills(tmp_path, cache_dir):
    overrides = small_overrides(tmp_path / "unused", cache_dir) + [
        "train.max_steps=30",
        "train.checkpoint_every=3",
    ]
    overrides = [o for o in overrides if not o.startswith("train.run_dir")]
    proc = subprocess.run(
        [
            sys.executable,
            "tools/chaos_train.py",
            "--kills",
            "3",
            "--workdir",
            str(tmp_path / "chaos"),
            *overrides,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert summary["loss_curve_identical"] and summary["weights_identical"] and summary["steps"] == 30
    assert summary["damaged_checkpoints_seen"] == 0 and summary["kills"] == 3


def test_resharding_a_checkpoint_with_a_missing_tensor_fails_naming_it(
    small_cfg, tmp_path, single_process_group
):
    """Another layout reads our shards; a tensor missing from them is an error, not a silent fresh start."""
    from safetensors.torch import load_file, save_file

    run(small_cfg(NO_EXPORT, "train.exit_at_step=2"))
    shard = tmp_path / "run" / "checkpoints" / "step_00000002" / "shard_tp0_ep0.safetensors"
    tensors = load_file(shard)
    del tensors["blocks.1.mlp.w_in"]
    save_file(tensors, shard, metadata={"tp": "1", "ep": "1", "tp_rank": "0", "ep_rank": "0"})
    checkpoint.write_manifest(shard.parent)  # intact as far as the manifest knows: only the content is short
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors this model needs: \['blocks.1.mlp.w_in'\]"):
        run(small_cfg(NO_EXPORT, "parallel.zero_stage=1"))  # another ZeRO stage: the resharding path
