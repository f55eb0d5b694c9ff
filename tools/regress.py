"""Every headline GPU figure against its committed value, so a regression is seen before an issue is resolved.

    bash tools/device.sh regress                    # on the lent GPU: the four benchmarks, then this comparison
    python tools/regress.py compare OUT [--tolerance 0.05] [--md FILE]

`bash tools/device.sh regress` reruns, in one call, short forms of the benchmarks behind the headline figures
(training MFU and DS-MoE/dense speed, the DS-MoE MLP layer against a dense MLP, the encoder against
BertForMaskedLM, sparse prefill/decode against dense) into OUT; `compare` reads their JSON and the committed
JSON under benchmarks/ and prints one row per figure: committed, now, now/committed, and REGRESSED where the
figure is worse than committed by more than the tolerance (5%: lent machines are shared and noisy; ratios
measured within one run, e.g. ours/BERT, move less than absolute speeds). Exit status 1 when any regressed or a
benchmark left no result, so the call's output says it at once.

The benchmarks name their files by device (train_1b_h100.json on an H100). Each figure is compared with the
committed file of the same device where there is one; otherwise with the H200's, and then only the figures that
do not depend on the device (training and encoder ratios measured in one run, peak memory): MFU, tokens/s and
the inference ratios of another GPU are shown but not judged (prefill top-4 / dense: 1.52x on the H200,
1.42-1.43x in four H100 runs of the same code).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Figure:
    name: str
    committed: str
    """The committed result file, relative to the repository."""
    fresh: str
    """Its counterpart in the output directory of `device.sh regress`."""
    read: Callable[[dict], float]
    higher_is_better: bool = True
    unit: str = "x"
    same_device_only: bool = False
    """An absolute speed: judged only against a committed figure of the same device."""

    def files(self, device: str) -> tuple[str, str]:
        """The committed and fresh file names for a run on `device` (a slug: h100, h200)."""
        return self.committed.replace("_h200.", f"_{device}."), self.fresh.replace("_h200.", f"_{device}.")


def _train(variant: str, key: str) -> Callable[[dict], float]:
    return lambda d: d["results"][variant][key]


def _train_ratio(d: dict) -> float:
    r = d["results"]
    return r["dsmoe_compiled"]["tokens_per_s"] / r["dense_compiled"]["tokens_per_s"]


def _layer(d: dict) -> float:
    """The default DS-MoE training layer's fwd+bwd time over a dense MLP of the same width: the best of the
    benchmark's passes (it measures each configuration twice, interleaved, against its own dense run)."""
    rows = [r for r in d["mlp"] if "(default)" in r["name"] and "vs_dense" in r]
    return min(r["vs_dense"] for r in rows)


def _encoder(seq_len: int) -> Callable[[dict], float]:
    return lambda d: next(r["speedup"] for r in d["rows"] if r["seq_len"] == seq_len)


def _infer(part: str, rule: str) -> Callable[[dict], float]:
    """A sparse rule's speed over dense in one part of bench_infer (prefill: ms; decode: ms per step)."""
    key = "ms" if part == "prefill" else "ms_per_step"

    def read(d: dict) -> float:
        rows = {r["rule"]: r[key] for r in d[part]}
        return rows["dense"] / rows[rule]

    return read


TRAIN, LAYERS = "benchmarks/train_1b_h200.json", "benchmarks/layers_h200.json"
ENCODER, INFER = "benchmarks/encoder/encoder_h200.json", "benchmarks/infer_h200.json"

FIGURES = [
    Figure(
        "train: DS-MoE-1B compiled MFU",
        TRAIN,
        "train_1b_h200.json",
        _train("dsmoe_compiled", "mfu"),
        unit="",
        same_device_only=True,
    ),
    Figure(
        "train: DS-MoE-1B compiled tokens/s",
        TRAIN,
        "train_1b_h200.json",
        _train("dsmoe_compiled", "tokens_per_s"),
        unit="",
        same_device_only=True,
    ),
    Figure("train: DS-MoE-1B / Dense-1B tokens/s", TRAIN, "train_1b_h200.json", _train_ratio),
    Figure(
        "train: DS-MoE-1B peak memory GiB",
        TRAIN,
        "train_1b_h200.json",
        _train("dsmoe_compiled", "peak_memory_GiB"),
        higher_is_better=False,
        unit="",
    ),
    Figure(
        "layer: DS-MoE MLP fwd+bwd / dense MLP", LAYERS, "layers_h200.json", _layer, higher_is_better=False
    ),
    Figure("encoder: ours / BERT at 256 x 128", ENCODER, "encoder/encoder_h200.json", _encoder(128)),
    Figure("encoder: ours / BERT at 64 x 512", ENCODER, "encoder/encoder_h200.json", _encoder(512)),
    *(
        Figure(
            f"infer: {part} {rule} / dense",
            INFER,
            "infer_h200.json",
            _infer(part, rule),
            same_device_only=True,
        )
        for part in ("prefill", "decode_b1", "decode_b64")
        for rule in ("top-4", "threshold 1")
    ),
]


