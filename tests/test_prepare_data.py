"""dsmoe prepare-data: raw text to megatron-core's indexed dataset, read back by megatron-core itself."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from dsmoe.data import prepare_data as library
from dsmoe.data.corpus import DataError
from dsmoe.data.prepare_data import output_path, prepare_indexed, temporary_path
from dsmoe.data.tokenizer import load_tokenizer
from dsmoe.data.tokens import EOS, train_tokenizer

REPO = Path(__file__).resolve().parent.parent

with warnings.catch_warnings():  # megatron.core's import warns that Transformer Engine and Apex are missing
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer",
    'Quotes "inside", a tab\there, and a backslash \\ too.',
    "Unicode: café, naïve, 日本語, emoji 🙂.",
    "def f(x):\n    return x * 2\n",
    "Short.",
] + [f"Document number {i} says something about item {i * 7 % 13}." for i in range(24)]

# Small chunks: every file is cut into several, lines cross read boundaries, and workers answer out of turn.
SMALL_CHUNKS = 96


@pytest.fixture(scope="module")
def tokenizers_on_disk(tmp_path_factory):
    """A byte-level BPE trained here, as a tokenizer.json and as a transformers tokenizer directory."""
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tokenizer")
    json_path = root / "tokenizer.json"
    train_tokenizer(DOCS * 3, 400).save(str(json_path))
    directory = root / "hf"
    PreTrainedTokenizerFast(tokenizer_file=str(json_path), eos_token=EOS).save_pretrained(str(directory))
    return json_path, directory


@pytest.fixture(scope="module")
def tokenizer(tokenizers_on_disk):
    return load_tokenizer(tokenizers_on_disk[0])


def expected_ids(tokenizer, docs: list[str], append_eos: bool = True) -> list[list[int]]:
    return [ids + [tokenizer.eos_id] * append_eos for ids in tokenizer.encode_batch(docs)]


def read_back(prefix: Path) -> tuple[list[list[int]], np.dtype]:
    """The documents as megatron-core reads them: one sequence each."""
    dataset = IndexedDataset(str(prefix))
    assert list(dataset.document_indices) == list(range(len(dataset) + 1))  # one sequence per document
    return [dataset[i].tolist() for i in range(len(dataset))], dataset.index.dtype


def write_jsonl(path: Path, docs: list[str]) -> None:
    lines = "".join(json.dumps({"id": i, "text": doc}) + "\n" for i, doc in enumerate(docs)).encode()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(lines))
    elif path.name.endswith(".zst"):
        # Two frames, as pzstd or appended streams write: the reader must go on past the first.
        half = len(lines) // 2
        compressor = zstandard.ZstdCompressor()
        path.write_bytes(compressor.compress(lines[:half]) + compressor.compress(lines[half:]))
    else:
        path.write_bytes(lines)


def write_parquet(path: Path, docs: list[str]) -> None:
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, path, row_group_size=7)


def write_txt(directory: Path, docs: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")


def write_input(kind: str, root: Path) -> tuple[Path, list[str]]:
    """An input of one kind holding DOCS, and the documents in the order prepare_data must write them."""
    if kind in ("jsonl", "jsonl.gz", "jsonl.zst"):
        write_jsonl(root / f"docs.{kind}", DOCS)
        return root / f"docs.{kind}", DOCS
    if kind == "parquet":
        write_parquet(root / "docs.parquet", DOCS)
        return root / "docs.parquet", DOCS
    if kind == "txt":
        write_txt(root / "txt", DOCS)
        return root / "txt", DOCS
    # A directory mixing every format; read in sorted path order, subdirectories included.
    mixed = root / "mixed"
    write_txt(mixed / "c_txt", DOCS[:3])  # c_txt/doc000.txt ... sorts after b.parquet
    write_parquet(mixed / "b.parquet", DOCS[3:10])
    write_jsonl(mixed / "a.jsonl.zst", DOCS[10:14])
    write_jsonl(mixed / "a.jsonl", DOCS[14:20])
    write_jsonl(mixed / "a.jsonl.gz", DOCS[20:])
    (mixed / "README.md").write_text("not an input")
    return mixed, DOCS[14:20] + DOCS[20:] + DOCS[10:14] + DOCS[3:10] + DOCS[:3]


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt", "directory"])
def test_each_format_reads_back_in_megatron_core(kind, tmp_path, tokenizers_on_disk, tokenizer):
    source, docs = write_input(kind, tmp_path)
    # The directory case loads the transformers tokenizer directory; both give the same ids.
    loaded = load_tokenizer(tokenizers_on_disk[1]) if kind == "directory" else tokenizer
    assert loaded.fingerprint == tokenizer.fingerprint
    summary = prepare_indexed(
        [source], loaded, tmp_path / "out" / "data", workers=1, chunk_bytes=SMALL_CHUNKS
    )
    documents, dtype = read_back(tmp_path / "out" / "data")
    assert documents == expected_ids(tokenizer, docs)
    assert dtype == np.uint16
    sidecar = json.loads((tmp_path / "out" / "data.json").read_text())
    tokens = sum(map(len, documents))
    assert sidecar["format"] == "dsmoe-indexed-1"
    assert sidecar["tokenizer"] == {
        "fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "eos_token": EOS,
        "source": loaded.source,
    }
    assert sidecar["dtype"] == "uint16" and sidecar["append_eos"] is True and sidecar["text_key"] == "text"
    assert (sidecar["documents"], sidecar["tokens"], sidecar["bad_records"]) == (len(docs), tokens, 0)
    assert sidecar["max_token_id"] == max(max(d) for d in documents)
    assert len(sidecar["inputs"]) == {"txt": len(DOCS), "directory": 7}.get(kind, 1)
    assert sidecar["created"].endswith("+00:00")
    assert (summary.documents, summary.tokens) == (len(docs), tokens)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data.bin", "data.idx", "data.json"]


def test_no_append_eos_writes_the_bare_ids(tmp_path, tokenizer):
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    prepare_indexed([tmp_path / "docs.jsonl"], tokenizer, tmp_path / "data", workers=0, append_eos=False)
    assert read_back(tmp_path / "data")[0] == expected_ids(tokenizer, DOCS, append_eos=False)
    assert json.loads((tmp_path / "data.json").read_text())["append_eos"] is False


def test_worker_count_does_not_change_a_byte(tmp_path, tokenizer):
    source, _ = write_input("directory", tmp_path)
    (source / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n{"text": ""}\n')
    outputs = {}
    for workers in (0, 1, 2):
        prefix = tmp_path / f"w{workers}" / "data"
        prepare_indexed([source], tokenizer, prefix, workers=workers, chunk_bytes=SMALL_CHUNKS)
        sidecar = json.loads(output_path(prefix, ".json").read_text())
        del sidecar["created"]
        outputs[workers] = (
            output_path(prefix, ".bin").read_bytes(),
            output_path(prefix, ".idx").read_bytes(),
            sidecar,
        )
    assert outputs[1] == outputs[0]
    assert outputs[2] == outputs[0]


def test_bad_records_are_counted_by_kind_and_named_by_file_and_line(tmp_path, tokenizer):
    lines = [
        b'{"text": "good one"}',
        b'{"text": "unterminated',
        b"[1, 2]",
        b'{"body": "no text key"}',
        b'{"text": 5}',
        b'{"text": null}',
        b'{"text": "caf\xe9 in Latin-1"}',
        b'{"text": "  \\n\\t "}',
        b'{"text": "half a surrogate \\ud800 pair"}',
        b"",  # a blank line is not a record
        b'{"text": "good two"}',
    ]
    (tmp_path / "records.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    write_parquet(tmp_path / "rows.parquet", ["fine row", None, "", "another"])
    (tmp_path / "latin1.txt").write_bytes("first line\ncaf\xe9\n".encode("latin-1"))
    inputs = [tmp_path / "records.jsonl", tmp_path / "rows.parquet", tmp_path / "latin1.txt"]
    summary = prepare_indexed(inputs, tokenizer, tmp_path / "data", workers=2, chunk_bytes=40)
    assert summary.bad.counts == {
        "invalid JSON": 1,
        "not a JSON object": 1,
        "missing text key": 1,
        "text not a string": 3,
        "not UTF-8": 3,
        "empty text": 2,
    }
    records = tmp_path / "records.jsonl"
    assert summary.bad.examples == [
        f"{records}:2: invalid JSON (column 10: Unterminated string starting at)",
        f"{records}:3: not a JSON object (list)",
        f"{records}:4: missing text key (no 'text')",
        f"{records}:5: text not a string (int)",
        f"{records}:6: text not a string (null)",
    ]
    assert read_back(tmp_path / "data")[0] == expected_ids(
        tokenizer, ["good one", "good two", "fine row", "another"]
    )
    assert json.loads((tmp_path / "data.json").read_text())["bad_records"] == 11
    report = summary.report()
    assert (
        "bad records  11: empty text 2, invalid JSON 1," in report and f"{records}:2: invalid JSON" in report
    )

    # Where the later kinds are named: one input at a time puts them first.
    only = prepare_indexed([tmp_path / "rows.parquet"], tokenizer, tmp_path / "rows", workers=0)
    assert only.bad.examples == [
        f"{tmp_path / 'rows.parquet'}:row 1: text not a string (null)",
        f"{tmp_path / 'rows.parquet'}:row 2: empty text",
    ]
    (tmp_path / "ok.txt").write_text("ok")
    only = prepare_indexed(
        [tmp_path / "latin1.txt", tmp_path / "ok.txt"], tokenizer, tmp_path / "txt", workers=0
    )
    assert only.bad.examples == [f"{tmp_path / 'latin1.txt'}:2: not UTF-8 (byte 14)"]


def run_tool(argv: list[str]) -> int:
    from dsmoe.cli import main

    return main(["prepare-data", *(str(a) for a in argv)])


def test_strict_stops_at_the_first_bad_record_with_status_2(tmp_path, tokenizers_on_disk, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": 7}\n{"text": "fine"}\n')
    out = tmp_path / "out"
    status = run_tool(
        [source, "--tokenizer", tokenizers_on_disk[0], "--out", out / "data", "--strict", "--workers", "2"]
    )
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"error: {source}:3: text not a string (int) (--strict stops at the first bad record)"
    assert list(out.iterdir()) == []  # nothing published, no temporaries left


@pytest.mark.parametrize(
    "case",
    ["no match", "missing file", "unsupported", "parquet column", "parquet type", "tokenizer", "out is bin"],
)
def test_bad_input_exits_2_with_one_line_before_any_work(case, tmp_path, tokenizers_on_disk, capsys):
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    write_parquet(tmp_path / "docs.parquet", DOCS)
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "broken.json").write_text("{ not a tokenizer")
    inputs, tokenizer, out, extra = (
        [tmp_path / "docs.jsonl"],
        tokenizers_on_disk[0],
        tmp_path / "out" / "data",
        [],
    )
    expect = {
        "no match": "matches no .jsonl",
        "missing file": "does not exist",
        "unsupported": "not a file prepare_data reads",
        "parquet column": "no column 'body'",
        "parquet type": "column 'id' holds int64, not strings",
        "tokenizer": "is not a tokenizers JSON file",
        "out is bin": "ends in .bin: give the prefix",
    }[case]
    if case == "no match":
        inputs = [tmp_path / "nothing" / "*.jsonl"]
    elif case == "missing file":
        inputs.append(tmp_path / "missing.jsonl")
    elif case == "unsupported":
        inputs.append(tmp_path / "data.csv")
    elif case in ("parquet column", "parquet type"):
        inputs, extra = (
            [tmp_path / "docs.parquet"],
            ["--text-key", "body" if case == "parquet column" else "id"],
        )
    elif case == "tokenizer":
        tokenizer = tmp_path / "broken.json"
    else:
        out = tmp_path / "out" / "data.bin"
    assert run_tool([*inputs, "--tokenizer", tokenizer, "--out", out, *extra]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and expect in error
    assert not (tmp_path / "out").exists()


def test_nothing_to_write_is_an_error(tmp_path, tokenizer):
    (tmp_path / "bad.jsonl").write_text('{"text": ""}\n{"x": 1}\n')
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="all 2 records are bad"):
        prepare_indexed([tmp_path / "bad.jsonl"], tokenizer, tmp_path / "data", workers=0)
    with pytest.raises(DataError, match="hold no records"):
        prepare_indexed([tmp_path / "empty.jsonl"], tokenizer, tmp_path / "data", workers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.jsonl"]


def test_tool_prints_the_summary_and_records_the_tokenizer_as_given(tmp_path, tokenizers_on_disk, capsys):
    write_jsonl(tmp_path / "docs.jsonl.gz", DOCS)
    tokenizer_arg = os.path.relpath(tokenizers_on_disk[1], Path.cwd())  # a directory, named relatively
    status = run_tool(
        [
            tmp_path / "docs.jsonl.gz",
            "--tokenizer",
            tokenizer_arg,
            "--out",
            tmp_path / "data",
            "--workers",
            "2",
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert f"documents    {len(DOCS)}" in printed and f"{tmp_path / 'data.idx'}" in printed
    assert json.loads((tmp_path / "data.json").read_text())["tokenizer"]["source"] == tokenizer_arg


def test_each_worker_encodes_on_one_core(tokenizer, monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.setattr(library, "_worker_settings", None)  # restored after the test
    monkeypatch.setattr(library.signal, "signal", lambda *args: None)  # pytest keeps its Ctrl-C
    library._start_worker(tokenizer, "text", True)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def complete_prefix(prefix: Path) -> tuple[bytes, bytes, bytes] | None:
    """None when the prefix does not look complete (no .idx); else its files, checked to belong together."""
    if not output_path(prefix, ".idx").exists():
        return None
    sidecar = json.loads(output_path(prefix, ".json").read_text())
    documents, dtype = read_back(prefix)
    assert sum(map(len, documents)) == sidecar["tokens"] and len(documents) == sidecar["documents"]
    assert output_path(prefix, ".bin").stat().st_size == sidecar["tokens"] * np.dtype(dtype).itemsize
    return tuple(output_path(prefix, suffix).read_bytes() for suffix in (".bin", ".idx", ".json"))


@pytest.mark.parametrize("crash_at", [0, 1, 2])
def test_a_crash_while_publishing_never_pairs_a_new_bin_with_an_old_idx(
    crash_at, tmp_path, tokenizer, monkeypatch
):
    write_jsonl(tmp_path / "old.jsonl", DOCS[:5])
    write_jsonl(tmp_path / "new.jsonl", DOCS[5:])
    prefix = tmp_path / "data"
    prepare_indexed([tmp_path / "old.jsonl"], tokenizer, prefix, workers=0)
    old = complete_prefix(prefix)
    assert old is not None

    class Crash(BaseException):
        pass

    real_replace, calls = os.replace, []

    def replace_until_the_crash(src, dst):
        if len(calls) == crash_at:
            raise Crash
        calls.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(library.os, "replace", replace_until_the_crash)
    with pytest.raises(Crash):
        prepare_indexed([tmp_path / "new.jsonl"], tokenizer, prefix, workers=0)
    assert complete_prefix(prefix) is None  # not the old prefix: its .idx went first; the new .idx comes last


def kill_while_writing(tmp_path: Path, tokenizer_path: Path, prefix: Path) -> None:
    """Run the tool on ~4 MB of JSON Lines (seconds of tokenizing) and SIGKILL it once it writes its .bin."""
    source = tmp_path / "big.jsonl"
    line = json.dumps({"text": " ".join(DOCS)}) + "\n"
    source.write_text(line * (4_000_000 // len(line)))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dsmoe",
            "prepare-data",
            str(source),
            "--tokenizer",
            str(tokenizer_path),
        ]
        + ["--out", str(prefix), "--workers", "1", "--no-progress"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    temporary_bin = temporary_path(prefix, ".bin")
    deadline = time.monotonic() + 120
    while _size(temporary_bin) == 0:
        assert process.poll() is None, (
            f"the tool ended before it was killed: {process.stderr.read().decode()[-2000:]}"
        )
        assert time.monotonic() < deadline, "the tool wrote nothing in 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # not yet made, or published and gone
        return 0


def test_a_killed_run_leaves_no_complete_looking_prefix(tmp_path, tokenizers_on_disk):
    prefix = tmp_path / "out" / "data"
    kill_while_writing(tmp_path, tokenizers_on_disk[0], prefix)
    assert not output_path(prefix, ".idx").exists()
    assert temporary_path(prefix, ".bin").exists()  # what a kill leaves: a temporary, which no reader takes


def test_a_killed_run_over_a_complete_prefix_leaves_the_old_one_or_none(
    tmp_path, tokenizers_on_disk, tokenizer
):
    prefix = tmp_path / "out" / "data"
    write_jsonl(tmp_path / "old.jsonl", DOCS)
    prepare_indexed([tmp_path / "old.jsonl"], tokenizer, prefix, workers=0)
    old = complete_prefix(prefix)
    kill_while_writing(tmp_path, tokenizers_on_disk[0], prefix)
    assert complete_prefix(prefix) in (None, old)
    # The next run overwrites the killed run's temporaries and publishes a complete prefix.
    prepare_indexed([tmp_path / "old.jsonl"], tokenizer, prefix, workers=0)
    assert complete_prefix(prefix)[:2] == old[:2]
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["data.bin", "data.idx", "data.json"]


def test_a_vocabulary_above_65536_is_written_as_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    tokens = [f"filler{i}" for i in range(70_001)]
    tokens[:2] = ["[UNK]", EOS]
    for i, word in enumerate(words):
        tokens[66_000 + 1_000 * i] = word  # ids only int32 holds
    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(tokens)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    big = load_tokenizer(tmp_path / "tokenizer.json")
    assert big.vocab_size > 65_536 and big.token_dtype == np.int32
    docs = ["alpha beta", "epsilon delta gamma alpha", "beta"]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    summary = prepare_indexed([tmp_path / "docs.jsonl"], big, tmp_path / "data", workers=0)
    documents, dtype = read_back(tmp_path / "data")
    assert dtype == np.int32
    assert documents == [[66_000, 67_000, 1], [70_000, 69_000, 68_000, 66_000, 1], [67_000, 1]]
    assert summary.max_token_id == 70_000
    assert json.loads((tmp_path / "data.json").read_text())["dtype"] == "int32"
