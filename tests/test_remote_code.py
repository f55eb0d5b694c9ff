"""Exports carry their model code: transformers loads them with trust_remote_code where dsmoe cannot be imported,
with the export's routing rule, equal logits, the same greedy generation, and a save_pretrained round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsmoe.export import export
from dsmoe.model import Routing, RoutingRule

pytestmark = pytest.mark.usefixtures("single_process_group")

# Runs in a fresh interpreter in which `import dsmoe` fails, as on a machine with only torch and transformers.
CHILD = r"""
import json, sys
sys.modules["dsmoe"] = None  # any import of dsmoe raises ImportError
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

path, out, encoder = sys.argv[1], sys.argv[2], sys.argv[3] == "encoder"
ids = torch.load(out + ".ids.pt")
auto = AutoModelForMaskedLM if encoder else AutoModelForCausalLM
model = auto.from_pretrained(path, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
result = {"class": type(model).__module__ + "." + type(model).__name__, "vocab": len(tokenizer)}
with torch.no_grad():
    result["logits"] = model(ids).logits
    if not encoder:
        result["greedy"] = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    model.save_pretrained(out + ".resaved")
    again = auto.from_pretrained(out + ".resaved", trust_remote_code=True).eval()
    result["resaved_logits"] = again(ids).logits
torch.save(result, out)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    from dsmoe import config as config_lib
    from dsmoe.run import run
    from tests.conftest import small_overrides
    from tests.test_encoder_train import SMALL, tiny_mlm

    root = tmp_path_factory.mktemp("remote")
    decoder = root / "decoder"
    run(
        config_lib.load(
            None, small_overrides(decoder, cache_dir) + ["train.max_steps=4", "train.export_at_end=false"]
        )
    )
    encoder = root / "encoder"
    run(
        tiny_mlm(
            encoder,
            cache_dir,
            *SMALL,
            "model.mlp=moe",
            "model.moe.activation=gelu",
            "train.export_at_end=false",
        )
    )
    return {"decoder": decoder, "encoder": encoder}


def _in_fresh_python_without_dsmoe(export_dir: Path, ids: torch.Tensor, kind: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{export_dir.name}.pt"
    torch.save(ids, str(out) + ".ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(export_dir), str(out), kind],
        cwd=tmp_path,  # not the repository: nothing of dsmoe on the path
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize(
    "rule",
    [Routing(), Routing(mlp=RoutingRule("top_k", k=2)), Routing(mlp=RoutingRule("threshold", eps=0.48))],
    ids=["dense", "top2", "threshold"],
)
def test_a_decoder_export_loads_without_dsmoe(runs, tmp_path, rule):
    from transformers import AutoModelForCausalLM

    import dsmoe.hf  # noqa: F401  our own classes, the reference

    out = export(runs["decoder"], tmp_path / str(rule).replace(" ", "_"), rule)
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    remote = _in_fresh_python_without_dsmoe(out, ids, "decoder", tmp_path)
    assert remote["class"].startswith("transformers_modules.") and remote["class"].endswith(
        "DSMoEForCausalLM"
    )
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], ours(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(remote["resaved_logits"], remote["logits"], rtol=0, atol=0)
        greedy = ours.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    assert torch.equal(remote["greedy"], greedy)


def test_an_encoder_export_loads_without_dsmoe(runs, tmp_path):
    from transformers import AutoModelForMaskedLM

    import dsmoe.hf  # noqa: F401

    out = export(runs["encoder"], tmp_path / "encoder_export", Routing(mlp=RoutingRule("top_k", k=2)))
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    remote = _in_fresh_python_without_dsmoe(out, ids, "encoder", tmp_path)
    assert remote["class"].endswith("DSMoEEncoderForMaskedLM")
    ours = AutoModelForMaskedLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], ours(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(remote["resaved_logits"], remote["logits"], rtol=0, atol=0)


def test_the_remote_code_needs_only_torch_and_transformers(runs, tmp_path):
    """transformers' own check of what a remote-code file imports (outside try blocks)."""
    from transformers.dynamic_module_utils import get_imports

    out = export(runs["decoder"], tmp_path / "export", Routing())
    allowed = {"torch", "transformers", *sys.stdlib_module_names}
    for path in sorted(out.glob("*.py")):
        assert set(get_imports(path)) - allowed == set(), path.name
    assert {p.name for p in out.glob("*.py")} >= {
        "modeling_dsmoe.py",
        "transformer.py",
        "moe.py",
        "config.py",
    }
