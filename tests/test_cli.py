"""The `dsmoe` command: every subcommand's --help, and `dsmoe reshard` end to end. (convert, eval and
generate run end to end in test_train.py, upcycle in test_upcycle.py, prepare-data in test_prepare_data.py;
a resharded checkpoint resumed by four ranks in test_launcher.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsmoe.cli import COMMANDS, main
from dsmoe.train.checkpoint import consolidated_state_dict
from dsmoe.train.logging import read_metrics

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert (
        printed.startswith(f"usage: dsmoe {name}") and f"dsmoe {name} " in printed
    )  # its docstring's example


def test_the_console_script_lists_the_subcommands():
    script = Path(sys.executable).parent / "dsmoe"  # where pip put [project.scripts] for this Python
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(f"  {name} " in done.stdout for name in COMMANDS)
    unknown = subprocess.run([str(script), "train"], capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "unknown subcommand 'train'" in unknown.stderr


def shards(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from dsmoe.train.checkpoint import _unshard_checkpoint, shard_files

    return _unshard_checkpoint(shard_files(run_dir / "checkpoints" / tag), "gelu", moments=True)


@pytest.mark.usefixtures("single_process_group")
def test_reshard_cuts_joins_and_resumes_on_the_same_curve(small_cfg, tmp_path, capsys):
    from safetensors import safe_open

    from dsmoe.run import run

    common = ("train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=0")
    ref = tmp_path / "ref"
    run(small_cfg(*common, run_dir=ref))
    tag = "step_00000002"

    # cut for ep 2 x tp 2: four shards, each naming its place; joined again they are the checkpoint exactly
    assert main(["reshard", str(ref), str(tmp_path / "ep2tp2"), "--tag", tag, "--ep", "2", "--tp", "2"]) == 0
    assert "parallel.tp=2 parallel.ep=2" in capsys.readouterr().out
    cut = tmp_path / "ep2tp2" / "checkpoints" / tag
    files = sorted(p.name for p in cut.glob("shard_*.safetensors"))
    assert files == [f"shard_tp{t}_ep{e}.safetensors" for t in range(2) for e in range(2)]
    with safe_open(str(cut / "shard_tp1_ep0.safetensors"), "pt") as f:
        assert f.metadata() == {"tp": "2", "ep": "2", "tp_rank": "1", "ep_rank": "0"}
        # an expert-parallel tensor holds half the experts, a tensor-parallel one half its width
        assert f.get_slice("blocks.0.mlp.w_in").get_shape()[0] == 2
    state = json.loads((cut / "dsmoe_state.json").read_text())
    assert state["layout_free"] and state["config"]["parallel"]["ep"] == 2
    want = shards(ref, tag)
    got = shards(tmp_path / "ep2tp2", tag)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # export reads it as any checkpoint
    exported, _ = consolidated_state_dict(tmp_path / "ep2tp2" / "checkpoints")
    reference, _ = consolidated_state_dict(ref / "checkpoints", tag)
    assert all(torch.equal(exported[k], reference[k]) for k in reference)

    # back to one process, and resumed there: the same losses as the run that never stopped
    assert main(["reshard", str(tmp_path / "ep2tp2"), str(tmp_path / "one")]) == 0
    assert len(read_metrics(tmp_path / "one")) == 2  # the curve up to the checkpoint came along
    run(small_cfg(*common, run_dir=tmp_path / "one"))
    assert "layout-free shards (dsmoe reshard): its own shard per rank" in capsys.readouterr().out
    want_curve = [m["loss"] for m in read_metrics(ref)]
    torch.testing.assert_close(
        [m["loss"] for m in read_metrics(tmp_path / "one")], want_curve, rtol=1e-5, atol=1e-6
    )
    final, final_ref = shards(tmp_path / "one", "step_00000004"), shards(ref, "step_00000004")
    for key, value in final_ref.items():
        torch.testing.assert_close(final[key], value, rtol=1e-4, atol=1e-6, msg=key)

    # refusals, one line each: an occupied run directory, a layout the model cannot take
    assert main(["reshard", str(ref), str(tmp_path / "one"), "--ep", "2"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["reshard", str(ref), str(tmp_path / "ep3"), "--ep", "3"]) == 2
    err = capsys.readouterr().err
    assert "model.moe.num_experts" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ep3" / "checkpoints").exists() or not any(
        (tmp_path / "ep3" / "checkpoints").iterdir()
    )
