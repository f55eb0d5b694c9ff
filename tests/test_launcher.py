"""The launcher as users run it: `deepspeed launchers/train.py`, one and two CPU ranks over gloo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsmoe.export import load_export
from dsmoe.train.logging import read_metrics
from tests.conftest import small_overrides

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, overrides: list[str], launcher: str = "deepspeed", timeout: int = 600):
    env = dict(
        os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1"
    )
    port = str(free_port())
    if launcher == "deepspeed":
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", port]
    else:
        cmd = ["torchrun", "--nproc_per_node", str(ranks), "--master_port", port]
    cmd += ["launchers/train.py", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_two_ranks_zero2_follow_the_one_rank_loss_curve(tmp_path, cache_dir):
    """Two ranks under `deepspeed` against one rank under `torchrun`: both launchers, one curve; the two ranks
    with ZeRO's settings tuned (small buckets, so the gradients reduce in several; reduction overlapped)."""
    common = ["parallel.zero_stage=2", "train.max_steps=6", "train.checkpoint_every=3"]
    # One rank takes the global batch of 8 whole, two ranks 4 each: the same batch for the MI marginal.
    one_rank = ["train.wandb=true", "train.micro_batch_size=8"]
    tuned = ["parallel.zero_bucket_elements=20000", "parallel.zero_overlap_comm=true"]
    one = launch(1, small_overrides(tmp_path / "one", cache_dir) + common + one_rank, "torchrun")
    two = launch(2, small_overrides(tmp_path / "two", cache_dir) + common + tuned)
    curve_one = [m["loss"] for m in read_metrics(tmp_path / "one")]
    curve_two = [m["loss"] for m in read_metrics(tmp_path / "two")]
    assert len(curve_one) == len(curve_two) == 6
    torch.testing.assert_close(curve_two, curve_one, rtol=1e-5, atol=1e-5)
    assert "world 2 (dp 2 x ep 1 x tp 1)" in two.stdout and "world 1 (dp 1 x ep 1 x tp 1)" in one.stdout
    assert "held-out perplexity" in two.stdout and "threshold N*p>0.48" in two.stdout
    # The export of the two-rank ZeRO-2 checkpoint holds the same model as the one-rank run's.
    model_one, *_ = load_export(tmp_path / "one" / "export")
    model_two, *_ = load_export(tmp_path / "two" / "export")
    for (name, a), (_, b) in zip(model_one.named_parameters(), model_two.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert list((tmp_path / "one" / "wandb").glob("offline-run-*")), "wandb should log offline"


def test_config_errors_exit_before_any_compute(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 64\n  num_experts: 4\n")
    proc = subprocess.run(
        [sys.executable, "launchers/train.py", "--config", str(bad)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "model.num_experts" in proc.stderr and str(bad) in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "ranks, layout",
    [
        (4, ["parallel.ep=2", "parallel.tp=2", "parallel.zero_stage=1"]),
        (2, ["parallel.ep=2", "parallel.zero_stage=0"]),  # expert ranks' optimizer states in our files
    ],
    ids=["ep2xtp2-zero1", "ep2-zero0"],
)
def test_parallel_run_resumes_and_exports_the_one_rank_model(ranks, layout, tmp_path, cache_dir):
    """`deepspeed --num_gpus N launchers/train.py parallel.ep=2 ...`, stopped after step 3 and resumed:
    the loss curve and the exported model are those of one uninterrupted rank."""
    common = ["train.max_steps=6", "train.checkpoint_every=3"]
    one = ["train.micro_batch_size=8"]  # the whole global batch at once, as the parallel ranks together
    launch(1, small_overrides(tmp_path / "one", cache_dir) + common + one, "torchrun")
    run = small_overrides(tmp_path / "par", cache_dir) + common + layout  # 2 expert ranks x 4 sequences
    first = launch(ranks, [*run, "train.exit_at_step=3"])
    assert (
        f"world {ranks} (dp 1 x ep 2 x tp {ranks // 2}, experts reached by gathering tokens)" in first.stdout
    )
    assert not (tmp_path / "par" / "export").exists()
    resumed = launch(ranks, run)
    assert "resuming from step_00000003" in resumed.stdout
    curve_one = [m["loss"] for m in read_metrics(tmp_path / "one")]
    curve_par = [m["loss"] for m in read_metrics(tmp_path / "par")]
    assert len(curve_par) == 6
    torch.testing.assert_close(curve_par, curve_one, rtol=1e-5, atol=1e-5)
    model_one, *_ = load_export(tmp_path / "one" / "export")
    model_par, *_ = load_export(tmp_path / "par" / "export")
    for (name, a), (_, b) in zip(model_one.named_parameters(), model_par.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def moments_at(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The whole model's parameters and Adam moments of a checkpoint, whatever layout wrote it."""
    from dsmoe.train.checkpoint import _unshard_checkpoint, shard_files

    return _unshard_checkpoint(shard_files(run_dir / "checkpoints" / tag), "gelu", moments=True)


@pytest.mark.slow
def test_checkpoints_reshard_between_layouts(tmp_path, cache_dir):
    """3 steps under ep2 x tp2 (ZeRO-1), resumed under dp2 (ZeRO-2) and in one process (ZeRO-0), and a
    one-process checkpoint resumed under ep2 x tp2, as it is and cut for it by `dsmoe reshard`: the next 3
    steps' losses and the Adam moments after them are those of one uninterrupted process."""
    import shutil

    common = ["train.max_steps=6", "train.checkpoint_every=3", "train.keep_checkpoints=0"]
    one = ["train.micro_batch_size=8"]  # the global batch of 8 at once, as 2 data-parallel ranks x 4
    ep_tp = ["parallel.ep=2", "parallel.tp=2", "parallel.zero_stage=1"]
    runs = {name: tmp_path / name for name in ("ref", "to_dp2", "to_one", "to_ep_tp", "resharded")}
    launch(1, small_overrides(runs["ref"], cache_dir) + common + one, "torchrun")
    launch(4, small_overrides(runs["to_dp2"], cache_dir) + common + ep_tp + ["train.exit_at_step=3"])
    shutil.copytree(runs["to_dp2"], runs["to_one"])
    shutil.copytree(runs["ref"], runs["to_ep_tp"])
    (runs["to_ep_tp"] / "checkpoints" / "latest").write_text("step_00000003")
    shutil.rmtree(runs["to_ep_tp"] / "checkpoints" / "step_00000006")
    (runs["to_ep_tp"] / "metrics.jsonl").write_text(
        "".join((runs["ref"] / "metrics.jsonl").read_text().splitlines(keepends=True)[:3])
    )

    # `dsmoe reshard` cuts the one-process checkpoint for ep2 x tp2: each rank then reads only its own shard
    cut = [sys.executable, "-m", "dsmoe", "reshard", str(runs["ref"]), str(runs["resharded"])]
    subprocess.run(cut + ["--tag", "step_00000003", "--tp", "2", "--ep", "2"], cwd=REPO, check=True)

    dp2 = launch(2, small_overrides(runs["to_dp2"], cache_dir) + common + ["parallel.zero_stage=2"])
    assert "resuming step_00000003 in another layout (world_size 4 -> 2, ep 2 -> 1, tp 2 -> 1" in dp2.stdout
    launch(1, small_overrides(runs["to_one"], cache_dir) + common + one, "torchrun")
    launch(4, small_overrides(runs["to_ep_tp"], cache_dir) + common + ep_tp)
    resharded = launch(4, small_overrides(runs["resharded"], cache_dir) + common + ep_tp)
    assert "from its layout-free shards (dsmoe reshard): its own shard per rank" in resharded.stdout

    want_curve = [m["loss"] for m in read_metrics(runs["ref"])]
    want = moments_at(runs["ref"], "step_00000006")
    assert any(k.startswith("exp_avg_sq/blocks.0.mlp.w_in") for k in want)
    for name in ("to_dp2", "to_one", "to_ep_tp", "resharded"):
        curve = [m["loss"] for m in read_metrics(runs[name])]
        torch.testing.assert_close(curve, want_curve, rtol=1e-5, atol=1e-5, msg=name)
        got = moments_at(runs[name], "step_00000006")
        assert got.keys() == want.keys()
        for key, value in got.items():
            # fp32 sums in another order, then Adam's division by small second moments: compare tensors
            # as wholes (the loss curves above agree to 1e-7)
            error = float((value - want[key]).norm() / want[key].norm().clamp_min(1e-12))
            assert error < 1e-4, f"{name}: {key} differs by {error:.1e} (relative norm)"
