"""tools/host_profile.py: a py-spy recording filed by call site, compiling samples left out."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from host_profile import summarise  # noqa: E402

STEP = "main (bench_train.py:1);Trainer.step (dsmoe/train/loop.py:428)"
RECORDING = [
    f"{STEP};DeepSpeedEngine.step (deepspeed/runtime/engine.py:3622);ThroughputTimer.stop "
    "(deepspeed/utils/timer.py:256);CUDA_Accelerator.synchronize (deepspeed/accelerator/cuda_accelerator.py:89);"
    "synchronize (torch/cuda/__init__.py:1162) 30\n",
    f"{STEP};Block.forward (dsmoe/model/transformer.py:98);Runner.call (c55.py:12) 60\n",
    f"{STEP};Block.forward (dsmoe/model/transformer.py:98);compile_fx (torch/_inductor/compile_fx.py:9) 900\n",
    f"{STEP};Trainer._on_device (dsmoe/train/loop.py:496) 10\n",
    "main (bench_train.py:1);bench_one (bench_train.py:73) 500\n",  # outside the step
    "not a sample line\n",
]


def test_host_profile_files_the_steady_step_by_call_site():
    text = summarise(RECORDING)
    assert text.startswith("1000 samples inside Trainer.step, 100 of them not compiling")
    assert "| 60.0% | `Block.forward (transformer.py:98)` |" in text
    assert "| 10.0% | `Trainer._on_device (loop.py:496)` |" in text
    assert "| 30.0% | `CUDA_Accelerator.synchronize (cuda_accelerator.py:89) <- ThroughputTimer.stop" in text
    assert "compile_fx" not in text
