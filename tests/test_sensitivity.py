"""`budget ... by sensitivity`: measured per-layer weights for the rank budget."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from surgery.graph import analyze
from surgery.inputs import Inputs
from surgery.lowrank import LayerSpectrum, allocate_budget
from surgery.metrics import drift
from surgery.parse import parse
from surgery.passes.base import PassContext
from surgery.passes.decompose import DecomposePass
from surgery.sensitivity import layer_sensitivities


class TwoBranches(nn.Module):
    """``10·A(x) + 0.1·B(x)``: A and B alike, but A's errors reach the output 100× larger."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        with torch.no_grad():
            w = torch.randn(32, 32, generator=g)
            self.a.weight.copy_(w)
            self.b.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10.0 * self.a(x) + 0.1 * self.b(x)


def batches() -> list[Inputs]:
    g = torch.Generator().manual_seed(1)
    return [Inputs((torch.randn(64, 32, generator=g),), {}) for _ in range(2)]


def test_weights_are_drift_squared_over_lost_and_the_model_is_unchanged() -> None:
    model = TwoBranches().eval()
    before = copy.deepcopy(model.state_dict())
    zero = nn.Linear(32, 32)
    nn.init.zeros_(zero.weight)
    nn.init.zeros_(zero.bias)
    data = batches()
    weights = layer_sensitivities(model, {"a": (zero, 0.5), "b": (zero, 0.0)}, data)
    refs = [b.call(model) for b in data]
    without_a = [10.0 * zero(b.args[0]) + 0.1 * model.b(b.args[0]) for b in data]
    assert weights["a"] == pytest.approx(drift(refs, without_a) ** 2 / 0.5, rel=1e-6)
    assert weights["b"] == 0.0  # nothing lost: no weight
    assert model.a is not zero and model.b is not zero
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weights_move_rank_to_the_heavier_layer() -> None:
    sv = torch.linspace(2.0, 0.1, 16)
    layers = [LayerSpectrum(n, 16, 16, 1, sv) for n in ("a", "b")]
    plain = allocate_budget(layers, 0.5, "params")
    assert plain["a"] == plain["b"]
    assert allocate_budget(layers, 0.5, "params", weights={"a": 1.0, "b": 1.0}) == plain
    heavy = allocate_budget(layers, 0.5, "params", weights={"a": 100.0, "b": 1.0})
    assert heavy["a"] > plain["a"] > heavy["b"]


@pytest.mark.parametrize("method", ["svd", "svd-llm"])
def test_sensitivity_budget_lowers_drift_and_meets_the_budget(method: str) -> None:
    model = TwoBranches().eval()
    data = batches()
    results = {}
    for by in ("", " by sensitivity"):
        work = copy.deepcopy(model)
        ctx = PassContext(analysis=analyze(work, data[0]), example=data[0], calibration=data)
        stmt = parse(f"decompose Linear budget params 50%{by} method {method}").statements[0]
        plan, _ = DecomposePass(stmt, ctx).run(work)
        totals = plan.totals()
        assert totals["params_after"] <= 0.5 * sum(
            m.weight.numel() for m in (model.a, model.b)
        ) + sum(m.bias.numel() for m in (model.a, model.b))
        results[by] = (plan, drift([b.call(model) for b in data], [b.call(work) for b in data]))
    plan, value = results[" by sensitivity"]
    rows = {r.path: r for r in plan.rows}
    assert rows["a"].detail["sensitivity"] > rows["b"].detail["sensitivity"]
    assert rows["a"].detail["rank"] > rows["b"].detail["rank"]
    assert value < results[""][1]
    assert any("by sensitivity" in n for n in plan.notes)
