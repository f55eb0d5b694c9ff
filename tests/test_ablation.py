"""Data-mixture ablation pieces: equal units, shared seed, exact merging, caching, clear errors."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dsmoe.ablation import build_unit_pool, merge, mixture_units, spearman
from dsmoe.data.corpus import DataError
from dsmoe.data.domains import read_domains
from dsmoe.export import export, load_export
from dsmoe.model import Routing, build
from dsmoe.run import run
from dsmoe.train.loop import _initialise_from

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools" / "research"))
import ablate_data  # noqa: E402

WORDS = {
    "alpha": "the king queen lord castle sword crown battle".split(),
    "beta": "def return import class self value list dict".split(),
    "gamma": "a noun verb adjective meaning sense gloss word".split(),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for domain, words in WORDS.items():
        (root / domain).mkdir()
        for i in range(30):
            text = " ".join(rng.choice(words) for _ in range(300))
            (root / domain / f"doc{i}.txt").write_text(text)
    return root


@pytest.fixture(scope="module")
def pool(corpus, tmp_path_factory):
    return build_unit_pool(
        corpus,
        tmp_path_factory.mktemp("pool"),
        vocab_size=300,
        val_tokens=512,
        seed_tokens=1024,
        unit_tokens=2048,
        units_per_domain=2,
    )


def test_units_are_equal_and_disjoint(pool):
    sizes = {u: len(np.fromfile(p, dtype=np.uint16)) for u, p in pool.units.items()}
    assert set(sizes.values()) == {2048} and len(sizes) == 6
    assert mixture_units(pool, {"alpha": 2, "beta": 1}) == ["alpha/0", "alpha/1", "beta/0"]
    a0, a1 = (np.fromfile(pool.units[u], dtype=np.uint16) for u in ("alpha/0", "alpha/1"))
    assert not np.array_equal(a0, a1)


def test_pool_errors(corpus, tmp_path, pool):
    with pytest.raises(DataError, match=r"domains \['delta'\] are not in"):
        read_domains(corpus, ["delta"])
    (tmp_path / "c" / "empty").mkdir(parents=True)
    with pytest.raises(DataError, match="'empty' .* has no .txt or .jsonl documents"):
        read_domains(tmp_path / "c")
    with pytest.raises(DataError, match="too few for 512 held-out"):
        build_unit_pool(
            corpus,
            tmp_path / "p",
            vocab_size=300,
            val_tokens=512,
            seed_tokens=1024,
            unit_tokens=10**6,
            units_per_domain=1,
        )
    with pytest.raises(DataError, match="asks for 3 units of 'alpha'"):
        mixture_units(pool, {"alpha": 3})


def test_merge_is_exact_where_it_must_be():
    torch.manual_seed(0)
    a = {"w": torch.randn(64, 32), "b": torch.randn(7)}
    b = {"w": torch.randn(64, 32), "b": torch.randn(7)}
    for n in (2, 3, 7):
        merged = merge([a] * n, [1.0] * n)
        assert all(torch.equal(merged[k], a[k]) for k in a)
    first = merge([a, b], [1.0, 0.0])
    assert all(torch.equal(first[k], a[k]) for k in a)
    torch.testing.assert_close(merge([a, b], [3.0, 1.0])["w"], 0.75 * a["w"] + 0.25 * b["w"])
    with pytest.raises(ValueError, match="parameter names differ"):
        merge([a, {"w": a["w"]}], [1, 1])


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)  # ties share ranks


@pytest.mark.usefixtures("single_process_group")
def test_modules_start_from_the_seed_and_trained_units_are_cached(pool, small_cfg, tmp_path, monkeypatch):
    base = small_cfg()
    config_args = [
        a
        for a in __import__("tests.conftest", fromlist=["x"]).small_overrides(
            tmp_path / "unused", base.data.cache_dir
        )
    ]
    seed_over = ablate_data.train_overrides(pool, tmp_path / "seed", pool.seed, 2 * 256, base, None)
    seed_export = ablate_data.train(None, config_args + seed_over, in_process=True)
    seed_model = load_export(seed_export)[0]
    # A module's weights before its first step are the seed's, bit for bit.
    unit_over = ablate_data.train_overrides(
        pool, tmp_path / "u0", pool.units["alpha/0"], pool.unit_tokens, base, seed_export
    )
    from dsmoe import config as config_lib

    unit_cfg = config_lib.load(None, config_args + unit_over)
    unit_cfg.model.vocab_size = seed_model.cfg.vocab_size
    fresh = build(unit_cfg.model)
    _initialise_from(fresh, seed_export)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), seed_model.state_dict().values(), strict=True)
    )
    # Every unit gets the same recipe: only its data file and run directory differ.
    other = ablate_data.train_overrides(
        pool, tmp_path / "u1", pool.units["beta/1"], pool.unit_tokens, base, seed_export
    )
    assert [o for o in unit_over if "train_tokens" not in o and "run_dir" not in o] == [
        o for o in other if "train_tokens" not in o and "run_dir" not in o
    ]
    first = ablate_data.train(None, config_args + unit_over, in_process=True)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr("dsmoe.cached.run", lambda cfg: pytest.fail("a cached unit was trained again"))
    assert ablate_data.train(None, config_args + unit_over, in_process=True) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert Routing() == load_export(first)[2] and export is not None and run is not None


def test_candidate_mixtures():
    fixed = ablate_data.candidate_mixtures(["a", "b", "c"], 2, 2)
    assert all(sum(m.values()) == 2 and max(m.values()) <= 2 for m in fixed)
    assert {"a": 2} in fixed and {"a": 1, "c": 1} in fixed and len(fixed) == 6
    subsets = ablate_data.candidate_mixtures(["a", "b", "c"], 2, 0)
    assert len(subsets) == 7 and {"a": 2, "b": 2, "c": 2} in subsets


@pytest.mark.slow
def test_tool_end_to_end(corpus, tmp_path, cache_dir):
    import subprocess

    from tests.conftest import small_overrides

    model = [
        o
        for o in small_overrides(tmp_path / "x", cache_dir)
        if o.startswith(("model.", "data.seq_len", "train.global", "train.micro"))
    ]
    cmd = [
        sys.executable,
        "tools/research/ablate_data.py",
        "--corpus",
        str(corpus),
        "--workdir",
        str(tmp_path / "w"),
        "--vocab-size",
        "300",
        "--unit-tokens",
        "1024",
        "--seed-tokens",
        "1024",
        "--val-tokens",
        "512",
        "--units-per-domain",
        "1",
        "--mixture-units",
        "2",
        *model,
    ]
    proc = subprocess.run(
        cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Pooled over domains" in proc.stdout
    assert {p.name for p in (tmp_path / "w").iterdir()} >= {"results.md", "results.csv", "scatter.png"}
    assert (
        len((tmp_path / "w" / "results.csv").read_text().splitlines()) == 1 + 3 * 3
    )  # 3 mixtures x 3 domains


def test_prepare_corpus_names_a_missing_debian_package(tmp_path, monkeypatch):
    import prepare_corpus

    monkeypatch.setattr(prepare_corpus, "PYTHON_INFO", tmp_path / "python3.11.info.gz")
    monkeypatch.setattr(prepare_corpus, "WORDNET", tmp_path / "wordnet")
    with pytest.raises(DataError, match=r"apt-get install -y python3.11-doc"):
        prepare_corpus.python_docs()
    with pytest.raises(DataError, match=r"apt-get install -y wordnet-base"):
        prepare_corpus.wordnet()
    code = prepare_corpus.python_code()
    assert len(code) > 100 and all(isinstance(d, str) for d in code)  # the stdlib is always there
