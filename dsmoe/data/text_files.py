"""Raw text files for tokenizing: found, read in chunks of raw bytes, and turned into documents in workers.

The main process of dsmoe prepare-data only finds files and cuts them into chunks (`read_chunks`: whole
lines of JSON Lines bytes, one `.txt` file, or a record batch of a Parquet text column); the workers parse
and check each record (`documents_of`), so parsing scales with the workers as tokenizing does. A record
that cannot be a document is counted by kind and named by file and line (`BadRecords`), never guessed at.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from dsmoe.data.corpus import DataError

# What each input's name ends with, and how it is read. A `.txt` file is one document; the rest hold one
# document per line (JSON Lines) or per row (Parquet).
FORMATS = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".jsonl.zst": "jsonl",
    ".parquet": "parquet",
    ".txt": "txt",
}
SUPPORTED = ", ".join(FORMATS)
BAD_EXAMPLES = 5  # bad records named in full; the rest are only counted
# At most this many rows to a chunk: a column's metadata undercounts its text when it is dictionary-encoded.
PARQUET_MAX_ROWS = 4096
UTF8_BOM = b"\xef\xbb\xbf"


def input_format(path: Path) -> str:
    """'jsonl', 'parquet' or 'txt' by the file's name; '' when prepare_data does not read it."""
    name = path.name.lower()
    return next((form for suffix, form in FORMATS.items() if name.endswith(suffix)), "")


def find_inputs(specs: Sequence[str | Path]) -> list[Path]:
    """The input files of files, globs and directories, in a fixed order: each spec in the order given, the
    files of a glob or a directory (recursively) sorted; a file named twice is read once."""
    found: dict[Path, None] = {}  # ordered set
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file():
            if not input_format(path):
                raise DataError(f"input {spec}: not a file prepare_data reads (it reads {SUPPORTED})")
            matches = [path]
        elif path.is_dir():
            matches = _supported_files_under(path)
            if not matches:
                raise DataError(f"input directory {spec} holds no {SUPPORTED} file")
        elif glob.has_magic(str(spec)):
            matches = []
            for match in sorted(Path(m) for m in glob.glob(str(path), recursive=True)):
                if match.is_dir():
                    matches.extend(_supported_files_under(match))
                elif input_format(match):  # a glob may also match files that are not inputs (README.md)
                    matches.append(match)
            if not matches:
                raise DataError(f"input {spec!r} matches no {SUPPORTED} file")
        else:
            raise DataError(f"input {spec} does not exist")
        found.update(dict.fromkeys(matches))
    if not found:
        raise DataError("no input files given")
    return list(found)


def _supported_files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and input_format(p))


def check_parquet_columns(paths: Sequence[Path], text_key: str) -> None:
    """Every Parquet input has a string column `text_key` (checked from the schemas, before any work)."""
    for path in paths:
        if input_format(path) != "parquet":
            continue
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable Parquet file ({str(e)[:200]})") from None
        if text_key not in schema.names:
            raise DataError(
                f"{path}: no column {text_key!r} (columns: {', '.join(schema.names)}); name the text "
                "column with --text-key"
            )
        column_type = schema.field(text_key).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise DataError(f"{path}: column {text_key!r} holds {column_type}, not strings")


@dataclass
class Chunk:
    """A piece of one input file, shipped to a tokenizing worker without parsing it."""

    source: str
    """The input file, for naming bad records."""
    form: str
    """'jsonl' (whole lines of bytes), 'txt' (one document's bytes) or 'parquet' (an Arrow string array)."""
    payload: bytes | pa.Array
    first: int
    """The line number (1-based) of the payload's first line in the file, or the index (0-based) of its
    first row."""
    input_bytes: int
    """Bytes of the file on disk this chunk accounts for (compressed for .gz/.zst), for progress and MB/s."""


def read_chunks(path: Path, text_key: str, chunk_bytes: int) -> Iterator[Chunk]:
    """Chunks of about `chunk_bytes` of text from one input file, in file order."""
    form = input_format(path)
    try:
        if form == "txt":
            data = path.read_bytes()
            yield Chunk(str(path), "txt", data, 1, len(data))
        elif form == "parquet":
            yield from _parquet_chunks(path, text_key, chunk_bytes)
        else:
            yield from _jsonl_chunks(path, chunk_bytes)
    except (OSError, EOFError, pa.ArrowException, zstandard.ZstdError) as e:
        raise DataError(f"{path}: cannot be read ({str(e)[:200]})") from None


def _jsonl_chunks(path: Path, chunk_bytes: int) -> Iterator[Chunk]:
    """Whole lines only: a chunk ends at its last newline and the rest starts the next one."""
    size = path.stat().st_size
    with open(path, "rb") as raw:
        stream = _decompressed(path, raw)
        line = 1
        accounted = 0  # on-disk bytes of the chunks already yielded
        pieces: list[bytes] = []  # a line longer than a chunk accumulates here until its newline
        first_block = True
        while block := stream.read(chunk_bytes):
            if first_block and block.startswith(UTF8_BOM):  # some editors start UTF-8 files with a BOM
                block = block[len(UTF8_BOM) :]
            first_block = False
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                pieces.append(block)
                continue
            data = b"".join([*pieces, block[:cut]])
            pieces = [block[cut:]]
            on_disk = raw.tell() - accounted
            accounted += on_disk
            yield Chunk(str(path), "jsonl", data, line, on_disk)
            line += data.count(b"\n")
        rest = b"".join(pieces)
        if rest or accounted < size:
            yield Chunk(str(path), "jsonl", rest, line, size - accounted)


