"""Converting a checkpoint reads only safetensors and JSON (no pickle runs), and a damaged export fails with one
line naming the file, in the tools and in the transformers Auto-class load."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsmoe.export import export, load_export
from dsmoe.model import Routing
from dsmoe.train.checkpoint import STATE, CheckpointError, checkpoint_root, resume_tag, write_manifest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("single_process_group")


class _WritesAMarker:
    """A pickle that, when loaded, creates a file: what a checkpoint from a stranger could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    from dsmoe import config as config_lib
    from dsmoe.run import run
    from tests.conftest import small_overrides

    run_dir = tmp_path_factory.mktemp("safe") / "run"
    run(
        config_lib.load(
            None, small_overrides(run_dir, cache_dir) + ["train.max_steps=4", "train.export_at_end=false"]
        )
    )
    reference = export(run_dir, run_dir.parent / "reference", Routing())
    return run_dir, reference


def _tampered_run(trained, tmp_path: Path, keep_state: bool) -> tuple[Path, Path]:
    """A copy of the run whose DeepSpeed model states are a pickle that would write a marker, its manifest
    rewritten to match (a consistent checkpoint someone sent you); without our JSON state if not keep_state."""
    run_dir, _ = trained
    copy = tmp_path / "sent"
    shutil.copytree(run_dir, copy)
    checkpoint = checkpoint_root(copy) / resume_tag(copy)
    marker = tmp_path / "code_ran"
    for states in checkpoint.glob("*model_states.pt"):
        states.write_bytes(pickle.dumps({"dsmoe": _WritesAMarker(marker)}))
    if not keep_state:
        (checkpoint / STATE).unlink()
    write_manifest(checkpoint)
    return copy, marker


def test_conversion_reads_no_pickle(trained, tmp_path):
    copy, marker = _tampered_run(trained, tmp_path, keep_state=True)
    out = export(copy, tmp_path / "out", Routing())
    assert not marker.exists()  # the pickle was never opened
    ours, *_ = load_export(out)
    reference, *_ = load_export(trained[1])
    for (name, a), (_, b) in zip(ours.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_checkpoint_without_our_json_needs_trust_pickle(trained, tmp_path):
    copy, marker = _tampered_run(trained, tmp_path, keep_state=False)
    cmd = [sys.executable, "-m", "dsmoe", "convert", str(copy), str(tmp_path / "out")]
    refused = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr and not marker.exists()
    with pytest.raises(Exception):  # noqa: B017  trusted, the pickle runs (and then is no checkpoint)
        export(copy, tmp_path / "out", Routing(), trust_pickle=True)
    assert marker.exists()


def _damaged(trained, tmp_path: Path, how: str) -> tuple[Path, str]:
    out = tmp_path / how
    shutil.copytree(trained[1], out)
    if how == "truncated":
        weights = out / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return out, "model.safetensors"
    if how == "no_tokenizer":
        (out / "tokenizer.json").unlink()
        return out, "tokenizer.json"
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    return out, "config.json"


@pytest.mark.parametrize("how", ["truncated", "no_tokenizer", "other_model"])
def test_a_damaged_export_gets_one_line_naming_the_file(trained, tmp_path, how):
    from transformers import AutoModelForCausalLM

    import dsmoe.hf  # noqa: F401

    out, name = _damaged(trained, tmp_path, how)
    for tool in (["eval"], ["generate", "--max-new-tokens", "2"]):
        proc = subprocess.run(
            [sys.executable, "-m", "dsmoe", *tool, str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert len(errors) == 1 and name in errors[0], proc.stderr[-2000:]
    if how != "other_model":  # another model's config is transformers' to load (as that model)
        with pytest.raises(CheckpointError) as e:
            AutoModelForCausalLM.from_pretrained(out)
        assert name in str(e.value) and "\n" not in str(e.value)
