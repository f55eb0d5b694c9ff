"""The wandb dashboard of a run, read back from wandb's offline files: what an MoE trainer's user looks at
(tokens seen, MFU, memory, held-out loss, expert-load heatmaps, the sparsity curve), no per-expert series."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("single_process_group")


def wandb_records(path: Path) -> list:
    """The records of an offline run's .wandb file: wandb's header, then LevelDB log records (32 KiB blocks of
    checksum, length, type, payload; a record may span blocks as first / middle / last pieces)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, block, pending, payloads = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # a record still being written
            break
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            payloads.append(payload)
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            payloads.append(pending + payload)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def test_the_dashboard_holds_what_a_user_reads_and_no_per_expert_series(small_cfg, tmp_path):
    from dsmoe.run import run

    cfg = small_cfg(
        "train.wandb=true",
        "train.log_every=2",
        "train.eval_every=4",
        "train.eval_tokens=1024",
        "train.peak_tflops=1.0",  # MFU on a CPU, against a stated peak
        "train.export_at_end=false",
    )
    run(cfg)
    run_dir = Path(cfg.train.run_dir)
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    # wandb's service may still be writing after finish() returns (seen once under load: 7 of 8 history
    # records); its exit record comes after every history record, so wait for it before counting.
    deadline = time.monotonic() + 60
    while "exit" not in (types := [r.WhichOneof("record_type") for r in wandb_records(run_file)]):
        assert time.monotonic() < deadline, f"{run_file} has no exit record: {types}"
        time.sleep(0.5)
    history = [r.history for r in wandb_records(run_file) if r.WhichOneof("record_type") == "history"]
    keys = {item.key or "/".join(item.nested_key) for h in history for item in h.item}
    assert len(history) == 8, types
    assert {"tokens_seen", "mfu", "model_tflops", "memory_gib", "loss", "val_loss", "val_ppl"} <= keys
    assert {"expert_load/_type", "attention_expert_load/_type", "val_sparsity_curve_table/_type"} <= keys
    assert {"router_entropy/layer0", "expert_load_max/layer1", "dead_experts/layer0"} <= keys
    assert not any("/expert" in k for k in keys)  # no series per expert
    heatmaps = list(run_file.parent.glob("files/media/images/expert_load_*.png"))
    assert len(heatmaps) == 4  # every log_every = 2 of 8 steps
    for image in ("expert_load.png", "attention_expert_load.png", "sparsity_curve.png"):
        assert (run_dir / image).stat().st_size > 0
