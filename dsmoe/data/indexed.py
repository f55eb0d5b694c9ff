"""Megatron-format token datasets (PREFIX.bin + PREFIX.idx) blended by weight, through megatron-core's builder.

megatron-core does the work the field relies on: `IndexedDataset` memory-maps the tokens (host memory does not
grow with the corpus), `GPTDataset` shuffles documents per epoch and packs them into sequences of seq_len + 1
tokens, `BlendedDataset` draws from the sources in the blend's proportions, and the builder caches those
indices as .npy files so a corpus is indexed once. What we add:

- checks before any compute, naming the prefix: its .idx exists and is one megatron-core reads, its
  tokenizer is the run's (the fingerprint dsmoe prepare-data records in PREFIX.json), its ids fit the model;
- an atomic index cache: rank 0 builds into a private directory and publishes file by file, the descriptions
  last (megatron-core counts an index as cached only when its description exists), then a marker; a build
  killed half-way leaves nothing that looks cached (megatron-core writes its .npy files in place);
- a sampler with the same contract as PackedSampler: sample s of the run is a pure function of s, so any
  layout and any resume reads exactly the samples an uninterrupted one-process run would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dsmoe.config import DataConfig, parse_blend, parse_split
from dsmoe.data.corpus import DataError
from dsmoe.data.sampler import WindowSampler
from dsmoe.data.tokenizer import LocalTokenizer

RECORD_FORMAT = "dsmoe-indexed-1"  # PREFIX.json as dsmoe prepare-data writes it; bump when its keys change
CACHE_LAYOUT = 1  # bump when what the cache key covers changes
INDEX_HEAD = 34  # magic (9), version (8), dtype code (1), sequence count (8), document count + 1 (8)


@dataclass
class IndexHeader:
    """What a PREFIX.idx says of its dataset."""

    prefix: str
    dtype: type[np.integer]
    sequences: int
    documents: int
    tokens: int

    def sequence_lengths(self) -> np.ndarray:
        """Tokens per sequence (one sequence a document for GPT data), memory-mapped."""
        return np.memmap(
            self.prefix + ".idx", dtype=np.int32, mode="r", offset=INDEX_HEAD, shape=(self.sequences,)
        )


def read_header(prefix: str, key: str) -> IndexHeader:
    """Check that a prefix is a megatron-core indexed dataset we can read; the error names `key` and the file."""
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    if not idx.is_file():
        hint = (
            "its .bin exists without the .idx: an interrupted dsmoe prepare-data run? run it again"
            if bin_.is_file()
            else "name the prefix of a PREFIX.bin + PREFIX.idx pair (made by dsmoe prepare-data)"
        )
        raise DataError(f"{key}: {idx} does not exist ({hint})")
    if not bin_.is_file():
        raise DataError(f"{key}: {prefix} has its .idx but no {bin_.name}")
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType  # the format's one definition

    with idx.open("rb") as f:
        head = f.read(INDEX_HEAD)
    if len(head) < INDEX_HEAD or head[:9] != _INDEX_HEADER:
        raise DataError(f"{key}: {idx} is not a megatron-core index (no MMIDIDX header)")
    version, code, sequences, document_entries = struct.unpack("<QBQQ", head[9:INDEX_HEAD])
    if version != 1:
        raise DataError(f"{key}: {idx} is index version {version}; megatron-core reads version 1")
    integer_codes = {t.value: getattr(np, t.name) for t in DType if t.name.startswith(("int", "uint"))}
    if code not in integer_codes:
        raise DataError(f"{key}: {idx} stores tokens as dtype code {code}, not an integer type we read")
    dtype = integer_codes[code]
    if sequences == 0:
        raise DataError(f"{key}: {prefix} holds no documents")
    # lengths (int32), byte offsets (int64) per sequence, then the document boundaries (int64)
    expected_idx = INDEX_HEAD + 12 * sequences + 8 * document_entries
    if idx.stat().st_size != expected_idx:
        raise DataError(
            f"{key}: {idx} is {idx.stat().st_size} bytes where its header needs {expected_idx} (truncated?)"
        )
    with idx.open("rb") as f:
        f.seek(INDEX_HEAD + 4 * (sequences - 1))
        (last_length,) = struct.unpack("<i", f.read(4))
        f.seek(INDEX_HEAD + 4 * sequences + 8 * (sequences - 1))
        (last_offset,) = struct.unpack("<q", f.read(8))
    itemsize = np.dtype(dtype).itemsize
    if bin_.stat().st_size != last_offset + last_length * itemsize:
        raise DataError(
            f"{key}: {bin_} is {bin_.stat().st_size} bytes where {idx.name} says "
            f"{last_offset + last_length * itemsize}: the two files are not one dataset (truncated, or one was "
            "made again without the other)"
        )
    return IndexHeader(prefix, dtype, sequences, document_entries - 1, bin_.stat().st_size // itemsize)


def read_record(header: IndexHeader, key: str) -> dict | None:
    """PREFIX.json, written by dsmoe prepare-data (tokenizer fingerprint, counts, largest id), if present;
    refused when it no longer describes the .bin and .idx beside it."""
    path = Path(header.prefix + ".json")
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(
            f"{key}: {path} is not valid JSON ({e}); delete it or make the dataset again"
        ) from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None  # someone else's JSON beside the prefix: not our record
    if (record.get("documents"), record.get("tokens")) != (header.sequences, header.tokens):
        raise DataError(
            f"{key}: {path} records {record.get('documents')} documents and {record.get('tokens')} tokens but "
            f"the dataset holds {header.sequences} and {header.tokens}: the .bin/.idx were made again without "
            "it; delete the stale .json (or run dsmoe prepare-data again)"
        )
    return record


def largest_token_id(header: IndexHeader, record: dict | None, cache_dir: Path) -> int:
    """The largest id in a dataset: recorded by prepare_data, else read once from the .bin and cached."""
    if record is not None and "max_token_id" in record:
        return int(record["max_token_id"])
    bin_ = Path(header.prefix + ".bin")
    stat = bin_.stat()
    key = hashlib.sha256(f"{bin_.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir / "largest_token_id" / f"{key}.json"
    if cached.is_file():
        return int(json.loads(cached.read_text())["max_token_id"])
    tokens = np.memmap(bin_, dtype=header.dtype, mode="r")
    chunk = 1 << 26
    largest = max(int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"prefix": header.prefix, "max_token_id": largest}))
    os.replace(tmp, cached)
    return largest


def check_sources(cfg: DataConfig, tokenizer: LocalTokenizer, vocab_size: int) -> list[str]:
    """Check every prefix of data.blend and data.valid_blend before any compute (files, tokenizer, end-of-document
    token, ids within the tokenizer's vocabulary and model.vocab_size, non-empty splits); return warnings."""
    warnings = []
    cache_dir = Path(os.path.expanduser(cfg.cache_dir))
    shares = None if cfg.valid_blend else parse_split(cfg.split, "data.split")
    for key, values in (("data.blend", cfg.blend), ("data.valid_blend", cfg.valid_blend)):
        if not values:
            continue
        prefixes, _ = parse_blend(values, key)
        for prefix in prefixes:
            header = read_header(prefix, key)
            record = read_record(header, key)
            if record is None:
                warnings.append(
                    f"{key}: {prefix} has no PREFIX.json record of its tokenizer (made outside "
                    "dsmoe prepare-data?): its ids are checked against the vocabulary, not its tokenizer"
                )
            else:
                _check_record(record, tokenizer, key, prefix, warnings)
            largest, limit = (
                largest_token_id(header, record, cache_dir),
                min(tokenizer.vocab_size, vocab_size),
            )
            if largest >= limit:
                raise DataError(
                    f"{key}: {prefix} holds token id {largest}, beyond the vocabulary (data.tokenizer "
                    f"{tokenizer.vocab_size}, model.vocab_size {vocab_size}): it was made with a larger one"
                )
            if shares is not None and key == "data.blend":
                _check_split_shares(header, shares, key, cfg.split)
    return warnings


def _check_record(
    record: dict, tokenizer: LocalTokenizer, key: str, prefix: str, warnings: list[str]
) -> None:
    made_with = record.get("tokenizer", {})
    if made_with.get("fingerprint") != tokenizer.fingerprint:
        raise DataError(
            f"{key}: {prefix} was made with the tokenizer {made_with.get('source', '?')} "
            f"(fingerprint {str(made_with.get('fingerprint'))[:12]}), not data.tokenizer "
            f"{tokenizer.source} ({tokenizer.fingerprint[:12]}): its ids would mean other "
            "tokens; use that tokenizer or prepare the data again with this one"
        )
    if record.get("append_eos", True) and made_with.get("eos_id") != tokenizer.eos_id:
        raise DataError(
            f"{key}: {prefix} ends its documents with {made_with.get('eos_token')!r} (id {made_with.get('eos_id')}), "
            f"this run with {tokenizer.eos_token!r} (id {tokenizer.eos_id}): set data.eos_token="
            f"{made_with.get('eos_token')} or prepare the data again"
        )
    if not record.get("append_eos", True):
        warnings.append(f"{key}: {prefix} was made with --no-append-eos: its documents run into each other")


def _check_split_shares(header: IndexHeader, shares: list[float], key: str, split: str) -> None:
    """megatron-core gives split i the documents round(a_i n) .. round(b_i n); a split the run reads that gets no
    tokens would make its index build loop forever, so refuse it here."""
    lengths = header.sequence_lengths()
    bounds = np.cumsum([0.0, *shares])
    for i, name in ((0, "training"), (1, "validation")):
        begin, end = (int(round(b * header.sequences)) for b in (bounds[i], bounds[i + 1]))
        if end <= begin or int(lengths[begin:end].sum()) == 0:
            raise DataError(
                f"{key}: {header.prefix} has {header.sequences} documents: data.split {split!r} leaves its "
                f"{name} share empty; give that share more, or name a data.valid_blend"
            )


def dataset_identity(cfg: DataConfig) -> list[list]:
    """What a resumed run checks its datasets against: each prefix's size in documents and tokens (the
    sample order follows from them, the blend, the split and the seed, all of which the config holds)."""
    identity = []
    for key, values in (("data.blend", cfg.blend), ("data.valid_blend", cfg.valid_blend)):
        if values:
            for prefix in parse_blend(values, key)[0]:
                header = read_header(prefix, key)
                identity.append([prefix, header.sequences, header.tokens])
    return identity


class _MegatronTokenizer:
    """The little of a tokenizer megatron-core's GPTDataset asks for: the end-of-document id, the vocabulary
    size, and an identity for its cache keys (no pad token: it pads with -1, an id no dataset holds)."""

    def __init__(self, tokenizer: LocalTokenizer):
        self.eod, self.vocab_size = tokenizer.eos_id, tokenizer.vocab_size
        self.unique_identifiers = {"class": "dsmoe", "fingerprint": tokenizer.fingerprint, "eod": self.eod}


@dataclass
class IndexedSplits:
    """The run's training and validation datasets (megatron-core GPTDataset or BlendedDataset)."""

    train: torch.utils.data.Dataset
    valid: torch.utils.data.Dataset
    source_names: list[str]
    """Validation sources in dataset_id order: each prefix's file name."""


def source_names(prefixes: list[str]) -> list[str]:
    """Short, distinct names for the sources of a blend: the file names, with the directory where they clash."""
    names = [Path(p).name for p in prefixes]
    return names if len(set(names)) == len(names) else [str(Path(p)) for p in prefixes]


def build_splits(
    cfg: DataConfig,
    tokenizer: LocalTokenizer,
    seq_len: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
) -> IndexedSplits:
    """megatron-core's datasets for the run; call on every rank (rank 0 builds missing indices first)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    for key, values in (("data.blend", cfg.blend), ("data.valid_blend", cfg.valid_blend)):
        for prefix in parse_blend(values, key)[0] if values else []:
            read_header(prefix, key)  # a missing or broken prefix says so, naming it
    train_blend = _weighted(parse_blend(cfg.blend, "data.blend"))
    valid_blend = _weighted(parse_blend(cfg.valid_blend, "data.valid_blend")) if cfg.valid_blend else None
    cache = Path(os.path.expanduser(cfg.cache_dir)) / "megatron_indices"

    def builder(path_to_cache: Path, on_rank) -> BlendedMegatronDatasetBuilder:
        common = dict(
            random_seed=seed,
            sequence_length=seq_len,
            path_to_cache=str(path_to_cache),
            tokenizer=_MegatronTokenizer(tokenizer),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,  # causal attention builds its own mask
        )
        if valid_blend is None:
            config = GPTDatasetConfig(blend=train_blend, split=cfg.split, **common)
            config.split_matrix[2] = None  # the test share stays out of training; we never read it
        else:
            config = GPTDatasetConfig(blend_per_split=[train_blend, valid_blend, None], **common)
        # Valid (not test) samples use megatron's defaults: no partial last sequence.
        return BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, valid_samples, 0], on_rank, config)

    identity = {
        "layout": CACHE_LAYOUT,
        "blend": cfg.blend,
        "valid_blend": cfg.valid_blend,
        "split": None if valid_blend else parse_split(cfg.split, "data.split"),
        "seq_len": seq_len,
        "seed": seed,
        "samples": [train_samples, valid_samples],
        "tokenizer": tokenizer.fingerprint,
        "indices": [_file_identity(p) for p in train_blend[0] + (valid_blend[0] if valid_blend else [])],
    }
    marker = cache / f"complete-{hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]}.json"
    if not dist.is_initialized():  # a tool on one process: megatron-core's BlendedDataset asks for a rank
        _one_process_group()
    distributed = dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    missing = [not marker.is_file()]  # rank 0 decides: every rank must take part in a build's barriers
    if distributed:
        dist.broadcast_object_list(missing, src=0)
    if missing[0]:  # every rank sees the same file system (like train.run_dir)
        _build_and_publish(builder, cache, marker, identity, rank)
    if distributed:
        dist.barrier()
    train, valid, _ = builder(cache, lambda: True).build()  # every rank: read from the cache
    return IndexedSplits(train, valid, source_names((valid_blend or train_blend)[0]))


def _one_process_group() -> None:
    """A tool reading an indexed blend in one process (dsmoe eval): a world of one, over gloo."""
    store = dist.FileStore(str(Path(tempfile.mkdtemp(prefix="dsmoe-pg-")) / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)


def _file_identity(prefix: str) -> list:
    idx, bin_ = Path(prefix + ".idx").stat(), Path(prefix + ".bin").stat()
    return [str(Path(prefix).resolve()), idx.st_size, idx.st_mtime_ns, bin_.st_size, bin_.st_mtime_ns]


def _weighted(blend: tuple[list[str], list[float] | None]) -> tuple[list[str], list[float] | None]:
    """Prefixes given without weights are weighted by their token counts, so the blend draws them in
    proportion to their sizes over as many epochs as the run needs (megatron-core would cap an unweighted
    blend at one pass over its sources)."""
    prefixes, weights = blend
    if weights is not None or len(prefixes) == 1:
        return blend
    sizes = [
        Path(p + ".bin").stat().st_size / np.dtype(read_header(p, "data.blend").dtype).itemsize
        for p in prefixes
    ]
    return prefixes, [s / sum(sizes) for s in sizes]


def _build_and_publish(builder, cache: Path, marker: Path, identity: dict, rank: int) -> None:
    """Rank 0 builds the indices into a private directory and publishes them into `cache`; the other ranks
    take part in megatron-core's barriers without building (its builder synchronises on the world)."""
    cache.mkdir(parents=True, exist_ok=True)
    if rank != 0:
        builder(cache, lambda: False).build()
        return
    for stale in cache.glob(".building-*"):  # left by a build that was killed
        owner = stale.name.split("-")[1]
        if not owner.isdigit() or not Path(f"/proc/{owner}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    private = Path(tempfile.mkdtemp(prefix=f".building-{os.getpid()}-", dir=cache))
    try:
        builder(private, lambda: True).build()
        files = sorted(private.iterdir(), key=lambda p: p.name.endswith("description.txt"))
        for path in files:  # descriptions last: without one megatron-core does not count an index as cached
            os.replace(path, cache / path.name)
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps(identity, indent=1))
        os.replace(tmp, marker)
    finally:
        shutil.rmtree(private, ignore_errors=True)


class IndexedSampler(WindowSampler):
    """Sample s of the run: item s of megatron-core's training dataset (seq_len + 1 packed tokens). Beyond the
    samples the index was built for (data.train_samples) the order starts again from its beginning."""

    def __init__(self, dataset: torch.utils.data.Dataset, seq_len: int):
        self.dataset, self.seq_len = dataset, seq_len
        if len(dataset) == 0:
            raise DataError("the training split of data.blend holds no sequence of data.seq_len tokens")

    def item(self, sample: int) -> dict:
        return self.dataset[sample % len(self.dataset)]

    def window(self, sample: int) -> np.ndarray:
        item = self.item(sample)
        return torch.cat([item["tokens"], item["labels"][-1:]]).numpy()


def validation_rows(splits: IndexedSplits, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` validation sequences, (count, seq_len + 1) tokens, and each one's source index."""
    if len(splits.valid) == 0:
        raise DataError("the validation split of the blend holds no sequence of data.seq_len tokens")
    count = min(count, len(splits.valid))
    items = [splits.valid[i] for i in range(count)]
    rows = torch.stack([torch.cat([it["tokens"], it["labels"][-1:]]) for it in items])
    source = torch.tensor([int(it.get("dataset_id", 0)) for it in items], dtype=torch.long)
    return rows, source
