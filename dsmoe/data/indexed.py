"""Megatron-format token datasets (PREFIX.bin + PREFIX.idx) blended by weight, through megatron-core's builder.

megatron-core does the work the field relies on: `IndexedDataset` memory-maps the tokens (host memory does not
grow with the corpus), `GPTDataset` shuffles documents per epoch and packs them into sequences of seq_len + 1
tokens, `BlendedDataset` draws from the sources in the blend's proportions, and the builder caches those
indices as .npy files so a corpus is indexed once. What we add:

- checks before any compute, naming the prefix: its .idx exists and is one megatron-core reads, its
  tokenizer is the run's (the fingerprint tools/prepare_data.py records in PREFIX.json), its ids fit the model;
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

INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron-core's .idx magic, version 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}  # token dtypes only
RECORD_FORMAT = "dsmoe-indexed-1"
CACHE_LAYOUT = 1  # bump when what the cache key covers changes


@dataclass
class IndexHeader:
    """What a PREFIX.idx says of its dataset."""

    prefix: str
    dtype: type[np.integer]
    sequences: int
    documents: int


def read_header(prefix: str, key: str) -> IndexHeader:
    """Check that a prefix is a megatron-core indexed dataset we can read; the error names `key` and the file."""
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    if not idx.is_file():
        hint = (
            "its .bin exists without the .idx: an interrupted tools/prepare_data.py run? run it again"
            if bin_.is_file()
            else "name the prefix of a PREFIX.bin + PREFIX.idx pair (made by tools/prepare_data.py)"
        )
        raise DataError(f"{key}: {idx} does not exist ({hint})")
    if not bin_.is_file():
        raise DataError(f"{key}: {prefix} has its .idx but no {bin_.name}")
    with idx.open("rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != INDEX_HEADER:
        raise DataError(f"{key}: {idx} is not a megatron-core index (no MMIDIDX header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[9:34])
    if version != 1:
        raise DataError(f"{key}: {idx} is index version {version}; megatron-core reads version 1")
    if code not in DTYPES:
        raise DataError(f"{key}: {idx} stores tokens as dtype code {code}, not an integer type we read")
    dtype = DTYPES[code]
    if bin_.stat().st_size % np.dtype(dtype).itemsize:
        raise DataError(f"{key}: {bin_} is not a whole number of {np.dtype(dtype).name} tokens (truncated?)")
    if sequences == 0:
        raise DataError(f"{key}: {prefix} holds no documents")
    return IndexHeader(prefix, dtype, sequences, documents - 1)


def read_record(prefix: str) -> dict | None:
    """PREFIX.json, written by tools/prepare_data.py (tokenizer fingerprint, counts, largest id), if present."""
    path = Path(prefix + ".json")
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    return record if record.get("format") == RECORD_FORMAT else None


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
    """Check every prefix of data.blend and data.valid_blend before any compute; return warnings to print."""
    warnings = []
    cache_dir = Path(os.path.expanduser(cfg.cache_dir))
    for key, values in (("data.blend", cfg.blend), ("data.valid_blend", cfg.valid_blend)):
        if not values:
            continue
        prefixes, _ = parse_blend(values, key)
        for prefix in prefixes:
            header = read_header(prefix, key)
            record = read_record(prefix)
            if record is None:
                warnings.append(
                    f"{key}: {prefix} has no PREFIX.json record of its tokenizer (made outside "
                    "tools/prepare_data.py?): its ids are checked against the vocabulary, not its tokenizer"
                )
            else:
                made_with = record.get("tokenizer", {})
                if made_with.get("fingerprint") != tokenizer.fingerprint:
                    raise DataError(
                        f"{key}: {prefix} was made with the tokenizer {made_with.get('source', '?')} "
                        f"(fingerprint {str(made_with.get('fingerprint'))[:12]}), not data.tokenizer "
                        f"{tokenizer.source} ({tokenizer.fingerprint[:12]}): its ids would mean other "
                        "tokens; use that tokenizer or prepare the data again with this one"
                    )
            largest = largest_token_id(header, record, cache_dir)
            if largest >= vocab_size:
                raise DataError(
                    f"{key}: {prefix} holds token id {largest}, beyond model.vocab_size {vocab_size}: "
                    "the dataset was made with a larger vocabulary than this model's"
                )
    return warnings


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
    store = dist.FileStore(tempfile.mktemp(prefix="dsmoe-pg-"), 1)
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
    private = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
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
