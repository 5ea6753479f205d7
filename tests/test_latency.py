"""Hardware-aware rank choice: pure selection on fake times, the timer's disk cache, the hook
the decompose pass calls (`surgery.passes.rank_latency` over `surgery.timing.LayerTimer`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
from surgery.passes.rank_latency import (
    candidate_ranks,
    choose_rank,
    keep_if_faster_ranks,
    layer_speedups,
)
from surgery.targets import tile_for
from surgery.timing import LayerTimes, TimingUnavailable
from tests.helpers_models import wide_mlp


def _times(dense: float, ranks: dict[int, float]) -> LayerTimes:
    return LayerTimes("fake", dense, {str(r): t for r, t in ranks.items()})


def _table(
    dense: float, variants: dict[str, float], shape: tuple[int, ...] = (8, 64)
) -> LatencyTable:
    geometry = {"in_features": 64, "out_features": 128, "bias": True}
    return LatencyTable("fake", "Linear", geometry, shape, "float32", "t", dense, variants)


# --- pure selection -------------------------------------------------------------------------


def test_picks_rank_just_below_the_cliff() -> None:
    # Tile 8; ranks above 48 pay an extra tile (+30%): the cliff is between 56 and 48.
    ranks = {r: 1.0 + 0.01 * r + (0.3 if r > 48 else 0.0) for r in range(8, 65, 8)}
    assert choose_rank(_times(5.0, ranks), requested=64, step=8) == 48


def test_no_cliff_keeps_the_requested_rank() -> None:
    ranks = {r: 0.01 * r for r in range(8, 65, 8)}  # latency linear in rank
    assert choose_rank(_times(5.0, ranks), requested=64, step=8) == 64


def test_slower_than_dense_stays_dense() -> None:
    assert choose_rank(_times(0.5, {64: 1.0, 56: 0.9, 48: 0.8}), requested=64, step=8) is None


def test_requested_rank_is_rounded_down_to_the_tile() -> None:
    # 61 → 56: the table only has tile multiples, as measured by `candidate_ranks`.
    assert choose_rank(_times(5.0, {56: 1.0, 48: 0.99, 40: 0.98}), requested=61, step=8) == 56
    assert candidate_ranks(61, 8, min_fraction=0.6) == [56, 48, 40]


def test_cliff_pick_slower_than_dense_falls_back() -> None:
    # Cliff between 64 and 56, but 56 is still slower than dense; 48 is faster.
    ranks = {64: 3.0, 56: 1.3, 48: 1.1}
    assert choose_rank(_times(1.2, ranks), requested=64, step=8) == 48


def test_tiles() -> None:
    assert tile_for("torch-cpu") == 8 and tile_for("mindir-ascend") == 16
    assert tile_for("torch-cuda") == 16 and tile_for("unknown") == 8
    assert BackendTimer(get_backend("onnx", "cuda")).tile == 16


# --- the timer's cache (backends/latency.py: one generic table) -----------------------------


def test_table_json_round_trip(tmp_path: Path) -> None:
    t = _table(2.0, {"64": 1.0, "56": 0.9}, shape=(4, 16, 64))
    path = save_table(t, tmp_path)
    assert path.name == f"{t.key()}.json"
    back = load_table(t.key(), tmp_path)
    assert back == t and back is not None and back.input_shape == (4, 16, 64)
    assert load_table("no-such-key", tmp_path) is None
    path.write_text("{not json")
    assert load_table(t.key(), tmp_path) is None  # a corrupt entry is re-measured, not fatal
    path.write_text('{"backend": 1}')
    assert load_table(t.key(), tmp_path) is None


def test_key_depends_on_what_latency_depends_on() -> None:
    base = _table(1.0, {}, shape=(8, 64))
    assert base.key() != _table(1.0, {}, shape=(16, 64)).key()
    other_torch = LatencyTable("fake", "Linear", base.geometry, (8, 64), "float32", "other", 1.0)
    assert base.key() != other_torch.key()
    other_layer = LatencyTable("fake", "LowRankConv2d", base.geometry, (8, 64), "float32", "t", 1.0)
    assert base.key() != other_layer.key()
    wider = LatencyTable("fake", "Linear", {**base.geometry, "out_features": 64}, (8, 64),
                         "float32", "t", 1.0)  # fmt: skip
    assert base.key() != wider.key()
    assert base.key() == _table(9.0, {"8": 1.0}, shape=(8, 64)).key()  # values are not the key


def _pair(rank: int) -> Any:
    return lambda: nn.Sequential(nn.Linear(64, rank, bias=False), nn.Linear(rank, 32))


def test_latency_table_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = get_backend("torch", "cpu")
    geometry = {"in_features": 64, "out_features": 32, "bias": True}

    def table(ranks: list[int], **kw: Any) -> LatencyTable:
        return latency_table(
            backend, "Linear", geometry, (4, 64), torch.float32, lambda: nn.Linear(64, 32),
            {str(r): _pair(r) for r in ranks}, directory=tmp_path, **kw,
        )  # fmt: skip

    first = table([16, 8], repeats=3)
    assert set(first.variants) == {"16", "8"} and first.dense > 0 and first.repeats == 3

    def boom(*args: object, **kwargs: object) -> LatencyTable:
        raise AssertionError("measured again although cached")

    monkeypatch.setattr(lat, "measure", boom)
    assert table([8]) == first
    with pytest.raises(AssertionError, match="measured again"):  # a new rank: re-measure
        table([24])


def test_measure_times_every_variant() -> None:
    t = lat.measure(
        get_backend("torch"), "Linear", {"in_features": 32}, (2, 32), torch.float32,
        lambda: nn.Linear(32, 16), {"8": lambda: nn.Linear(32, 16)}, repeats=2, warmup=1,
    )  # fmt: skip
    assert set(t.variants) == {"8"} and t.torch_version == torch.__version__
    assert t.dtype == "float32" and t.input_shape == (2, 32) and t.backend == "torch-cpu"


def test_an_unavailable_backend_cannot_time(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = get_backend("torch", "cpu")
    monkeypatch.setattr(type(backend), "is_available", lambda self: (False, "switched off"))
    with pytest.raises(TimingUnavailable, match="cannot time layers on torch-cpu: switched off"):
        BackendTimer(backend).time_layer(
            "Linear", {}, (2, 8), torch.float32, lambda: nn.Linear(8, 8), {}
        )


# --- the hook the decompose pass calls ------------------------------------------------------


class FakeTimer:
    """A :class:`surgery.timing.LayerTimer` whose times are a function of the layer shape."""

    name = "fake-cpu"
    tile = 8

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, tuple[int, ...], list[int]]] = []

    def time_layer(self, layer, geometry, input_shape, dtype, dense, variants):  # type: ignore[no-untyped-def]
        in_f, out_f = geometry["in_features"], geometry["out_features"]
        ranks = [int(k) for k in variants]
        self.seen.append((in_f, out_f, input_shape, ranks))
        assert isinstance(dense(), nn.Linear) and all(len(b()) == 2 for b in variants.values())
        if in_f == 64:  # fc1: factorization pays, cliff below 24
            return _times(10.0, {r: 0.1 * r + (1.0 if r > 24 else 0.0) for r in ranks})
        return _times(0.1, {r: 1.0 for r in ranks})


def test_keep_if_faster_ranks_on_fake_times() -> None:
    model = wide_mlp()  # fc1: 64→128 on (4, 64); fc2: 128→16 on (4, 128)
    analysis = analyze(model, Inputs(model.example_inputs, {}))
    timer = FakeTimer()
    picks = keep_if_faster_ranks(model, analysis, ["fc1", "fc2"], {"fc1": 32, "fc2": 12}, timer)
    assert picks == {"fc1": 24, "fc2": None}
    assert (64, 128, (4, 64), [32, 24, 16]) in timer.seen and (128, 16, (4, 128), [8]) in timer.seen
    speed = layer_speedups(model, analysis, ["fc1"], {"fc1": 32}, timer)
    assert speed["fc1"] == pytest.approx(10.0 / 4.2)


def test_keep_if_faster_ranks_measures_for_real(tmp_path: Path) -> None:
    model = wide_mlp()
    analysis = analyze(model, Inputs(model.example_inputs, {}))
    timer = BackendTimer(get_backend("torch"), directory=tmp_path, repeats=3)
    picks = keep_if_faster_ranks(model, analysis, ["fc1"], {"fc1": 16}, timer)
    assert set(picks) == {"fc1"} and (picks["fc1"] is None or picks["fc1"] in (16, 8))
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_rejects_layers_it_cannot_time() -> None:
    model = wide_mlp()
    analysis = analyze(model, Inputs(model.example_inputs, {}))
    timer = FakeTimer()
    with pytest.raises(ValueError, match="not a module"):
        keep_if_faster_ranks(model, analysis, ["nope"], {"nope": 8}, timer)
    with pytest.raises(ValueError, match="not a Linear-like"):
        keep_if_faster_ranks(model, analysis, ["act"], {"act": 8}, timer)
