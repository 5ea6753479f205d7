"""`keep if faster` on Tucker-2 convolutions: pure choice on fake tables, the cache, the pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from surgery.backends import get_backend
from surgery.backends import latency as lat
from surgery.backends.latency import (
    BackendTimer,
    LatencyTable,
    latency_table,
    load_table,
    save_table,
)
from surgery.graph import analyze
from surgery.inputs import Inputs
from surgery.manager import Manager
from surgery.modules.tucker_conv import TuckerConv2d
from surgery.parse import parse
from surgery.passes.base import PassContext, PassError
from surgery.passes.decompose import DecomposePass
from surgery.passes.rank_latency import (
    choose_tucker_ranks,
    conv_geometry,
    conv_layer,
    factored,
    keep_if_faster_tucker_ranks,
    pair_key,
    tucker_candidate_pairs,
    tucker_speedups,
)
from surgery.timing import LayerTimes


class TinyCNN(nn.Module):
    """Two 3×3 convs wide enough that Tucker-2 at half the channels saves weights and FLOPs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(16, 32, 3, padding=1)
        self.act = nn.ReLU()
        self.c2 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.example_inputs = (
            torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 16, 8, 8) -> (B, 32, 4, 4)
        return self.c2(self.act(self.c1(x)))


def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()


def _table(dense: float, ranks: dict[tuple[int, int], float]) -> LayerTimes:
    return LayerTimes("fake", dense, {pair_key(p): t for p, t in ranks.items()})


def _timer(**kw: object) -> BackendTimer:
    return BackendTimer(get_backend("torch", "cpu"), **kw)  # type: ignore[arg-type]


# --- pure selection -------------------------------------------------------------------------


def test_candidate_pairs_scale_both_ranks_by_tile_steps_of_the_larger() -> None:
    assert tucker_candidate_pairs((64, 32), 8) == [(64, 32), (56, 28), (48, 24), (40, 20), (32, 16)]
    assert tucker_candidate_pairs((12, 24), 8) == [(12, 24), (8, 16)]  # r_in leads
    assert tucker_candidate_pairs((30, 30), 16) == [(16, 16)]  # rounded down to the tile
    assert tucker_candidate_pairs((3, 5), 8) == [(3, 5)]  # below one tile


def test_picks_the_pair_just_below_the_cliff() -> None:
    # Tile 8 on r_out; pairs above 40×20 pay an extra tile (+30%): the cliff is 48 → 40.
    pairs = tucker_candidate_pairs((64, 32), 8)
    ranks = {p: 1.0 + 0.01 * p[0] + (0.3 if p[0] > 40 else 0.0) for p in pairs}
    assert choose_tucker_ranks(_table(5.0, ranks), (64, 32), 8) == (40, 20)


def test_no_cliff_keeps_the_requested_pair() -> None:
    ranks = {p: 0.01 * p[0] for p in tucker_candidate_pairs((64, 32), 8)}
    assert choose_tucker_ranks(_table(5.0, ranks), (64, 32), 8) == (64, 32)


def test_none_faster_than_dense_stays_dense() -> None:
    ranks = {p: 1.0 for p in tucker_candidate_pairs((32, 16), 8)}
    assert choose_tucker_ranks(_table(0.5, ranks), (32, 16), 8) is None


def test_only_pairs_on_the_requested_ratio_count() -> None:
    # A table shared with another layer of the same shape holds other pairs: they are ignored.
    ranks = {(32, 16): 1.0, (24, 12): 0.9, (16, 16): 0.01, (16, 8): 0.8}
    assert choose_tucker_ranks(_table(2.0, ranks), (32, 16), 8) == (32, 16)
    with pytest.raises(ValueError, match="none of the candidate ranks"):
        choose_tucker_ranks(_table(2.0, {(8, 8): 1.0}), (32, 16), 8)


# --- cache ----------------------------------------------------------------------------------


def _conv_table(conv: nn.Conv2d, dense: float, variants: dict[str, float]) -> LatencyTable:
    return LatencyTable(
        "fake",
        conv_layer(conv),
        conv_geometry(conv),
        (1, 32, 8, 8),
        "float32",
        "t",
        dense,
        variants,
    )


def test_conv_table_json_round_trip_and_keys(tmp_path: Path) -> None:
    conv = nn.Conv2d(32, 32, 3, padding=1)
    t = _conv_table(conv, 2.0, {"32x16": 1.0, "24x12": 0.9})
    path = save_table(t, tmp_path)
    assert path.name == f"{t.key()}.json" and load_table(t.key(), tmp_path) == t
    same = _conv_table(nn.Conv2d(32, 32, 3, padding="same"), 1.0, {})
    save_table(same, tmp_path)
    assert load_table(same.key(), tmp_path) == same and same.key() != t.key()
    # A matrix table of the "same" numbers never shares a key (hence a file) with a conv one.
    geometry = {"in_features": 32, "out_features": 32, "bias": True}
    linear = LatencyTable("fake", "Linear", geometry, (1, 32, 8, 8), "float32", "t", dense=2.0)
    assert linear.key() != t.key()
    path.write_text("{not json")
    assert load_table(t.key(), tmp_path) is None