def device_of(out: Path) -> str:
    """The device tag of a regress run's output (tools/_cli.device_tag, which every benchmark names its files
    by): the most common among the files the figures read, so one benchmark that left nothing does not hide
    it; h200 where there are none."""
    tags = [
        path.stem.removeprefix(prefix)
        for prefix, pattern in (
            ("train_1b_", "train_1b_*.json"),
            ("layers_", "layers_*.json"),
            ("infer_", "infer_*.json"),
            ("encoder_", "encoder/encoder_*.json"),
        )
        for path in out.glob(pattern)
    ]
    return max(sorted(set(tags)), key=tags.count) if tags else "h200"


def compare(out: Path, tolerance: float, device: str | None = None) -> tuple[list[dict], bool]:
    """One row per figure, and whether every figure is there and none regressed."""
    device = device or device_of(out)
    rows, ok = [], True
    for f in FIGURES:
        committed_name, fresh_name = f.files(device)
        same_device = (REPO / committed_name).exists()
        committed_name = committed_name if same_device else f.committed
        committed_file, fresh_file = REPO / committed_name, out / fresh_name
        committed = f.read(json.loads(committed_file.read_text()))
        row = {"figure": f.name, "committed": committed, "committed_in": committed_name}
        try:
            now = f.read(json.loads(fresh_file.read_text()))
        except (OSError, KeyError, StopIteration, ValueError, ZeroDivisionError) as e:
            row.update(now=None, verdict=f"NO RESULT ({type(e).__name__}: {e})")
            ok = False
            rows.append(row)
            continue
        change = now / committed if committed else float("nan")
        better = change if f.higher_is_better else 1 / change
        verdict = "REGRESSED" if better < 1 - tolerance else "better" if better > 1 + tolerance else "ok"
        if f.same_device_only and not same_device:
            verdict = f"not judged ({device} vs a committed figure of another GPU)"
        ok &= verdict != "REGRESSED"
        row.update(now=now, now_over_committed=change, verdict=verdict)
        rows.append(row)
    return rows, ok


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3f}{unit}"


def table(rows: list[dict], tolerance: float) -> list[str]:
    units = {f.name: f.unit for f in FIGURES}
    lines = [
        f"| figure | committed | now | now / committed | verdict (tolerance {tolerance:.0%}) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        change = f"{r['now_over_committed']:.3f}" if r.get("now_over_committed") else "-"
        unit = units[r["figure"]]
        lines.append(
            f"| {r['figure']} | {fmt(r['committed'], unit)} | {fmt(r['now'], unit)} | {change} | {r['verdict']} |"
        )
    committed_in = sorted({r["committed_in"] for r in rows})
    lines += ["", "Committed figures from: " + ", ".join(committed_in)]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="the fresh results in OUT against the committed ones")
    c.add_argument("out", type=Path, help="where `bash tools/device.sh regress` wrote its results")
    c.add_argument("--tolerance", type=float, default=0.05)
    c.add_argument("--md", type=Path, help="also write the table here (with the run's header lines)")
    c.add_argument(
        "--device", help="the device slug of the fresh files (default: read from OUT's file names)"
    )
    args = parser.parse_args()
    rows, ok = compare(args.out, args.tolerance, args.device)
    lines = table(rows, args.tolerance)
    print("\n".join(lines))
    if args.md:
        header = (args.out / "header.txt").read_text() if (args.out / "header.txt").exists() else ""
        args.md.write_text(header + "\n".join(lines) + "\n")
        args.md.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("all figures within tolerance" if ok else "REGRESSION or missing result: see the table", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
