"""Property tests for `surgery.lowrank`: exactness, monotonicity, identities, rank rules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surgery.lowrank import (
    LayerSpectrum,
    allocate_budget,
    asvd_factors,
    break_even_rank,
    dense_flops,
    dense_params,
    layer_cost,
    lowrank_flops,
    lowrank_params,
    pick_rank_below_cliff,
    rank_for_energy,
    rank_from_fraction,
    round_rank,
    svd_factors,
    svd_llm_factors,
    tucker2_factors,
)
from surgery.modules.lowrank_linear import LowRankLinear

FAST = settings(max_examples=25, deadline=None)
dims = st.integers(min_value=1, max_value=12)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def randn(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def rand(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# decompositions


@FAST
@given(out_f=dims, in_f=dims, seed=seeds)
def test_full_rank_is_exact(out_f: int, in_f: int, seed: int) -> None:
    W = randn(out_f, in_f, seed=seed)
    full = min(out_f, in_f)
    X = randn(3 * in_f + 1, in_f, seed=seed + 1)
    for f in (
        svd_factors(W, full),
        asvd_factors(W, rand(in_f, seed=seed + 2) + 0.1, full),
        svd_llm_factors(W, X.T @ X, full),
    ):
        assert f.left.shape == (out_f, full) and f.right.shape == (full, in_f)
        assert f.left.dtype == W.dtype
        torch.testing.assert_close(f.left @ f.right, W, rtol=1e-9, atol=1e-9)
        assert f.energy == pytest.approx(1.0)


@FAST
@given(out_f=dims, in_f=dims, seed=seeds)
def test_svd_error_non_increasing_in_rank(out_f: int, in_f: int, seed: int) -> None:
    W = randn(out_f, in_f, seed=seed)
    s = rand(in_f, seed=seed + 1) + 0.1
    X = randn(2 * in_f + 1, in_f, seed=seed + 2)
    errs: dict[str, list[float]] = {"svd": [], "asvd": [], "svd_llm": []}
    energies = []
    for r in range(1, min(out_f, in_f) + 1):
        f = svd_factors(W, r)
        energies.append(f.energy)
        errs["svd"].append(float((W - f.left @ f.right).norm()))
        # data-aware methods are monotone in their own (weighted) error
        a = asvd_factors(W, s, r)
        errs["asvd"].append(float(((W - a.left @ a.right) * s.sqrt()).norm()))
        b = svd_llm_factors(W, X.T @ X, r)
        errs["svd_llm"].append(float(((W - b.left @ b.right) @ X.T).norm()))
    for name, e in errs.items():
        assert all(x >= y - 1e-9 for x, y in itertools.pairwise(e)), name
    assert all(x <= y + 1e-12 for x, y in itertools.pairwise(energies))


@FAST
@given(out_f=dims, in_f=dims, seed=seeds, data=st.data())
def test_svd_error_equals_dropped_singular_values(
    out_f: int, in_f: int, seed: int, data: st.DataObject
) -> None:
    W = randn(out_f, in_f, seed=seed)
    r = data.draw(st.integers(1, min(out_f, in_f)))
    f = svd_factors(W, r)
    err = (W - f.left @ f.right).square().sum()
    torch.testing.assert_close(err, f.singular_values[r:].square().sum(), rtol=1e-8, atol=1e-10)
    assert f.singular_values.dtype == torch.float64
    assert bool((f.singular_values[:-1] >= f.singular_values[1:]).all())


@FAST
@given(out_f=dims, in_f=dims, seed=seeds, data=st.data())
def test_asvd_with_unit_scales_is_svd(
    out_f: int, in_f: int, seed: int, data: st.DataObject
) -> None:
    W = randn(out_f, in_f, seed=seed)
    r = data.draw(st.integers(1, min(out_f, in_f)))
    alpha = data.draw(st.sampled_from([0.5, 1.0, 0.25]))
    a = asvd_factors(W, torch.ones(in_f, dtype=torch.float64), r, alpha=alpha)
    b = svd_factors(W, r)
    assert torch.equal(a.left, b.left) and torch.equal(a.right, b.right)
    assert torch.equal(a.singular_values, b.singular_values) and a.energy == b.energy


def test_asvd_clamps_dead_channels() -> None:
    W = randn(6, 5, seed=0)
    act = torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0], dtype=torch.float64)
    f = asvd_factors(W, act, rank=5)
    assert torch.isfinite(f.right).all()
    torch.testing.assert_close(f.left @ f.right, W, rtol=1e-6, atol=1e-6)


@FAST
@given(out_f=dims, in_f=dims, extra=st.integers(1, 20), seed=seeds, data=st.data())
def test_svd_llm_error_identity(
    out_f: int, in_f: int, extra: int, seed: int, data: st.DataObject
) -> None:
    W = randn(out_f, in_f, seed=seed)
    X = randn(in_f + extra, in_f, seed=seed + 1)  # more rows than features: XᵀX is PD
    r = data.draw(st.integers(1, min(out_f, in_f)))
    f = svd_llm_factors(W, X.T @ X, r)
    err = ((W - f.left @ f.right) @ X.T).square().sum()
    expected = f.singular_values[r:].square().sum()
    torch.testing.assert_close(
        err, expected, rtol=1e-7, atol=1e-9 * float(W.norm() * X.norm()) ** 2
    )


@FAST
@given(out_f=dims, in_f=st.integers(2, 12), seed=seeds, data=st.data())
def test_svd_llm_rank_deficient_calibration_runs(
    out_f: int, in_f: int, seed: int, data: st.DataObject
) -> None:
    rows = data.draw(st.integers(1, in_f - 1))  # fewer rows than features: XᵀX singular
    W = randn(out_f, in_f, seed=seed)
    X = randn(rows, in_f, seed=seed + 1)
    r = data.draw(st.integers(1, min(out_f, in_f)))
    f = svd_llm_factors(W, X.T @ X, r)
    assert torch.isfinite(f.left).all() and torch.isfinite(f.right).all()
    assert torch.isfinite(f.singular_values).all()


def test_svd_llm_zero_channel_needs_jitter() -> None:
    W = randn(4, 3, seed=1)
    X = randn(10, 3, seed=2)
    X[:, 1] = 0.0  # a dead input channel
    f = svd_llm_factors(W, X.T @ X, 3)
    assert torch.isfinite(f.right).all()
    # on the calibration rows full rank still reproduces the outputs
    torch.testing.assert_close((f.left @ f.right) @ X.T, W @ X.T, rtol=1e-5, atol=1e-5)


def test_svd_llm_beats_svd_on_calibration_error() -> None:
    W = randn(16, 12, seed=3)
    X = randn(64, 12, seed=4) * torch.linspace(0.1, 5.0, 12, dtype=torch.float64)
    a, b = svd_factors(W, 4), svd_llm_factors(W, X.T @ X, 4)
    err_a = ((W - a.left @ a.right) @ X.T).norm()
    err_b = ((W - b.left @ b.right) @ X.T).norm()
    assert err_b <= err_a


def test_factor_dtype_follows_input() -> None:
    W = randn(5, 4, seed=5).float()
    f = svd_factors(W, 2)
    assert f.left.dtype == torch.float32 and f.right.dtype == torch.float32
    assert f.singular_values.dtype == torch.float64


@pytest.mark.parametrize("rank", [0, 5])
def test_bad_rank_rejected(rank: int) -> None:
    with pytest.raises(ValueError, match="rank must be in"):
        svd_factors(randn(4, 6, seed=0), rank)


@FAST
@given(
    S=st.integers(1, 6),
    C=st.integers(1, 6),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    seed=seeds,
)
def test_tucker2_full_ranks_exact(S: int, C: int, kh: int, kw: int, seed: int) -> None:
    w = randn(S, C, kh, kw, seed=seed)
    first, core, last = tucker2_factors(w, rank_out=S, rank_in=C)
    assert first.shape == (C, C, 1, 1) and core.shape == (S, C, kh, kw)
    assert last.shape == (S, S, 1, 1)
    rebuilt = torch.einsum("oikl,so,ic->sckl", core, last[:, :, 0, 0], first[:, :, 0, 0])
    torch.testing.assert_close(rebuilt, w, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# rank rules


def test_rank_from_fraction() -> None:
    assert rank_from_fraction(768, 3072, 0.25) == 192
    assert rank_from_fraction(10, 20, 0.25) == 3  # 2.5 rounds half up
    assert rank_from_fraction(10, 20, 1.0) == 10
    assert rank_from_fraction(10, 20, 1e-9) == 1
    with pytest.raises(ValueError):
        rank_from_fraction(10, 20, 0.0)


@FAST
@given(n=st.integers(1, 30), seed=seeds)
def test_rank_for_energy_edges(n: int, seed: int) -> None:
    sv = (rand(n, seed=seed) * 9.9 + 0.1).sort(descending=True).values  # well conditioned
    assert rank_for_energy(sv, 1.0) == n
    assert rank_for_energy(sv, 1e-12) == 1
    sq = sv.square()
    for e in (0.3, 0.5, 0.9, 0.99):
        r = rank_for_energy(sv, e)
        assert float(sq[:r].sum() / sq.sum()) >= e
        assert r == 1 or float(sq[: r - 1].sum() / sq.sum()) < e


def test_rank_for_energy_zero_spectrum_and_exact_threshold() -> None:
    assert rank_for_energy(torch.zeros(5), 0.9) == 1
    sv = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert rank_for_energy(sv, 0.5) == 2  # ≥, not >


@given(in_f=st.integers(1, 3000), out_f=st.integers(1, 3000))
def test_break_even_formula(in_f: int, out_f: int) -> None:
    r = break_even_rank(in_f, out_f)
    assert r >= 0
    if r > 0:
        assert lowrank_params(in_f, out_f, r, bias=False) < dense_params(in_f, out_f, bias=False)
    assert lowrank_params(in_f, out_f, r + 1, bias=False) >= dense_params(in_f, out_f, bias=False)
    assert r == math.ceil(in_f * out_f / (in_f + out_f)) - 1


@given(r=st.integers(-3, 600), multiple=st.integers(1, 128), max_rank=st.integers(1, 600))
def test_round_rank_properties(r: int, multiple: int, max_rank: int) -> None:
    out = round_rank(r, multiple, max_rank=max_rank)
    assert 1 <= out <= max_rank
    if max_rank >= multiple:
        assert out % multiple == 0
        cap = max_rank // multiple * multiple
        if multiple <= r <= cap:
            assert abs(out - r) <= multiple / 2  # nearest


def test_round_rank_examples() -> None:
    assert round_rank(100, 64, max_rank=1000) == 128
    assert round_rank(96, 64, max_rank=1000) == 64  # tie goes down
    assert round_rank(20, 64, max_rank=1000) == 64  # at least one multiple
    assert round_rank(300, 64, max_rank=255) == 192  # never above the cap
    assert round_rank(5, 16, max_rank=9) == 5  # no multiple fits: unrounded
    assert round_rank(0, 1, max_rank=9) == 1  # never 0


# ---------------------------------------------------------------------------------------------
# costs


@pytest.mark.parametrize(("in_f", "out_f", "r", "bias"), [(16, 32, 4, True), (7, 3, 2, False)])
def test_lowrank_params_matches_module(in_f: int, out_f: int, r: int, bias: bool) -> None:
    m = LowRankLinear(in_f, out_f, r, bias=bias)
    assert sum(p.numel() for p in m.parameters()) == lowrank_params(in_f, out_f, r, bias)
    dense = torch.nn.Linear(in_f, out_f, bias=bias)
    assert sum(p.numel() for p in dense.parameters()) == dense_params(in_f, out_f, bias)


def test_flops_formulas() -> None:
    assert dense_flops(10, 16, 32) == 2 * 10 * 16 * 32
    assert lowrank_flops(10, 16, 32, 4) == 2 * 10 * 4 * (16 + 32)


# ---------------------------------------------------------------------------------------------
# global budget


def decaying(n: int, rate: float) -> torch.Tensor:
    return torch.tensor([math.exp(-rate * i) for i in range(n)], dtype=torch.float64)


def kept_energy(layer: LayerSpectrum, r: int) -> float:
    sq = layer.singular_values.square()
    return float(sq[:r].sum() / sq.sum())


layer_shapes = st.tuples(st.integers(2, 24), st.integers(2, 24), st.integers(1, 4))


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(layer_shapes, min_size=1, max_size=5),
    rates=st.lists(st.floats(0.0, 2.0), min_size=5, max_size=5),
    fraction=st.floats(0.05, 1.2),
    kind=st.sampled_from(["params", "flops"]),
    multiple=st.sampled_from([1, 2, 4]),
)
def test_allocate_budget_meets_budget_within_one_step(
    shapes: list[tuple[int, int, int]],
    rates: list[float],
    fraction: float,
    kind: str,
    multiple: int,
) -> None:
    layers = [
        LayerSpectrum(f"l{i}", i_f, o_f, tok, decaying(min(i_f, o_f), rates[i]))
        for i, (i_f, o_f, tok) in enumerate(shapes)
    ]
    dense_total = sum(layer_cost(L, min(L.in_f, L.out_f), kind) for L in layers)  # type: ignore[arg-type]
    budget = fraction * dense_total
    try:
        ranks = allocate_budget(layers, fraction, kind, multiple=multiple)  # type: ignore[arg-type]
    except ValueError as e:
        assert "infeasible" in str(e)
        return
    total = sum(layer_cost(L, ranks[L.name], kind) for L in layers)  # type: ignore[arg-type]
    assert total <= budget + 1e-9
    for L in layers:
        full, be = min(L.in_f, L.out_f), break_even_rank(L.in_f, L.out_f)
        r = ranks[L.name]
        assert 1 <= r <= full
        if r < full:
            assert r <= be  # every decomposed layer compresses
            step = multiple if be >= multiple else 1
            assert r % step == 0
            # within one rank step: the next move of this layer would not have fitted
            nxt = full if r + step > be else r + step
            extra = layer_cost(L, nxt, kind) - layer_cost(L, r, kind)  # type: ignore[arg-type]
            assert total + extra > budget
    if fraction >= 1.0:
        assert all(ranks[L.name] == min(L.in_f, L.out_f) for L in layers)


@settings(max_examples=30, deadline=None)
@given(
    rates=st.lists(st.floats(0.0, 3.0), min_size=2, max_size=5),
    fraction=st.floats(0.1, 0.9),
    kind=st.sampled_from(["params", "flops"]),
)
def test_allocate_budget_beats_uniform_same_shapes(
    rates: list[float], fraction: float, kind: str
) -> None:
    # equal shapes, concave gains: greedy is optimal, so it is never worse than uniform
    layers = [LayerSpectrum(f"l{i}", 32, 24, 3, decaying(24, a)) for i, a in enumerate(rates)]
    be = break_even_rank(32, 24)
    uniform = max(1, min(be, math.floor(fraction * len(layers) * 32 * 24 / (len(layers) * 56))))
    if uniform * 56 > fraction * 32 * 24:
        return  # not even rank 1 fits
    ranks = allocate_budget(layers, fraction, kind)  # type: ignore[arg-type]
    greedy = sum(kept_energy(L, ranks[L.name]) for L in layers)
    uni = sum(kept_energy(L, uniform) for L in layers)
    assert greedy >= uni - 1e-9


def test_allocate_budget_beats_uniform_different_spectra() -> None:
    layers = [
        LayerSpectrum("fast", 64, 64, 8, decaying(64, 0.5)),
        LayerSpectrum("slow", 64, 64, 8, decaying(64, 0.02)),
        LayerSpectrum("wide", 32, 128, 8, decaying(32, 0.1)),
    ]
    for kind in ("params", "flops"):
        ranks = allocate_budget(layers, 0.3, kind)  # type: ignore[arg-type]
        total = sum(layer_cost(L, ranks[L.name], kind) for L in layers)  # type: ignore[arg-type]
        dense = sum(layer_cost(L, 64 if L.in_f == 64 else 32, kind) for L in layers)  # type: ignore[arg-type]
        assert total <= 0.3 * dense
        # uniform: the same fraction of full rank everywhere, as large as the budget allows
        best_uniform = 0.0
        for k in range(1, 101):
            ur = {L.name: max(1, round(k / 100 * min(L.in_f, L.out_f))) for L in layers}
            cost = sum(layer_cost(L, ur[L.name], kind) for L in layers)  # type: ignore[arg-type]
            if cost <= 0.3 * dense:
                best_uniform = max(best_uniform, sum(kept_energy(L, ur[L.name]) for L in layers))
        greedy = sum(kept_energy(L, ranks[L.name]) for L in layers)
        assert greedy > best_uniform + 0.05
        assert ranks["slow"] > ranks["fast"]


def test_allocate_budget_multiple_and_dense_fallback() -> None:
    tiny = LayerSpectrum("tiny", 2, 2, 1, torch.ones(2))  # break-even 0: stays dense
    big = LayerSpectrum("big", 256, 256, 1, decaying(256, 0.01))
    ranks = allocate_budget([tiny, big], 0.5, "params", multiple=16)
    assert ranks["tiny"] == 2
    assert ranks["big"] % 16 == 0 and ranks["big"] <= break_even_rank(256, 256)
    with pytest.raises(ValueError, match="infeasible"):
        allocate_budget([tiny, big], 0.01, "params", multiple=16)


# ---------------------------------------------------------------------------------------------
# hardware-aware rank choice


def test_cliff_at_256() -> None:
    # one tile more (257) is 15% slower than 256; otherwise latency grows slowly with rank
    lat = {r: 1.0 + 0.001 * r + (0.15 if r > 256 else 0.0) for r in range(1, 301)}
    assert pick_rank_below_cliff(lat, 2.0, requested=300, step=1) == 256
    assert pick_rank_below_cliff(lat, 2.0, requested=257, step=1) == 256
    # the cliff is below the requested range: nothing to gain, keep the requested rank
    assert pick_rank_below_cliff(lat, 2.0, requested=256, step=1) == 256


def test_cliff_staircase_with_step() -> None:
    lat = {r: 0.125 * math.ceil(r / 64) for r in range(8, 400, 8)}
    assert pick_rank_below_cliff(lat, 1.0, requested=320, step=8) == 256
    assert pick_rank_below_cliff(lat, 1.0, requested=256, step=8) == 192  # ties → higher rank


@pytest.mark.parametrize("slope", [0.0, 0.001, 0.01])
def test_monotone_tables_keep_requested(slope: float) -> None:
    lat = {r: 0.5 + slope * r for r in range(1, 129)}
    assert pick_rank_below_cliff(lat, 10.0, requested=128, step=1) == 128
    assert pick_rank_below_cliff(lat, 10.0, requested=128, step=16) == 128


def test_none_faster_than_dense() -> None:
    lat = {r: 1.0 + 0.01 * r for r in range(1, 65)}
    assert pick_rank_below_cliff(lat, dense_latency=1.0, requested=64, step=1) is None


def test_cliff_pick_slower_than_dense_falls_back() -> None:
    # the largest cliff is at 96→64, but 64 is still slower than dense; 32 is faster
    lat = {128: 2.0, 96: 1.95, 64: 1.2, 32: 0.9}
    assert pick_rank_below_cliff(lat, 1.0, requested=128, step=32) == 32
    # requested alone faster than dense while lower ranks are not (non-monotone table)
    lat2 = {64: 0.5, 32: 2.0, 16: 1.9}
    assert pick_rank_below_cliff(lat2, 1.0, requested=64, step=16) == 64


def test_missing_candidates_raise() -> None:
    with pytest.raises(ValueError, match="none of the candidate ranks"):
        pick_rank_below_cliff({3: 1.0}, 1.0, requested=8, step=4)