def test_conv_geometry_rebuilds_the_conv() -> None:
    conv = nn.Conv2d(16, 32, (3, 5), stride=2, padding=(1, 2), dilation=1, bias=False)
    again = nn.Conv2d(**conv_geometry(conv))
    assert conv_geometry(again) == conv_geometry(conv)
    assert again.weight.shape == conv.weight.shape and again.bias is None


def test_conv_latency_table_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conv = nn.Conv2d(16, 32, 3, padding=1)
    backend = get_backend("torch", "cpu")

    def table(shape: tuple[int, ...], pairs: list[tuple[int, int]], **kw: object) -> LatencyTable:
        return latency_table(
            backend, conv_layer(conv), conv_geometry(conv), shape, torch.float32,
            lambda: nn.Conv2d(**conv_geometry(conv)),
            {pair_key(p): (lambda p=p: factored(conv, p)) for p in pairs},
            directory=tmp_path, **kw,  # type: ignore[arg-type]
        )  # fmt: skip

    first = table((1, 16, 8, 8), [(16, 8), (8, 4)], repeats=2, warmup=1)
    assert set(first.variants) == {"16x8", "8x4"} and first.dense > 0 and first.repeats == 2

    def boom(*args: object, **kwargs: object) -> LatencyTable:
        raise AssertionError("measured again although cached")

    monkeypatch.setattr(lat, "measure", boom)
    assert table((1, 16, 8, 8), [(8, 4)]) == first
    with pytest.raises(AssertionError, match="measured again"):  # another input shape
        table((2, 16, 8, 8), [(8, 4)])


def test_rejects_layers_it_cannot_time() -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.Linear(72, 4))
    analysis = analyze(model, Inputs((torch.randn(1, 8, 5, 5),), {}))
    timer = _timer()
    with pytest.raises(ValueError, match="ungrouped Conv2d"):
        keep_if_faster_tucker_ranks({"0": model[0]}, analysis, {"0": (4, 4)}, timer)
    with pytest.raises(ValueError, match="ungrouped Conv2d"):
        keep_if_faster_tucker_ranks({"2": model[2]}, analysis, {"2": (4, 4)}, timer)
    with pytest.raises(ValueError, match="not a module"):
        keep_if_faster_tucker_ranks({"x": model[0]}, analysis, {"x": (4, 4)}, timer)


# --- through the decompose pass -------------------------------------------------------------


def _fake_measure(calls: list[tuple[int, tuple[int, ...], list[tuple[int, int]]]]):  # type: ignore[no-untyped-def]
    """c1 (16→32): a cliff below 16×8 on its 24×12, 16×8, 8×4 ladder; c2: never faster."""

    def fake(backend, layer, geometry, shape, dtype, dense, variants, **kw):  # type: ignore[no-untyped-def]
        pairs = [tuple(int(r) for r in k.split("x")) for k in variants]
        calls.append((geometry["in_channels"], shape, pairs))
        if geometry["in_channels"] == 16:
            ranks = {p: 0.1 * p[0] + (1.0 if p[0] > 16 else 0.0) for p in pairs}
            dense_s = 10.0
        else:
            ranks, dense_s = {p: 1.0 for p in pairs}, 0.1
        return LatencyTable(
            backend.name, layer, dict(geometry), shape, "float32", torch.__version__, dense_s,
            {pair_key(p): t for p, t in ranks.items()},  # type: ignore[arg-type]
            threads=torch.get_num_threads(),
        )  # fmt: skip

    return fake


Calls = list[tuple[int, tuple[int, ...], list[tuple[int, int]]]]


def _faked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Calls, TinyCNN, PassContext]:
    """The tiny CNN and its pass context, conv timing faked by :func:`_fake_measure` (its
    calls recorded) and the latency cache in ``tmp_path``."""
    monkeypatch.setenv("SURGERY_CACHE_DIR", str(tmp_path / "cache"))
    calls: Calls = []
    monkeypatch.setattr(lat, "measure", _fake_measure(calls))
    model = tiny_cnn()
    ex = Inputs(model.example_inputs, {})
    return calls, model, PassContext(analysis=analyze(model, ex), example=ex, timer=_timer())