def _decompressed(path: Path, raw):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if name.endswith(".zst"):
        # read_across_frames: files written in several frames (pzstd, appended streams) read whole.
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


def _parquet_chunks(path: Path, text_key: str, chunk_bytes: int) -> Iterator[Chunk]:
    """Record batches of the text column alone, sized from the column's uncompressed bytes per row."""
    parquet = pq.ParquetFile(path)
    rows = parquet.metadata.num_rows
    if rows == 0:
        return
    # The metadata counts leaf columns (a struct column has several), so find the text's by its path.
    column = next(i for i in range(parquet.metadata.num_columns) if parquet.schema.column(i).path == text_key)
    text_bytes = sum(
        parquet.metadata.row_group(g).column(column).total_uncompressed_size
        for g in range(parquet.metadata.num_row_groups)
    )
    batch_rows = max(1, min(PARQUET_MAX_ROWS, chunk_bytes * rows // max(1, text_bytes)))
    size = path.stat().st_size
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_key]):
        texts = batch.column(0)
        # On-disk bytes in proportion to rows; the differences of floors add up to the file's size exactly.
        on_disk = size * (row + len(texts)) // rows - size * row // rows
        yield Chunk(str(path), "parquet", texts, row, on_disk)
        row += len(texts)


@dataclass
class BadRecords:
    """Records that could not be documents: a count per kind, and the first few named by file and line."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, kind: str, where: str, detail: str = "") -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.examples) < BAD_EXAMPLES:
            self.examples.append(f"{where}: {kind}" + (f" ({detail})" if detail else ""))

    def merge(self, later: BadRecords) -> None:
        """Add the bad records of a later chunk (examples stay in file order)."""
        for kind, count in later.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + count
        self.examples.extend(later.examples[: BAD_EXAMPLES - len(self.examples)])

    def by_kind(self) -> str:
        return ", ".join(f"{kind} {count}" for kind, count in sorted(self.counts.items()))


def where(chunk: Chunk, offset: int) -> str:
    """'file:line' of a chunk's offset-th line, or 'file:row N' of its offset-th row (0-based rows)."""
    if chunk.form == "parquet":
        return f"{chunk.source}:row {chunk.first + offset}"
    return f"{chunk.source}:{chunk.first + offset}"


def documents_of(chunk: Chunk, text_key: str, bad: BadRecords) -> tuple[list[str], list[int]]:
    """The chunk's documents and the offset (line or row in the chunk) of each; bad records go to `bad`."""
    if chunk.form == "txt":
        return _txt_document(chunk, bad)
    if chunk.form == "parquet":
        return _parquet_documents(chunk, bad)
    return _jsonl_documents(chunk, text_key, bad)


def _txt_document(chunk: Chunk, bad: BadRecords) -> tuple[list[str], list[int]]:
    try:
        text = chunk.payload.decode("utf-8-sig")  # -sig: a leading BOM is not part of the text
    except UnicodeDecodeError as e:
        line = chunk.payload.count(b"\n", 0, e.start)
        bad.add("not UTF-8", where(chunk, line), f"byte {e.start}")
        return [], []
    if not text.strip():
        bad.add("empty text", where(chunk, 0))
        return [], []
    return [text], [0]


def _parquet_documents(chunk: Chunk, bad: BadRecords) -> tuple[list[str], list[int]]:
    try:
        values = chunk.payload.to_pylist()
    except UnicodeDecodeError:  # Arrow does not always validate strings on read: find the rows one by one
        values = []
        for offset in range(len(chunk.payload)):
            try:
                values.append(chunk.payload[offset].as_py())
            except UnicodeDecodeError:
                values.append(b"")  # marks the row as not UTF-8 below
    texts, offsets = [], []
    for offset, text in enumerate(values):
        if isinstance(text, bytes):
            bad.add("not UTF-8", where(chunk, offset))
        elif _usable(text, chunk, offset, bad):
            texts.append(text)
            offsets.append(offset)
    return texts, offsets


def _usable(text, chunk: Chunk, offset: int, bad: BadRecords) -> bool:
    """A record's text is a non-blank string; anything else is counted as a bad record."""
    if not isinstance(text, str):
        bad.add("text not a string", where(chunk, offset), "null" if text is None else type(text).__name__)
        return False
    if not text.strip():
        bad.add("empty text", where(chunk, offset))
        return False
    return True


def _jsonl_documents(chunk: Chunk, text_key: str, bad: BadRecords) -> tuple[list[str], list[int]]:
    texts, offsets = [], []
    for offset, line in enumerate(chunk.payload.split(b"\n")):
        if not line.strip():  # blank lines, and the empty piece after the final newline, are not records
            continue
        try:
            # Decoded first: json.loads(bytes) would also take UTF-16 and UTF-32, which JSON Lines is not.
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad.add("not UTF-8", where(chunk, offset), f"byte {e.start} of the line")
            continue
        except json.JSONDecodeError as e:
            bad.add("invalid JSON", where(chunk, offset), f"column {e.colno}: {e.msg}")
            continue
        if not isinstance(record, dict):
            bad.add("not a JSON object", where(chunk, offset), type(record).__name__)
            continue
        if text_key not in record:
            bad.add("missing text key", where(chunk, offset), f"no {text_key!r}")
            continue
        if _usable(record[text_key], chunk, offset, bad):
            texts.append(record[text_key])
            offsets.append(offset)
    return texts, offsets
