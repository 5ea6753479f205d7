"""`rank = auto` and `budget latency P`: ranks solved by the compiler from measured latency.

The search is checked against brute force on small instances (every assignment enumerated),
the pass on fake latency tables (a LayerTimer stub returning a known table, the layers' share
of the model's time fixed), the diagnostics of goals that cannot be met, the checker's rules
and the formatter, and the whole path through `surgery apply`.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import surgery
import surgery.passes.decompose as decompose_module
from surgery import ast
from surgery.check import check
from surgery.cli import main
from surgery.fmt import format_recipe
from surgery.graph import analyze
from surgery.inputs import Inputs
from surgery.manager import Manager
from surgery.modules import LowRankLinear
from surgery.parse import parse
from surgery.passes.auto_rank import (
    Goal,
    Layer,
    Predictor,
    Unreachable,
    candidate_grid,
    layer_share,
    lost_energy,
    measured_for,
    pareto_front,
    refine,
    search,
)
from surgery.passes.base import PassContext, PassError
from surgery.passes.decompose import DecomposePass
from surgery.timing import LayerTimes
from surgery.verbs.base import Checker
from surgery.verbs.decompose import check_goals

ROOT = Path(__file__).resolve().parents[1]
SHARE = 0.5  # the searched layers' share of the model's time, fixed in these tests


# --- the knapsack against brute force -------------------------------------------------------


def _random_layers(rng: random.Random, n: int) -> list[Layer]:
    layers = []
    for i in range(n):
        dense = rng.uniform(1.0, 10.0)
        options = [
            (8 * (j + 1), rng.uniform(0.1, 1.3) * dense, rng.uniform(0.0, 2.0))
            for j in range(rng.randint(1, 4))
        ]
        layers.append(Layer(f"l{i}", dense, options))
    return layers


def _all_assignments(layers: list[Layer]) -> list[tuple[float, float, dict[str, int | None]]]:
    per_layer = [[(None, layer.dense, 0.0), *layer.options] for layer in layers]
    out = []
    for combo in itertools.product(*per_layer):
        ranks = {layer.path: o[0] for layer, o in zip(layers, combo, strict=True)}
        out.append((sum(o[1] for o in combo), sum(o[2] for o in combo), ranks))
    return out


def _brute_pareto(points: list[tuple[float, float, Any]]) -> set[tuple[float, float]]:
    front = set()
    for lat, err, _ in points:
        if not any((l2 <= lat and e2 <= err) and (l2 < lat or e2 < err) for l2, e2, _ in points):
            front.add((round(lat, 9), round(err, 9)))
    return front


@pytest.mark.parametrize("seed", range(12))
def test_pareto_front_is_the_brute_force_front(seed: int) -> None:
    rng = random.Random(seed)
    layers = _random_layers(rng, rng.randint(1, 5))
    front = pareto_front(layers)
    got = {(round(p.latency, 9), round(p.error, 9)) for p in front.points()}
    assert got == _brute_pareto(_all_assignments(layers))
    for p in front.points():  # each point's assignment adds up to the point
        chosen = [
            (layer.dense, 0.0)
            if p.ranks[layer.path] is None
            else next((t, e) for r, t, e in layer.options if r == p.ranks[layer.path])
            for layer in layers
        ]
        assert sum(c[0] for c in chosen) == pytest.approx(p.latency)
        assert sum(c[1] for c in chosen) == pytest.approx(p.error)


@pytest.mark.parametrize("seed", range(12))
def test_search_finds_the_brute_force_optimum(seed: int) -> None:
    rng = random.Random(100 + seed)
    layers = _random_layers(rng, 4)
    points = _all_assignments(layers)
    dense = sum(layer.dense for layer in layers)
    # least error under a latency cap
    cap = rng.uniform(0.3, 1.0) * dense
    feasible = [p for p in points if p[0] <= cap]
    result = search(layers, [Goal("cap", latency=cap)])
    if not feasible:
        assert isinstance(result, Unreachable) and result.alone
        assert result.best.latency == pytest.approx(min(p[0] for p in points))
    else:
        assert not isinstance(result, Unreachable)
        assert result.error == pytest.approx(min(p[1] for p in feasible))
        assert result.latency <= cap
    # least latency under an error cap
    err_cap = rng.uniform(0.0, 3.0)
    result = search(layers, [Goal("close", error=err_cap, kind="drift")])
    assert not isinstance(result, Unreachable)
    assert result.latency == pytest.approx(min(p[0] for p in points if p[1] <= err_cap))


def test_thinned_front_keeps_every_reachable_latency() -> None:
    rng = random.Random(7)
    layers = _random_layers(rng, 30)
    exact = pareto_front(layers)
    thin = pareto_front(layers, max_points=50)
    assert thin.thinned and len(thin) <= 51 < len(exact)
    assert thin.latency[0] == pytest.approx(exact.latency[0])  # the fastest is never lost
    for frac in (0.6, 0.7, 0.8):
        cap = frac * sum(layer.dense for layer in layers)
        best = search(layers, [Goal("cap", latency=cap)], front=exact)
        near = search(layers, [Goal("cap", latency=cap)], front=thin)
        assert not isinstance(best, Unreachable) and not isinstance(near, Unreachable)
        assert near.latency <= cap and best.error - 1e-9 <= near.error <= best.error * 1.25


def test_a_rank_slower_than_dense_is_never_chosen() -> None:
    layer = Layer("a", 1.0, [(8, 2.0, 0.0), (16, 0.5, 0.3)])
    assert [c[0] for c in layer.choices()] == [16, None]


def test_candidate_grid_and_lost_energy() -> None:
    assert candidate_grid(383, 8) == candidate_grid(383, 8, most=16)
    grid = candidate_grid(383, 8)
    assert len(grid) == 16 and grid[0] == 8 and grid[-1] == 376
    assert all(r % 8 == 0 for r in grid)
    assert candidate_grid(40, 16) == [16, 32]
    sv = torch.tensor([3.0, 2.0, 1.0])
    lost = lost_energy(sv, [1, 2, 3])
    assert lost[1] == pytest.approx(5 / 14) and lost[2] == pytest.approx(1 / 14) and lost[3] == 0


def test_predictor_inverts_its_speedup() -> None:
    p = Predictor(dense=8.0, share=0.4)
    for s in (1.1, 1.3, 1.5):
        assert p.speedup(p.latency_for_speedup(s)) == pytest.approx(s)
    assert p.latency_for_speedup(1 / 0.6) == pytest.approx(0.0)  # the rest alone: 1/(1-f)


# --- the pass on fake latency tables ----------------------------------------------------------


class FakeTimer:
    """Latency of a Linear and its low-rank pair as known functions of shape and rank, with a
    cliff off the 16-multiples (the search must see it)."""

    name = "fake-cpu"
    tile = 8

    def __init__(self) -> None:
        self.calls = 0

    @staticmethod
    def dense(in_f: int, out_f: int) -> float:
        return in_f * out_f * 1e-6

    @staticmethod
    def pair(in_f: int, out_f: int, rank: int) -> float:
        return rank * (in_f + out_f) * 1e-6 * (1.0 if rank % 16 == 0 else 1.4) + 2e-4

    def time_layer(self, layer, geometry, input_shape, dtype, dense, variants):  # type: ignore[no-untyped-def]
        self.calls += 1
        in_f, out_f = geometry["in_features"], geometry["out_features"]
        return LayerTimes(
            self.name,
            self.dense(in_f, out_f),
            {k: self.pair(in_f, out_f, int(k)) for k in variants},
        )


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(64, 96)
        self.b = nn.Linear(96, 64)
        self.c = nn.Linear(64, 64)
        self.d = nn.Linear(64, 16)
        self.example_inputs = (torch.randn(32, 64, generator=torch.Generator().manual_seed(1)),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


def mlp() -> nn.Module:
    """Factory for `--arch tests.test_auto_rank:mlp`."""
    return Mlp()


def _plan(source: str, **context: Any) -> tuple[Any, nn.Module]:
    model = Mlp().eval()
    x = Inputs(model.example_inputs, {})
    recipe = parse(source)
    stmt, *rest = recipe.statements
    assert isinstance(stmt, ast.Decompose)
    ctx = PassContext(
        analysis=analyze(model, x),
        example=x,
        calibration=[x],
        timer=FakeTimer(),
        contracts=tuple(rest),
        **context,
    )
    return DecomposePass(stmt, ctx).plan(model), model


@pytest.fixture(autouse=True)
def fixed_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decompose_module, "layer_share", lambda *a, **k: SHARE)


def _brute(auto: dict[str, Any], keep: Any) -> tuple[dict[str, int | None], float, float]:
    """The best assignment of the plan's own options by enumeration: ``keep(lat, err)`` says
    which are allowed; least error, then least latency."""
    layers = auto["layers"]
    paths = list(layers)
    per_layer = [
        [(None, layers[p]["dense"], 0.0), *[tuple(o) for o in layers[p]["options"]]] for p in paths
    ]
    best: tuple[float, float, dict[str, int | None]] | None = None
    for combo in itertools.product(*per_layer):
        lat, err = sum(o[1] for o in combo), sum(o[2] for o in combo)
        if keep(lat, err) and (best is None or (err, lat) < (best[1], best[0])):
            best = (lat, err, {p: o[0] for p, o in zip(paths, combo, strict=True)})
    assert best is not None
    return best[2], best[0], best[1]


def _speedup(lat: float, dense: float) -> float:
    return 1.0 / (1.0 - SHARE + SHARE * lat / dense)


def test_auto_meets_the_speedup_contract_at_the_brute_force_optimum() -> None:
    plan, model = _plan("decompose Linear rank = auto\nexpect speedup >= 1.3")
    auto = plan.data["auto"]
    layers = auto["layers"]
    assert set(layers) == {"a", "b", "c", "d"}
    # the tables are the fake timer's, on the tile grid up to the break-even rank
    assert [o[0] for o in layers["c"]["options"]] == [8, 16, 24]  # break-even 31
    assert layers["a"]["dense"] == FakeTimer.dense(64, 96)
    assert layers["a"]["options"][0][1] == pytest.approx(FakeTimer.pair(64, 96, 8))
    # each candidate's error is the layer's sensitivity times the energy its rank discards
    rows = {r.path: r for r in plan.rows}
    sv = torch.linalg.svdvals(model.c.weight.detach().double())
    lost = lost_energy(sv, [8, 16, 24])
    for r, _, err in layers["c"]["options"]:
        assert err == pytest.approx(rows["c"].detail["sensitivity"] * lost[r], rel=1e-4)
    dense = sum(v["dense"] for v in layers.values())
    want, lat, err = _brute(auto, lambda lat, err: _speedup(lat, dense) >= 1.3)
    assert auto["ranks"] == want
    assert auto["predicted_speedup"] == pytest.approx(_speedup(lat, dense)) and lat < dense
    assert auto["predicted_drift"] == pytest.approx(math.sqrt(err))
    for path, rank in want.items():
        row = rows[path]
        if rank is None:
            assert row.action == "skip" and "search keeps this layer dense" in row.note
        else:
            assert row.action == "decompose" and row.detail["rank"] == rank
    chosen = [p for p in auto["frontier"] if p["chosen"]]
    assert len(chosen) == 1 and chosen[0]["speedup"] >= 1.3
    assert any("ranks searched on fake-cpu" in n for n in plan.notes)


def test_auto_with_a_drift_cap_alone_is_the_fastest_under_it() -> None:
    plan, _ = _plan("decompose Linear rank = auto\nexpect drift <= 0.3")
    auto = plan.data["auto"]
    layers = auto["layers"]
    per_layer = [[(None, v["dense"], 0.0), *map(tuple, v["options"])] for v in layers.values()]
    fastest = min(
        (sum(o[1] for o in c), sum(o[2] for o in c))
        for c in itertools.product(*per_layer)
        if sum(o[2] for o in c) <= 0.09
    )
    assert auto["latency"] * sum(v["dense"] for v in layers.values()) == pytest.approx(fastest[0])
    assert auto["predicted_drift"] <= 0.3 + 1e-9


def test_budget_latency_is_the_same_search_with_the_budget_as_constraint() -> None:
    plan, _ = _plan("decompose Linear budget latency 60%")
    auto = plan.data["auto"]
    dense = sum(v["dense"] for v in auto["layers"].values())
    want, lat, _ = _brute(auto, lambda lat, err: lat <= 0.6 * dense)
    assert auto["ranks"] == want and lat <= 0.6 * dense
    assert auto["predicted_drift"] is None  # weighed by spectra alone: lost energy, not drift
    assert all("sensitivity" not in r.detail for r in plan.rows)
    plan, _ = _plan("decompose Linear budget latency 60% by sensitivity")
    assert plan.data["auto"]["predicted_drift"] is not None
    assert all("sensitivity" in r.detail for r in plan.rows)


def test_margin_tightens_the_target() -> None:
    plain, _ = _plan("decompose Linear rank = auto\nexpect speedup >= 1.2")
    tight, _ = _plan("decompose Linear rank = auto\nexpect speedup >= 1.2", speedup_margin=1.15)
    assert tight.data["auto"]["predicted_speedup"] >= 1.2 * 1.15 - 1e-9
    assert tight.data["auto"]["predicted_speedup"] > plain.data["auto"]["predicted_speedup"]
    assert any("after a measured miss" in n for n in tight.notes)


def test_refine_after_a_measured_miss() -> None:
    plan, _ = _plan("decompose Linear rank = auto\nexpect speedup >= 1.2\nexpect drift <= 2")
    info = plan.data["auto"]
    predicted = info["predicted_speedup"]
    assert refine(plan, measured_speedup=predicted) is None  # met: no retry
    margins = refine(plan, measured_speedup=1.1)
    assert margins is not None and margins.drift == 1.0
    assert margins.speedup == pytest.approx(predicted / 1.1 * 1.01)
    again, _ = _plan(
        "decompose Linear rank = auto\nexpect speedup >= 1.2\nexpect drift <= 2",
        speedup_margin=margins.speedup,
    )
    assert again.data["auto"]["predicted_speedup"] >= 1.2 * margins.speedup - 1e-9
    missed_drift = refine(plan, None, measured_drift=2.5)
    assert missed_drift is not None and missed_drift.drift < 1.0
    assert refine(type("P", (), {"data": {}})(), 1.0) is None  # no search on the plan

    class Contract:
        def __init__(self, line: int, measured: float | None) -> None:
            self.statement = type("S", (), {"span": type("Sp", (), {"line": line})()})()
            self.measured = measured

    assert measured_for(plan, [Contract(2, 1.05), Contract(3, 0.4)]) == (1.05, 0.4)


# --- goals that cannot be met ------------------------------------------------------------------


def test_an_impossible_speedup_names_the_contract_and_the_best_reachable() -> None:
    with pytest.raises(PassError) as info:
        _plan("decompose Linear rank = auto\nexpect speedup >= 1.9")
    d = info.value.diagnostic
    assert d.code == "S0502" and d.span is not None and (d.span.line, d.span.col) == (2, 1)
    # fastest: every layer at its fastest candidate, share 0.5 → at most 2×, here less
    fastest = {}
    for in_f, out_f, be in ((64, 96, 38), (96, 64, 38), (64, 64, 31), (64, 16, 12)):
        grid = candidate_grid(be, 8)
        fastest[(in_f, out_f)] = min(
            FakeTimer.dense(in_f, out_f), *(FakeTimer.pair(in_f, out_f, r) for r in grid)
        )
    dense = sum(FakeTimer.dense(i, o) for i, o in fastest)
    best = _speedup(sum(fastest.values()), dense)
    assert d.message == (
        f"no choice of ranks can meet `expect speedup >= 1.9`: the best reachable is {best:.2f}×"
    )
    assert "50% of the model's time" in " ".join(d.notes)
    assert d.notes[0] == "ranks searched by line 1: `decompose Linear rank = auto`"


def test_an_impossible_pair_of_contracts_names_both() -> None:
    with pytest.raises(PassError) as info:
        _plan("decompose Linear rank = auto\nexpect speedup >= 1.4\nexpect drift <= 0.01")
    d = info.value.diagnostic
    assert d.code == "S0502" and d.span is not None and d.span.line == 2
    assert "`expect speedup >= 1.4` together with `expect drift <= 0.01`" in d.message
    assert "the fastest choice that meets `expect drift <= 0.01`" in d.notes[1]


def test_an_unreachable_budget_is_located_at_the_budget() -> None:
    with pytest.raises(PassError) as info:
        _plan("decompose Linear budget latency 5%")
    d = info.value.diagnostic
    assert d.code == "S0502" and d.span is not None and d.span.col == 18
    assert d.message.startswith("no choice of ranks can meet `budget latency 5%`")
    assert d.help is not None and d.help.startswith("raise the budget")


def test_auto_without_a_goal_in_its_context_is_a_located_error() -> None:
    with pytest.raises(PassError) as info:
        _plan("decompose Linear rank = auto\nexpect params <= 50%")
    d = info.value.diagnostic
    assert d.code == "S0401" and d.span is not None and d.span.col == 18
    assert "nothing to aim at" in d.message


def test_auto_without_a_timer_is_a_located_error() -> None:
    model = Mlp().eval()
    x = Inputs(model.example_inputs, {})
    stmt, contract = parse("decompose Linear rank = auto\nexpect speedup >= 1.2").statements
    assert isinstance(stmt, ast.Decompose)
    ctx = PassContext(analysis=analyze(model, x), example=x, contracts=(contract,))
    with pytest.raises(PassError, match="no timer"):
        DecomposePass(stmt, ctx).plan(model)


def test_layer_share_is_a_fraction_and_leaves_the_model_alone() -> None:
    model = Mlp().eval()
    x = Inputs(model.example_inputs, {})
    before = model(*model.example_inputs)
    share = layer_share(model, ["a", "b", "c", "d"], x, repeats=3)
    assert 0.0 < share <= 1.0
    assert not model.a._forward_hooks and not model.a._forward_pre_hooks
    assert torch.equal(model(*model.example_inputs), before)


# --- language: checks and formatting ---------------------------------------------------------


def _codes(source: str) -> list[tuple[str, str]]:
    return [(d.code, d.message) for d in check(parse(source))]


def test_checker_rules_for_auto() -> None:
    goal = "\nexpect speedup >= 1.5"
    assert _codes("decompose Linear rank = auto" + goal) == []
    assert _codes("decompose Linear budget latency 60% by sensitivity") == []
    assert _codes("decompose Linear rank = auto method svd-llm round 16" + goal) == []
    assert _codes("decompose Linear rank = 0.5 rank = auto" + goal) == [
        ("S0204", "`rank = 0.5` and `rank = auto` contradict each other")
    ]
    assert _codes("decompose Linear rank = auto budget latency 50%" + goal) == [
        ("S0204", "`rank = auto` and `budget` contradict each other")
    ]
    assert _codes("decompose Linear rank = auto keep if faster" + goal) == [
        ("S0204", "`keep if faster` does nothing with `rank = auto`")
    ]
    assert _codes("decompose Linear budget latency 50% progressive 2 steps") == [
        ("S0204", "`budget latency` and `progressive` do not go together")
    ]
    assert [c for c, _ in _codes("decompose Conv2d rank = auto method tucker" + goal)] == ["S0204"]
    assert _codes("decompose Linear budget latency 150%") == [
        ("S0203", "a budget must be in (0, 1], found `150%`")
    ]


def test_auto_needs_a_goal() -> None:
    from surgery.check import support

    stmt = parse("decompose Linear rank = auto").statements[0]
    assert isinstance(stmt, ast.Decompose) and stmt.rank_auto is not None
    for contracts, errors in (
        ("", 1),
        ("expect params <= 50%", 1),
        ("expect speedup < 3", 1),
        ("expect speedup >= 1.5 on onnx", 0),
        ("expect drift <= 0.1", 0),
    ):
        c = Checker(support(), {})
        check_goals(c, stmt, parse(contracts).statements)
        assert len(c.diags) == errors, contracts
        if errors:
            d = c.diags[0]
            assert d.code == "S0204" and d.span == stmt.rank_auto.span
            assert d.help is not None and "budget latency 60%" in d.help


@pytest.mark.parametrize(
    "line",
    [
        "decompose Linear rank = auto",
        'decompose Linear where name ~ "enc*" rank = auto method svd-llm round 16',
        "decompose Linear budget latency 60%",
        "decompose Conv1D budget latency 0.5 by sensitivity",
    ],
)
def test_fmt_round_trip(line: str) -> None:
    recipe = parse(line + "\nexpect speedup >= 1.5\n")
    text = format_recipe(recipe)
    assert text.splitlines()[0] == line
    again = parse(text)
    assert format_recipe(again) == text
    assert _without_spans(again.statements) == _without_spans(recipe.statements)


def _without_spans(value: Any) -> Any:
    if isinstance(value, list):
        return [_without_spans(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_spans(v) for k, v in value.items() if k != "span"}
    if hasattr(value, "model_dump"):
        return _without_spans(value.model_dump())
    return value


def test_auto_is_a_word_only_after_rank() -> None:
    target = parse("target auto").statements[0]
    assert target.backend.value == "auto"  # type: ignore[attr-defined]


# --- end to end through the CLI --------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """`surgery apply` in-process with the fake timer; contracts handed to passes the way the
    manager does once it fills `PassContext.contracts` (see the report of issue 19)."""
    from safetensors.torch import save_file

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(Manager, "_layer_timer", lambda self: FakeTimer())
    original = Manager._context

    def context(self: Manager, *args: Any) -> PassContext:
        ctx = original(self, *args)
        if not ctx.contracts:
            ctx.contracts = tuple(self.program.contracts)
        return ctx

    monkeypatch.setattr(Manager, "_context", context)
    weights = tmp_path / "mlp.safetensors"
    save_file(Mlp().state_dict(), weights)
    return {"weights": weights, "tmp": tmp_path}


def _apply(env: dict[str, Path], recipe: str) -> tuple[int, Path]:
    path = env["tmp"] / "r.surg"
    path.write_text(recipe)
    out = env["tmp"] / "out"
    code = main(
        [
            "apply",
            str(path),
            str(env["weights"]),
            "--arch",
            "tests.test_auto_rank:mlp",
            "-o",
            str(out),
            "--no-measure",
            "-q",
        ]
    )
    return code, out


def test_apply_with_auto_through_the_cli(
    cli_env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _apply(cli_env, "decompose Linear rank = auto\nexpect speedup >= 1.3\n")
    assert code == 0, capsys.readouterr().err
    expected, _ = _plan("decompose Linear rank = auto\nexpect speedup >= 1.3")
    plan = json.loads((out / "plan.json").read_text())
    step = next(s for s in plan["steps"] if s["keyword"] == "decompose")
    got = {r["path"]: r["detail"].get("rank") for r in step["rows"] if r["action"] != "skip"}
    want = {p: r for p, r in expected.data["auto"]["ranks"].items() if r is not None}
    assert got == want and got
    assert any("ranks searched on fake-cpu" in n for n in step["notes"])
    model = surgery.load(out, arch="tests.test_auto_rank:mlp")
    for path, rank in want.items():
        layer = model.get_submodule(path)
        assert isinstance(layer, LowRankLinear) and layer.rank == rank


def test_apply_with_an_unreachable_contract_exits_3(
    cli_env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _apply(cli_env, "decompose Linear rank = auto\nexpect speedup >= 1.9\n")
    err = capsys.readouterr().err
    assert code == 3, err
    assert "error[S0502]: no choice of ranks can meet `expect speedup >= 1.9`" in err
    assert "r.surg:2:1" in err and "Traceback" not in err
    assert not out.exists()
