"""Hardware-aware rank choice: pure selection on fake tables, the disk cache, the pass hook."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgery.backends import get_backend
from surgery.backends import latency as lat
from surgery.backends.latency import (
    LatencyTable,
    candidate_ranks,
    choose_rank,
    keep_if_faster_ranks,
    latency_table,
    layer_speedups,
    load_table,
    save_table,
    tile_for,
)
from surgery.graph import analyze
from surgery.inputs import Inputs
from tests.helpers_models import wide_mlp


def _table(dense: float, ranks: dict[int, float], shape: tuple[int, ...] = (8, 64)) -> LatencyTable:
    return LatencyTable("fake", "Linear", 64, 128, shape, "float32", "t", dense=dense, ranks=ranks)


# --- pure selection -------------------------------------------------------------------------


def test_picks_rank_just_below_the_cliff() -> None:
    # Tile 8; ranks above 48 pay an extra tile (+30%): the cliff is between 56 and 48.
    ranks = {r: 1.0 + 0.01 * r + (0.3 if r > 48 else 0.0) for r in range(8, 65, 8)}
    assert choose_rank(_table(5.0, ranks), requested=64, step=8) == 48


def test_no_cliff_keeps_the_requested_rank() -> None:
    ranks = {r: 0.01 * r for r in range(8, 65, 8)}  # latency linear in rank
    assert choose_rank(_table(5.0, ranks), requested=64, step=8) == 64


def test_slower_than_dense_stays_dense() -> None:
    assert choose_rank(_table(0.5, {64: 1.0, 56: 0.9, 48: 0.8}), requested=64, step=8) is None


def test_requested_rank_is_rounded_down_to_the_tile() -> None:
    # 61 → 56: the table only has tile multiples, as measured by `candidate_ranks`.
    assert choose_rank(_table(5.0, {56: 1.0, 48: 0.99, 40: 0.98}), requested=61, step=8) == 56
    assert candidate_ranks(61, 8, min_fraction=0.6) == [56, 48, 40]


def test_cliff_pick_slower_than_dense_falls_back() -> None:
    # Cliff between 64 and 56, but 56 is still slower than dense; 48 is faster.
    ranks = {64: 3.0, 56: 1.3, 48: 1.1}
    assert choose_rank(_table(1.2, ranks), requested=64, step=8) == 48


def test_tiles() -> None:
    assert tile_for("torch-cpu") == 8 and tile_for("mindir-ascend") == 16
    assert tile_for("torch-cuda") == 16 and tile_for("unknown") == 8


# --- cache ----------------------------------------------------------------------------------


def test_table_json_round_trip(tmp_path: Path) -> None:
    t = _table(2.0, {64: 1.0, 56: 0.9}, shape=(4, 16, 64))
    path = save_table(t, tmp_path)
    assert path.name == f"{t.key()}.json"
    back = load_table(t.key(), tmp_path)
    assert back == t and back is not None and back.input_shape == (4, 16, 64)
    assert load_table("no-such-key", tmp_path) is None
    path.write_text("{not json")
    assert load_table(t.key(), tmp_path) is None  # a corrupt entry is re-measured, not fatal


def test_key_depends_on_what_latency_depends_on() -> None:
    base = _table(1.0, {}, shape=(8, 64))
    assert base.key() != _table(1.0, {}, shape=(16, 64)).key()
    other_torch = LatencyTable("fake", "Linear", 64, 128, (8, 64), "float32", "other", dense=1.0)
    assert base.key() != other_torch.key()
    assert base.key() == _table(9.0, {8: 1.0}, shape=(8, 64)).key()  # values are not the key


def test_latency_table_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = get_backend("torch", "cpu")
    first = latency_table(backend, 64, 32, (4, 64), [16, 8], directory=tmp_path, repeats=3)
    assert set(first.ranks) == {16, 8} and first.dense > 0 and first.repeats == 3

    def boom(*args: object, **kwargs: object) -> LatencyTable:
        raise AssertionError("measured again although cached")

    monkeypatch.setattr(lat, "measure_linear", boom)
    again = latency_table(backend, 64, 32, (4, 64), [8], directory=tmp_path)
    assert again == first
    with pytest.raises(AssertionError, match="measured again"):  # a new rank: re-measure
        latency_table(backend, 64, 32, (4, 64), [24], directory=tmp_path)


# --- the hook the decompose pass calls ------------------------------------------------------


def test_keep_if_faster_ranks_on_fake_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = wide_mlp()  # fc1: 64→128 on (4, 64); fc2: 128→16 on (4, 128)
    analysis = analyze(model, Inputs(model.example_inputs, {}))
    seen: list[tuple[int, int, tuple[int, ...], list[int]]] = []

    def fake(backend, in_f, out_f, shape, ranks, **kw):  # type: ignore[no-untyped-def]
        ranks = list(ranks)
        seen.append((in_f, out_f, shape, ranks))
        if in_f == 64:  # fc1: factorization pays, cliff below 24
            table = {r: 0.1 * r + (1.0 if r > 24 else 0.0) for r in ranks}
            return LatencyTable(
                "torch-cpu", "Linear", in_f, out_f, shape, "float32", "t", 10.0, table
            )
        return LatencyTable(
            "torch-cpu", "Linear", in_f, out_f, shape, "float32", "t", 0.1, {r: 1.0 for r in ranks}
        )

    monkeypatch.setattr(lat, "measure_linear", fake)
    backend = get_backend("torch", "cpu")
    picks = keep_if_faster_ranks(
        model, analysis, ["fc1", "fc2"], {"fc1": 32, "fc2": 12}, backend, directory=tmp_path
    )
    assert picks == {"fc1": 24, "fc2": None}
    assert (64, 128, (4, 64), [32, 24, 16]) in seen and (128, 16, (4, 128), [8]) in seen
    speed = layer_speedups(model, analysis, ["fc1"], {"fc1": 32}, backend, directory=tmp_path)
    assert speed["fc1"] == pytest.approx(10.0 / 4.2)


def test_keep_if_faster_ranks_measures_for_real(tmp_path: Path) -> None:
    model = wide_mlp()
    analysis = analyze(model, Inputs(model.example_inputs, {}))
    picks = keep_if_faster_ranks(
        model, analysis, ["fc1"], {"fc1": 16}, get_backend("torch"), directory=tmp_path, repeats=3
    )
    assert set(picks) == {"fc1"} and (picks["fc1"] is None or picks["fc1"] in (16, 8))
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_rejects_layers_it_cannot_time() -> None:
    model = wide_mlp()
    analysis = analyze(model, Inputs(model.example_inputs, {}))
    with pytest.raises(ValueError, match="not a module"):
        keep_if_faster_ranks(model, analysis, ["nope"], {"nope": 8}, get_backend("torch"))
    with pytest.raises(ValueError, match="not a Linear-like"):
        keep_if_faster_ranks(model, analysis, ["act"], {"act": 8}, get_backend("torch"))


def test_measure_linear_times_every_variant() -> None:
    t = lat.measure_linear(get_backend("torch"), 32, 16, (2, 32), [8, 4], repeats=2, warmup=1)
    assert set(t.ranks) == {8, 4} and t.torch_version == torch.__version__
    assert t.dtype == "float32" and t.input_shape == (2, 32)