def test_keep_if_faster_on_a_fake_table_through_the_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, model, ctx = _faked(tmp_path, monkeypatch)
    ex = ctx.example
    stmt = parse("decompose Conv2d where kernel > 1 rank = 24 keep if faster").statements[0]
    p = DecomposePass(stmt, ctx)
    plan = p.plan(model)
    rows = {r.path: r for r in plan.rows}
    # Each conv timed alone at its real input shape; pairs down from 24×16 by 8 on r_out.
    assert (16, (1, 16, 8, 8), [(24, 16), (16, 11)]) in calls
    assert (32, (1, 32, 8, 8), [(24, 24), (16, 16)]) in calls
    c1, c2 = rows["c1"], rows["c2"]
    assert c1.action == "decompose" and c1.detail["measured_on"] == "torch-cpu"
    assert c1.detail["rank"] == "16×11" and c1.detail["requested_rank"] == "24×16"
    assert c1.params_after < c1.params_before and 0.0 < c1.detail["energy"] <= 1.0
    assert c2.action == "skip" and c2.detail["measured_on"] == "torch-cpu"
    assert c2.note == "no rank ≤ 24×24 is faster than dense on torch-cpu"
    p.apply(model, plan)
    assert isinstance(model.c1, TuckerConv2d) and (model.c1.rank_out, model.c1.rank_in) == (16, 11)
    assert isinstance(model.c2, nn.Conv2d)
    # The tables were cached: a second plan measures nothing.
    again: Calls = []
    monkeypatch.setattr(lat, "measure", _fake_measure(again))
    fresh = tiny_cnn()
    ctx = PassContext(analysis=analyze(fresh, ex), example=ex, timer=_timer())
    DecomposePass(stmt, ctx).plan(fresh)
    assert again == []


