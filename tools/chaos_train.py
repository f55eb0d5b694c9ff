"""Kill training with SIGKILL at random moments, restart it with the same command, and check that nothing
changed: the final loss curve and weights must equal those of an uninterrupted run.

    python tools/chaos_train.py [--kills 20] [--seed 0] [--workdir /tmp/dsmoe-chaos] [key=value ...]

Runs `python launchers/train.py --config configs/tiny.yaml` with the given overrides (default: a short
run that checkpoints every few steps). Each kill strikes during start-up, inside a random step, or while
a checkpoint save is in progress (a `.partial` directory exists), chosen at random. Prints the kills
survived, the checkpoints found damaged on restart, and any difference from the uninterrupted run.
Exit status 0 only if the curves and weights are bitwise identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_OVERRIDES = [
    "train.max_steps=150",
    "train.checkpoint_every=10",
    "train.keep_checkpoints=2",
    "train.export_at_end=false",
    "train.wandb=false",
    "train.progress=false",
]


def command(run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "launchers/train.py", *overrides, f"train.run_dir={run_dir}"]


def environment() -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")


def run_to_end(run_dir: Path, overrides: list[str], log) -> str:
    proc = subprocess.run(
        command(run_dir, overrides), cwd=REPO, env=environment(), capture_output=True, text=True
    )
    log.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def kill_once(run_dir: Path, overrides: list[str], rng: random.Random, log, steps_per_kill: int) -> str:
    """Start training and SIGKILL it during start-up, in the middle of a step, or during a save."""
    proc = subprocess.Popen(
        command(run_dir, overrides), cwd=REPO, env=environment(), stdout=log, stderr=subprocess.STDOUT
    )
    how = rng.choices(["during start-up", "during a step", "during a save"], weights=[0.15, 0.55, 0.3])[0]
    root = run_dir / "checkpoints"
    start_step = steps_done(run_dir)  # after a resume the file is cut back to the checkpoint: a lower bound
    target = start_step + rng.randint(1, max(1, 2 * steps_per_kill))
    deadline = time.monotonic() + (rng.uniform(0.3, 6.0) if how == "during start-up" else 300.0)
    while proc.poll() is None and time.monotonic() < deadline:
        if (
            how == "during a save"
            and root.is_dir()
            and any(p.name.endswith(".partial") for p in root.iterdir())
        ):
            break
        if how == "during a step" and steps_done(run_dir) >= target:
            time.sleep(rng.uniform(0.0, 0.1))  # somewhere inside the next step
            break
        time.sleep(0.002)
    if proc.poll() is not None:
        return "finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return how


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/dsmoe-chaos")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the training command")
    args = parser.parse_args()

    from dsmoe.train.checkpoint import checkpoint_root, consolidated_state_dict, resume_tag
    from dsmoe.train.logging import read_metrics

    overrides = DEFAULT_OVERRIDES + args.overrides
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(args.seed)
    with open(work / "log.txt", "w") as log:
        run_to_end(work / "reference", overrides, log)
        total_steps = len(read_metrics(work / "reference"))
        kinds: dict[str, int] = {}
        for i in range(args.kills):
            how = kill_once(work / "chaos", overrides, rng, log, max(1, total_steps // (args.kills + 1)))
            kinds[how] = kinds.get(how, 0) + 1
            print(f"kill {i + 1}/{args.kills}: {how}", flush=True)
        run_to_end(work / "chaos", overrides, log)
    damaged = (work / "log.txt").read_text().count("skipped damaged checkpoints")

    ref_curve = [m["loss"] for m in read_metrics(work / "reference")]
    chaos_curve = [m["loss"] for m in read_metrics(work / "chaos")]
    curve_same = ref_curve == chaos_curve
    ref_weights, _ = consolidated_state_dict(
        checkpoint_root(work / "reference"), resume_tag(work / "reference")
    )
    chaos_weights, _ = consolidated_state_dict(checkpoint_root(work / "chaos"), resume_tag(work / "chaos"))
    differing = [k for k in ref_weights if not ref_weights[k].equal(chaos_weights[k])]
    summary = {
        "kills": sum(kinds.values()) - kinds.get("finished before the kill", 0),
        "kill_moments": kinds,
        "damaged_checkpoints_seen": damaged,
        "steps": len(chaos_curve),
        "loss_curve_identical": curve_same,
        "weights_identical": not differing,
        "differing_tensors": differing[:10],
    }
    print(json.dumps(summary, indent=2))
    return 0 if curve_same and not differing and len(chaos_curve) == len(ref_curve) else 1


if __name__ == "__main__":
    sys.exit(main())
