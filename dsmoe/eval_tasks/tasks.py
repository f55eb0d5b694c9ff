"""Offline lm-evaluation-harness tasks on the held-out works (data made by tools/make_eval_tasks.py).

    lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True \
        --include_path dsmoe/eval_tasks --tasks dsmoe_heldout_ppl,dsmoe_next_line

The YAML files beside this one name these loaders (`custom_dataset`): they read the jsonl files shipped here,
so the tasks run with no network.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]


def _dataset(rows: list[dict]):
    import datasets  # lm-evaluation-harness's own dependency

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def heldout_passages(**kwargs):
    """30 passages of about 2,000 characters from Hamlet, The Tempest and Twelfth Night."""
    return _dataset(_rows("heldout_passages.jsonl"))


def next_line(**kwargs):
    """300 items: six lines of a scene, the true next line of verse among four."""
    return _dataset(_rows("next_line.jsonl"))