def test_keep_if_faster_times_convs_for_real(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SURGERY_CACHE_DIR", str(tmp_path / "cache"))
    recipe = "decompose Conv2d where kernel > 1 rank = 0.5 method tucker keep if faster"
    run = Manager(parse(recipe), tiny_cnn()).run(measure=False)
    rows = {r.path: r for r in run.steps[0].plan.rows}
    assert set(rows) == {"c1", "c2"}
    for path, requested in (("c1", (16, 8)), ("c2", (16, 16))):
        row = rows[path]
        assert row.detail["measured_on"] == "torch-cpu"
        layer = run.model.get_submodule(path)
        if row.action == "skip":  # timings are not asserted: dense may win on this machine
            assert (
                row.note
                == f"no rank ≤ {requested[0]}×{requested[1]} is faster than dense on torch-cpu"
            )
            assert isinstance(layer, nn.Conv2d)
        else:
            assert isinstance(layer, TuckerConv2d)
            assert (layer.rank_out, layer.rank_in) in tucker_candidate_pairs(requested, 8)
            assert row.detail["rank"] == f"{layer.rank_out}×{layer.rank_in}"
            assert row.detail.get("requested_rank", row.detail["rank"]) == "{}×{}".format(
                *requested
            )
    assert len(list((tmp_path / "cache" / "latency").glob("*.json"))) == 2


def test_an_unavailable_target_is_a_located_error(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_cnn()
    ex = Inputs(model.example_inputs, {})
    stmt = parse("decompose Conv2d rank = 0.5 keep if faster").statements[0]
    ctx = PassContext(analysis=analyze(model, ex), example=ex, timer=_timer())
    backend = get_backend("torch", "cpu")
    monkeypatch.setattr(type(backend), "is_available", lambda self: (False, "switched off"))
    with pytest.raises(PassError) as err:
        DecomposePass(stmt, ctx).plan(model)
    assert "cannot time `c1` on torch-cpu" in err.value.diagnostic.message


def test_a_pass_without_a_timer_is_a_located_error() -> None:
    model = tiny_cnn()
    ex = Inputs(model.example_inputs, {})
    stmt = parse("decompose Conv2d rank = 0.5 keep if faster").statements[0]
    with pytest.raises(PassError) as err:
        DecomposePass(stmt, PassContext(analysis=analyze(model, ex), example=ex)).plan(model)
    assert "this pass has no timer" in err.value.diagnostic.message
    assert err.value.diagnostic.span is not None


# --- `where speedup > X` on k×k convs -------------------------------------------------------


def test_where_speedup_selects_convs_by_their_tucker_speedup_on_a_fake_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, model, ctx = _faked(tmp_path, monkeypatch)
    # c1: dense 10 s, its 24×16 pair 3.4 s → 2.94×; c2: dense 0.1 s, every pair 1 s → 0.1×.
    stmt = parse("decompose Conv2d where speedup > 2 rank = 24").statements[0]
    plan = DecomposePass(stmt, ctx).plan(model)
    # Only the requested pair (its larger rank on the tile) is timed, at the real input shape.
    assert sorted(calls) == [(16, (1, 16, 8, 8), [(24, 16)]), (32, (1, 32, 8, 8), [(24, 24)])]
    assert [(r.path, r.action, r.detail["rank"]) for r in plan.rows] == [
        ("c1", "decompose", "24×16")
    ]
    stmt = parse("decompose Conv2d where speedup > 3 rank = 24").statements[0]
    assert DecomposePass(stmt, ctx).plan(model).rows == []
    # `method svd` cannot factor a 3×3 conv, so there is no Tucker speedup to match.
    stmt = parse("decompose Conv2d where speedup > 0 rank = 24 method svd").statements[0]
    assert DecomposePass(stmt, ctx).plan(model).rows == []


def test_where_speedup_times_convs_for_real(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SURGERY_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_cnn()
    ex = Inputs(model.example_inputs, {})
    measured = tucker_speedups({"c1": model.c1}, analyze(model, ex), {"c1": (16, 8)}, _timer())
    low, high = measured["c1"] * 0.5, measured["c1"] * 2
    # The cached table decides the selector: below the measured speedup c1 matches.
    run = Manager(
        parse(f'decompose Conv2d where name ~ "c1" and speedup > {low:.4f} rank = 0.5'), model
    ).run(measure=False)
    assert [c.path for c in run.changes] == ["c1"]
    assert isinstance(run.model.c1, TuckerConv2d)
    run = Manager(
        parse(f'decompose Conv2d where name ~ "c1" and speedup > {high:.4f} rank = 0.5'), model
    ).run(measure=False)
    assert not run.changes
    assert any(w.code == "S0301" for w in run.warnings)


# --- 1×1 convs: timed as the two 1×1 convs of their low-rank pair ---------------------------


class Pointwise(nn.Module):
    """One 1×1 conv (32→64), decomposed by SVD into a LowRankConv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(32, 64, 1)
        self.example_inputs = (
            torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(0)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x)


def test_keep_if_faster_on_a_1x1_conv_times_its_low_rank_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from surgery.modules import LowRankConv2d

    monkeypatch.setenv("SURGERY_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[tuple[tuple[int, ...], list[tuple[int, int]]]] = []

    def fake(backend, layer, geometry, shape, dtype, dense, variants, **kw):  # type: ignore[no-untyped-def]
        pairs = [tuple(int(r) for r in k.split("x")) for k in variants]
        calls.append((shape, pairs))
        # The real measurement builds the pair the pass would build.
        assert layer == "LowRankConv2d"
        assert all(isinstance(build(), LowRankConv2d) for build in variants.values())
        return LatencyTable(
            backend.name, layer, dict(geometry), shape, "float32", torch.__version__, 10.0,
            {pair_key(p): 0.1 * p[0] + (1.0 if p[0] > 8 else 0.0) for p in pairs},  # type: ignore[arg-type]
            threads=torch.get_num_threads(),
        )  # fmt: skip

    monkeypatch.setattr(lat, "measure", fake)
    torch.manual_seed(0)
    model = Pointwise()
    # Break-even rank 21: ask for 16, the cliff is between 16 and 8.
    run = Manager(parse("decompose Conv2d rank = 16 keep if faster"), model).run(measure=False)
    assert calls == [((1, 32, 8, 8), [(16, 16), (8, 8)])]
    (row,) = run.steps[0].plan.rows
    assert row.detail["rank"] == 8 and row.detail["requested_rank"] == 16
    assert row.detail["measured_on"] == "torch-cpu"
    assert isinstance(run.model.c, LowRankConv2d) and run.model.c.rank == 8


def test_where_speedup_times_a_1x1_conv_for_real(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from surgery.modules import LowRankConv2d

    monkeypatch.setenv("SURGERY_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = Pointwise()
    ex = Inputs(model.example_inputs, {})
    measured = tucker_speedups({"c": model.c}, analyze(model, ex), {"c": (8, 8)}, _timer())
    tables = list((tmp_path / "cache" / "latency").glob("*.json"))
    assert len(tables) == 1 and '"layer": "LowRankConv2d"' in tables[0].read_text()
    low, high = measured["c"] * 0.5, measured["c"] * 2
    run = Manager(parse(f"decompose Conv2d where speedup > {low:.4f} rank = 8"), model).run(
        measure=False
    )
    assert isinstance(run.model.c, LowRankConv2d) and run.model.c.rank == 8
    run = Manager(parse(f"decompose Conv2d where speedup > {high:.4f} rank = 8"), model).run(
        measure=False
    )
    assert not run.changes


def test_conv_table_keys_differ_by_factored_layer() -> None:
    conv = nn.Conv2d(32, 32, 1)
    tucker = _conv_table(conv, 1.0, {"8x8": 0.5})
    pointwise = _conv_table(conv, 1.0, {"8x8": 0.5})
    tucker.layer = "TuckerConv2d"
    assert conv_layer(conv) == pointwise.layer == "LowRankConv2d"
    assert tucker.key() != pointwise.key()
    assert LatencyTable.from_json(pointwise.to_json()) == pointwise
