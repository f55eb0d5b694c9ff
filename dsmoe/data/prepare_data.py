"""Raw text to megatron-core's indexed dataset (PREFIX.bin + PREFIX.idx) and our sidecar PREFIX.json.

The format is Megatron-LM's and NeMo's, written with megatron-core's own IndexedDatasetBuilder, so each
side reads the other's data: one document is one sequence, its ids followed by the end-of-document token.
The work is split so that it scales with processes:

1. The main process finds the inputs and checks them, the tokenizer and the prefix: every mistake a user
   can make in the command is reported before any work.
2. It cuts the files into chunks of raw bytes (text_files.read_chunks) and sends them to `workers`
   processes, which parse, check and tokenize them and send back one array of ids per chunk.
3. It writes the arrays in input order, so any number of workers writes the same bytes, to temporary files
   beside the output, then publishes them: the old .idx removed, then the sidecar, the .bin, and the .idx
   last. A prefix is complete when its .idx exists, so a killed run never leaves one that looks complete.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dsmoe.data.corpus import DataError
from dsmoe.data.indexed import RECORD_FORMAT
from dsmoe.data.text_files import (
    BadRecords,
    Chunk,
    check_parquet_columns,
    documents_of,
    find_inputs,
    read_chunks,
    where,
)
from dsmoe.data.tokenizer import LocalTokenizer

# A worker's unit of work: ~1 MiB of text takes a fraction of a second to tokenize, so sending it costs
# little in comparison, and the few chunks in flight per worker hold little memory.
CHUNK_BYTES = 1 << 20
OUTPUT_SUFFIXES = (".bin", ".idx", ".json")


@dataclass
class TokenizedChunk:
    """A worker's answer for one chunk, in arrays rather than lists of ints: cheap to send back."""

    ids: np.ndarray
    """Every document's ids concatenated, each followed by the end-of-document token when appending it."""
    lengths: np.ndarray
    """Tokens of each document, in order (int64)."""
    bad: BadRecords
    input_bytes: int


def tokenize_chunk(
    chunk: Chunk, tokenizer: LocalTokenizer, text_key: str, append_eos: bool
) -> TokenizedChunk:
    """Parse, check and tokenize one chunk (what a worker does)."""
    bad = BadRecords()
    texts, offsets = documents_of(chunk, text_key, bad)
    documents = _encode(tokenizer, texts, offsets, chunk, bad)
    if append_eos:
        eos_id = tokenizer.eos_id
        for ids in documents:
            ids.append(eos_id)
    lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
    ids = np.fromiter(chain.from_iterable(documents), dtype=tokenizer.token_dtype, count=int(lengths.sum()))
    return TokenizedChunk(ids, lengths, bad, chunk.input_bytes)


def _encode(
    tokenizer: LocalTokenizer, texts: list[str], offsets: list[int], chunk: Chunk, bad: BadRecords
) -> list[list[int]]:
    """Ids of each text; a text the tokenizer refuses, or that gives no ids, is a bad record."""
    refused: set[int] = set()  # offsets of the texts the tokenizer refused
    try:
        encoded = tokenizer.encode_batch(texts)
    except Exception:
        # One refused text fails the whole batch: encode one by one to find it and keep the rest.
        encoded = []
        for text, offset in zip(texts, offsets, strict=True):
            try:
                encoded.extend(tokenizer.encode_batch([text]))
            except Exception as e:
                encoded.append([])
                refused.add(offset)
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:  # a JSON escape of half a surrogate pair ("\ud800")
                    bad.add("not UTF-8", where(chunk, offset), "lone surrogate")
                else:
                    bad.add("tokenizer error", where(chunk, offset), str(e)[:100])
    documents = []
    for ids, offset in zip(encoded, offsets, strict=True):
        if ids:
            documents.append(ids)
        elif offset not in refused:  # a normalizer may remove every character of a text
            bad.add("empty text", where(chunk, offset), "no tokens")
    return documents


# The tokenizer and settings of a worker process, set once by the pool's initializer: sending them with
# every chunk would cost more than the chunk. Only ever set inside worker processes.
_worker_settings: tuple[LocalTokenizer, str, bool] | None = None


def _start_worker(tokenizer: LocalTokenizer, text_key: str, append_eos: bool) -> None:
    global _worker_settings
    # Each worker encodes on one core: the tokenizers library's own thread pool in every worker would put
    # workers x cores threads on the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C reaches the whole process group: the main process stops the pool, workers should not each
    # print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The pool stops its workers with SIGTERM: a handler inherited from the parent (a training run's
    # checkpoint-then-exit, say) would keep a worker waiting on the task queue alive and the pool's join stuck.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_settings = (tokenizer, text_key, append_eos)


