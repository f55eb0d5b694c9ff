"""An export's model code as transformers remote code, so the Auto classes load it where dsmoe is not installed.

    AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)   # torch + transformers only

The export directory gets the model package's files (dsmoe/model/*.py, which import only torch) and
dsmoe/hf.py as `modeling_dsmoe.py`, each with its `from dsmoe.model.X import ...` lines made relative
(`from .X import ...`, the form transformers follows to copy a module's companions), and config.json gets an
`auto_map` naming the classes. The files are the installed dsmoe's own, rewritten when the export is written:
there is no second copy of the model to drift from the one that trained.
"""

from __future__ import annotations

import re
from pathlib import Path

MODEL_PACKAGE = Path(__file__).resolve().parent / "model"
MODEL_FILES = (
    "config",
    "mlp",
    "head_loss",
    "moe_triton",
    "gemv_triton",
    "alibi_triton",
    "router",
    "sparse",
    "moe",
    "attention",
    "transformer",
    "encoder",
)
MODELING = "modeling_dsmoe"  # dsmoe/hf.py, the transformers classes


def auto_map(encoder: bool) -> dict[str, str]:
    """config.json's auto_map: which class of modeling_dsmoe.py each Auto class takes."""
    if encoder:
        return {
            "AutoConfig": f"{MODELING}.DSMoEEncoderConfig",
            "AutoModelForMaskedLM": f"{MODELING}.DSMoEEncoderForMaskedLM",
        }
    return {"AutoConfig": f"{MODELING}.DSMoEConfig", "AutoModelForCausalLM": f"{MODELING}.DSMoEForCausalLM"}


def relative(source: str, origin: str) -> str:
    """`source` with its imports of the model package made relative; any other dsmoe import at the top level
    is an error (the remote code could not run without dsmoe)."""
    out = re.sub(r"^(\s*)from dsmoe\.model\.(\w+) import", r"\1from .\2 import", source, flags=re.MULTILINE)
    for line in out.splitlines():
        if re.match(r"(from|import) dsmoe\b", line):  # indented ones sit in functions, behind try
            raise RuntimeError(f"{origin}: {line.strip()!r} would need dsmoe installed to load an export")
    return out


def write_remote_code(out: Path) -> list[Path]:
    """Write the model's files and modeling_dsmoe.py into an export directory; the files written."""
    written = []
    for name in MODEL_FILES:
        path = out / f"{name}.py"
        path.write_text(relative((MODEL_PACKAGE / f"{name}.py").read_text(), f"dsmoe/model/{name}.py"))
        written.append(path)
    hf = Path(__file__).resolve().parent / "hf.py"
    path = out / f"{MODELING}.py"
    path.write_text(relative(hf.read_text(), "dsmoe/hf.py"))
    return [*written, path]
