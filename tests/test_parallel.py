"""Every dp x ep x tp layout trains exactly like the single-process model (CPU processes over gloo).

The reference is the same worker with one rank. Each layout's ranks save their shards; here they are put
back together with parallel.layout.unshard and compared: the losses and MI losses of three steps, every
gradient after the first backward (DeepSpeed has reduced them over the data groups), the clipped global
gradient norms, the weights after three optimizer steps, and the top-2 sparse logits.
"""

from __future__ import annotations

import pytest
import torch

from parallel.layout import placement, unshard
from tests.parallel_worker import launch

TOL = 1e-5

LAYOUTS = {  # (dp, ep, tp), ZeRO stage, activation, how dense training reaches the experts under ep
    "dp2": ((2, 1, 1), 0, "gelu", "tokens"),
    "ep2": ((1, 2, 1), 0, "swiglu", "tokens"),
    "tp2": ((1, 1, 2), 0, "swiglu", "tokens"),
    "dp2xep2": ((2, 2, 1), 0, "gelu", "tokens"),
    "dp2xtp2": ((2, 1, 2), 0, "gelu", "tokens"),
    "ep2xtp2": ((1, 2, 2), 0, "swiglu", "tokens"),
    "dp2xep2-zero2": ((2, 2, 1), 2, "gelu", "tokens"),
    "ep2xtp2-zero1": ((1, 2, 2), 1, "swiglu", "tokens"),
    "ep2xtp2-weights": ((1, 2, 2), 0, "swiglu", "weights"),
    "dp2xep2-weights-zero2": ((2, 2, 1), 2, "gelu", "weights"),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache = {}

    def get(activation: str) -> dict:
        if activation not in cache:
            cache[activation] = launch(
                (1, 1, 1), 0, activation, tmp_path_factory.mktemp(f"ref-{activation}")
            )[0]
        return cache[activation]

    return get


def gathered(ranks: list[dict], key: str, activation: str, tp: int, ep: int) -> dict[str, torch.Tensor]:
    """Whole tensors from the shards of the first data-parallel replica."""
    pieces: dict[str, dict] = {}
    for r in ranks:
        tp_rank, ep_rank, _, dp_rank = r["where"]
        if dp_rank == 0:
            for name, t in r[key].items():
                pieces.setdefault(name, {})[(tp_rank, ep_rank)] = t
    return {name: unshard(p, placement(name, activation), tp, ep) for name, p in pieces.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_trains_like_one_process(name, references, tmp_path):
    (dp, ep, tp), zero_stage, activation, dispatch = LAYOUTS[name]
    reference = references(activation)
    ranks = launch((dp, ep, tp), zero_stage, activation, tmp_path, dispatch)

    for r in ranks:
        assert r["loss"] == pytest.approx(reference["loss"], rel=TOL)
        for got, want in zip(r["mi"], reference["mi"], strict=True):
            # MI is a difference of two entropies of about log N: compare at fp32 precision of those
            assert got == pytest.approx(want, rel=TOL, abs=1e-6)
        if zero_stage == 0:  # ZeRO reports its own norm; ours is checked on the plain fp32 path
            assert r["norm"] == pytest.approx(reference["norm"], rel=TOL)
    assert reference["norm"][0] > 0.5, "the clip threshold must bind for this test to check the norm"

    want_weights = reference["weights"]
    weights = gathered(ranks, "weights", activation, tp, ep)
    assert weights.keys() == want_weights.keys()
    for n, w in weights.items():
        assert (e := rel(w, want_weights[n])) < TOL, (
            f"{name}: weight {n} after 3 steps, relative error {e:.2e}"
        )
        assert not torch.equal(w, torch.zeros_like(w))
    if zero_stage == 0:
        for n, g in gathered(ranks, "grads", activation, tp, ep).items():
            assert (e := rel(g, reference["grads"][n])) < TOL, (
                f"{name}: gradient of {n}, relative error {e:.2e}"
            )

    # Held-out evaluation during training (dsmoe.evaluation.evaluate with the layout): the one-process figures.
    for r in ranks:
        assert r["eval"].loss == pytest.approx(reference["eval"].loss, rel=TOL)
        assert r["eval"].tokens == reference["eval"].tokens == 7 * 16
        for source, loss in reference["eval"].source_loss.items():
            assert r["eval"].source_loss[source] == pytest.approx(loss, rel=TOL)

    # Sparse inference (top-2 MLP and attention experts: all-to-all dispatch under ep; a threshold MLP rule:
    # fixed slots of the gathered tokens): each batch slice's logits, from its first tensor-parallel rank,
    # equal the single-process sparse logits of those rows.
    micro = reference["sparse_logits"].shape[0] // (dp * ep)
    for key in ("sparse_logits", "threshold_logits"):
        for r in ranks:
            tp_rank, _, batch_rank, _ = r["where"]
            want = reference[key][batch_rank * micro : (batch_rank + 1) * micro]
            e = rel(r[key], want)
            assert e < TOL, f"{name}: {key} of rank {r['where']} on {r['device']}, relative error {e:.2e}"