def _tokenize_in_worker(chunk: Chunk) -> TokenizedChunk:
    return tokenize_chunk(chunk, *_worker_settings)


@contextmanager
def _tokenized_in_order(
    paths: list[Path],
    tokenizer: LocalTokenizer,
    text_key: str,
    append_eos: bool,
    workers: int,
    chunk_bytes: int,
) -> Iterator[Iterator[TokenizedChunk]]:
    """The tokenized chunks of every input, in input order; `workers` = 0 tokenizes in this process."""
    chunks = (chunk for path in paths for chunk in read_chunks(path, text_key, chunk_bytes))
    if workers == 0:
        yield (tokenize_chunk(chunk, tokenizer, text_key, append_eos) for chunk in chunks)
        return
    # fork: workers start at once and share the loaded tokenizer; they only run tokenizers and numpy.
    start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(start_method)
    with context.Pool(workers, initializer=_start_worker, initargs=(tokenizer, text_key, append_eos)) as pool:
        # imap, not imap_unordered: results come back in input order. Its feeder thread reads ahead only as
        # far as the pipe to the workers holds, so memory stays at a few chunks per worker.
        yield pool.imap(_tokenize_in_worker, chunks, chunksize=1)


@dataclass
class PrepareSummary:
    """What one prepare_indexed run wrote, and how fast."""

    prefix: Path
    documents: int
    tokens: int
    """End-of-document tokens included."""
    max_token_id: int
    dtype: str
    bad: BadRecords
    input_files: int
    input_bytes: int
    seconds: float

    @property
    def paths(self) -> list[Path]:
        """The .bin, .idx and sidecar .json."""
        return [output_path(self.prefix, suffix) for suffix in OUTPUT_SUFFIXES]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def input_mb_per_second(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    def report(self) -> str:
        """The summary the tool prints."""
        lines = [
            f"documents    {self.documents:,}",
            f"tokens       {self.tokens:,} ({self.dtype}, end-of-document tokens included)",
            f"bad records  {self.bad.total:,}" + (f": {self.bad.by_kind()}" if self.bad.total else ""),
            *(f"  {example}" for example in self.bad.examples),
            f"seconds      {self.seconds:.2f}",
            f"tokens/s     {self.tokens_per_second:,.0f}",
            f"input MB/s   {self.input_mb_per_second:.2f} "
            f"({self.input_bytes / 1e6:.1f} MB in {self.input_files} files)",
            f"wrote        {', '.join(str(p) for p in self.paths)}",
        ]
        return "\n".join(lines)


def output_path(prefix: Path, suffix: str) -> Path:
    """PREFIX.bin, PREFIX.idx or PREFIX.json (appended: a prefix may hold dots, 'data.v2')."""
    return prefix.with_name(prefix.name + suffix)


def temporary_path(prefix: Path, suffix: str) -> Path:
    """Where PREFIX.bin/.idx/.json is written before publishing: a fixed name, so a killed run's leftovers
    are overwritten by the next run instead of piling up; no reader takes a '.tmp' file for data."""
    return prefix.with_name(prefix.name + suffix + ".tmp")


def prepare_indexed(
    inputs: Sequence[str | Path],
    tokenizer: LocalTokenizer,
    out_prefix: str | Path,
    *,
    text_key: str = "text",
    workers: int = 1,
    append_eos: bool = True,
    strict: bool = False,
    progress: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> PrepareSummary:
    """Tokenize raw text files into PREFIX.bin, PREFIX.idx and PREFIX.json (the steps: module docstring).

    `workers` processes tokenize (0: this process, with the tokenizers library's own threads); the output
    is the same for any count. Bad records are counted and skipped, or with `strict` the first one stops
    the run. Raises DataError for bad input, before any work, and when nothing could be tokenized; a run
    that raises publishes nothing. One run at a time per prefix.
    """
    prefix = _check_prefix(Path(out_prefix).expanduser())
    if workers < 0:
        raise DataError(f"workers must be 0 (this process) or more, not {workers}")
    paths = find_inputs(inputs)
    check_parquet_columns(paths, text_key)
    builder_class = _indexed_dataset_builder()
    # The run's seconds leave out the imports, which do not grow with the input.
    started = time.perf_counter()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    temporaries = {suffix: temporary_path(prefix, suffix) for suffix in OUTPUT_SUFFIXES}
    input_bytes = sum(path.stat().st_size for path in paths)
    try:
        with _tokenized_in_order(paths, tokenizer, text_key, append_eos, workers, chunk_bytes) as results:
            written = _write(builder_class, results, temporaries, tokenizer, strict, progress, input_bytes)
        if written.documents == 0:
            if written.bad.total:
                raise DataError(
                    f"nothing to write: all {written.bad.total} records are bad ({written.bad.by_kind()}); "
                    f"the first: {written.bad.examples[0]}"
                )
            raise DataError(f"nothing to write: the inputs hold no records ({len(paths)} files)")
        sidecar = {
            "format": RECORD_FORMAT,
            "tokenizer": {
                "fingerprint": tokenizer.fingerprint,
                "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id,
                "eos_token": tokenizer.eos_token,
                "source": tokenizer.source,
            },
            "dtype": np.dtype(tokenizer.token_dtype).name,
            "documents": written.documents,
            "tokens": written.tokens,
            "max_token_id": written.max_token_id,
            "append_eos": append_eos,
            "text_key": text_key,
            "inputs": [str(path) for path in paths],
            "bad_records": written.bad.total,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        temporaries[".json"].write_text(json.dumps(sidecar, indent=2) + "\n")
        _publish(temporaries, prefix)
    finally:
        for path in temporaries.values():  # after publishing, none is left; after an error, all go
            path.unlink(missing_ok=True)
    return PrepareSummary(
        prefix=prefix,
        documents=written.documents,
        tokens=written.tokens,
        max_token_id=written.max_token_id,
        dtype=sidecar["dtype"],
        bad=written.bad,
        input_files=len(paths),
        input_bytes=input_bytes,
        seconds=time.perf_counter() - started,
    )


def _check_prefix(prefix: Path) -> Path:
    if prefix.name.endswith(OUTPUT_SUFFIXES):
        raise DataError(
            f"output prefix {prefix} ends in {prefix.suffix}: give the prefix, {prefix.with_suffix('')} "
            "(the .bin, .idx and .json are named after it)"
        )
    if prefix.is_dir():
        raise DataError(f"output prefix {prefix} is a directory; give a prefix inside it ({prefix}/NAME)")
    return prefix


def _indexed_dataset_builder() -> type:
    """megatron-core's writer, imported only when writing: the import takes seconds (all of megatron.core)."""
    # megatron.core's package import warns that Transformer Engine and Apex are missing, which does not
    # matter for writing a dataset.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder


@dataclass
class _Written:
    """Running totals of what _write wrote."""

    documents: int
    tokens: int
    max_token_id: int
    bad: BadRecords


def _write(
    builder_class: type,
    results: Iterator[TokenizedChunk],
    temporaries: dict[str, Path],
    tokenizer: LocalTokenizer,
    strict: bool,
    progress: bool,
    input_bytes: int,
) -> _Written:
    """Every chunk's documents, one sequence each, into the temporary .bin and .idx."""
    import torch

    written = _Written(0, 0, -1, BadRecords())
    builder = builder_class(str(temporaries[".bin"]), dtype=tokenizer.token_dtype)
    bar = tqdm(
        total=input_bytes, unit="B", unit_scale=True, file=sys.stderr, disable=not progress, smoothing=0
    )
    started = time.perf_counter()
    try:
        for result in results:
            if strict and result.bad.total:
                raise DataError(f"{result.bad.examples[0]} (--strict stops at the first bad record)")
            written.bad.merge(result.bad)
            ids = torch.from_numpy(result.ids)
            end = 0
            for length in result.lengths.tolist():
                builder.add_item(ids[end : end + length])
                builder.end_document()
                end += length
            written.documents += len(result.lengths)
            written.tokens += len(result.ids)
            if len(result.ids):
                written.max_token_id = max(written.max_token_id, int(result.ids.max()))
            seconds = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(
                f"{written.documents / seconds:,.0f} docs/s, {written.tokens / seconds:,.0f} tokens/s",
                refresh=False,
            )
            bar.update(result.input_bytes)
        builder.finalize(str(temporaries[".idx"]))
    finally:
        builder.data_file.close()
        bar.close()
    return written


def _publish(temporaries: dict[str, Path], prefix: Path) -> None:
    """Move the finished files onto the prefix so that it is complete (has its .idx) only together with its
    own .bin and sidecar: the old .idx goes first, the new one comes last."""
    for path in temporaries.values():
        _fsync(path)  # on disk before the renames that publish it, so a crash cannot publish a hole
    output_path(prefix, ".idx").unlink(missing_ok=True)
    for suffix in (".json", ".bin", ".idx"):
        os.replace(temporaries[suffix], output_path(prefix, suffix))
    _fsync(prefix.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
