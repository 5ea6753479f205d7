"""`decompose`: methods (svd, asvd, svd-llm, tucker), layer kinds, rank rules and budgets."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from surgery.check import Support, check, support
from surgery.graph import analyze
from surgery.inputs import Inputs
from surgery.lowrank import (
    LayerSpectrum,
    asvd_factors,
    break_even_rank,
    layer_cost,
    svd_factors,
    svd_llm_factors,
)
from surgery.manager import Manager
from surgery.modules import LowRankLinear
from surgery.modules.lowrank_conv import LowRankConv2d
from surgery.modules.tucker_conv import TuckerConv2d
from surgery.parse import parse
from surgery.passes.base import PassContext
from surgery.passes.calibration_stats import collect_input_stats
from surgery.passes.decompose import DecomposePass
from tests.helpers_models import tiny_bert, tiny_gpt2

F64 = torch.float64


def run_pass(
    model: nn.Module,
    text: str,
    calibration: list[Inputs] | None = None,
    example: Inputs | None = None,
):
    """Plan and apply ``text`` on ``model`` in place; returns the plan."""
    stmt = parse(text).statements[0]
    ctx = PassContext(
        analysis=analyze(model, example), example=example, calibration=calibration or []
    )
    p = DecomposePass(stmt, ctx)
    plan = p.plan(model)
    p.apply(model, plan)
    return plan


# --- exactness at full rank (module-level helpers: the pass skips non-compressing ranks) ---


@settings(max_examples=25, deadline=None)
@given(out_f=st.integers(1, 10), in_f=st.integers(1, 10), seed=st.integers(0, 999))
def test_every_method_is_exact_at_full_rank(out_f: int, in_f: int, seed: int) -> None:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, dtype=F64)
    X = torch.randn(3 * in_f + 2, in_f, dtype=F64)
    full = min(in_f, out_f)
    for f in (
        svd_factors(lin.weight, full),
        asvd_factors(lin.weight, X.abs().mean(0), full),
        svd_llm_factors(lin.weight, X.T @ X, full),
    ):
        module = LowRankLinear.from_factors(lin, f)
        torch.testing.assert_close(module(X), lin(X), rtol=1e-8, atol=1e-8)


def test_conv1x1_pair_is_exact_at_full_rank_with_stride_and_padding() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 1, stride=2, padding=1, dtype=F64)
    pair = LowRankConv2d.from_factors(conv, svd_factors(conv.weight[:, :, 0, 0], 5))
    x = torch.randn(2, 6, 7, 7, dtype=F64)
    torch.testing.assert_close(pair(x), conv(x))
    assert isinstance(pair, LowRankConv2d)


@pytest.mark.parametrize("dilation", [1, 2])
def test_tucker_is_exact_at_full_ranks(dilation: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=2, dilation=dilation, dtype=F64)
    t = TuckerConv2d.from_conv(conv, rank_out=6, rank_in=4)
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    torch.testing.assert_close(t(x), conv(x))


# --- error non-increasing in rank ------------------------------------------------------------


@pytest.mark.parametrize("method", ["svd", "asvd", "svd-llm"])
def test_error_is_non_increasing_in_rank(method: str) -> None:
    torch.manual_seed(1)
    W = torch.randn(12, 9, dtype=F64)
    X = torch.randn(40, 9, dtype=F64) * torch.linspace(0.1, 3.0, 9, dtype=F64)
    errors = []
    for r in range(1, 10):
        if method == "svd":
            f, metric = svd_factors(W, r), torch.eye(9, dtype=F64)
        elif method == "asvd":
            s = X.abs().mean(0).sqrt()
            f, metric = asvd_factors(W, X.abs().mean(0), r), torch.diag(s)
        else:
            f, metric = svd_llm_factors(W, X.T @ X, r), X.T
        errors.append(float(((W - f.left @ f.right) @ metric).square().sum()))
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-18 * max(errors[0], 1.0) + 1e-12


def test_asvd_with_unit_scales_equals_svd_through_the_pass() -> None:
    """All-equal activations give ``s ≡ const``; a constant scale leaves the SVD split as it is."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(16, 16, dtype=F64))
    b = nn.Sequential(nn.Linear(16, 16, dtype=F64))
    b.load_state_dict(a.state_dict())
    ones = [Inputs((torch.ones(4, 16, dtype=F64),), {})]
    run_pass(a, "decompose Linear rank = 4 method asvd", ones)
    run_pass(b, "decompose Linear rank = 4 method svd")
    assert isinstance(a[0], LowRankLinear)
    torch.testing.assert_close(a[0].weight, b[0].weight)
    W = torch.randn(5, 3, dtype=F64)
    u, v = asvd_factors(W, torch.ones(3), rank=2), svd_factors(W, rank=2)
    assert torch.equal(u.left, v.left) and torch.equal(u.right, v.right)


def test_svd_llm_identity_through_the_pass() -> None:
    """Truncation error on the calibration set equals the discarded σ² of ``W·cholesky(XᵀX)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12, dtype=F64))
    W = model[0].weight.detach().clone()
    X = torch.randn(80, 16, dtype=F64) @ torch.randn(16, 16, dtype=F64)  # correlated inputs
    calib = [Inputs((X[:40],), {}), Inputs((X[40:],), {})]
    plan = run_pass(model, "decompose Linear rank = 3 method svd-llm", calib)
    assert plan.rows[0].detail["method"] == "svd-llm"
    new = model[0]
    assert isinstance(new, LowRankLinear) and new.rank == 3
    err = float(((W - new.weight.detach()) @ X.T).square().sum())
    sv = torch.linalg.svdvals(W @ torch.linalg.cholesky(X.T @ X))
    assert err == pytest.approx(float(sv[3:].square().sum()), rel=1e-8)
    # ... and data-aware beats plain SVD on that data at the same rank
    plain = svd_factors(W, 3)
    assert err < float(((W - plain.left @ plain.right) @ X.T).square().sum())


def test_collect_stats_one_pass_and_attention_mask() -> None:
    lin = nn.Linear(3, 2)
    calls = []
    lin.register_forward_hook(lambda *a: calls.append(1))
    x = torch.tensor([[[1.0, 2.0, 3.0], [9.0, 9.0, 9.0]]])  # (B=1, T=2, 3); token 1 is padding
    batch = Inputs((x,), {})
    batch.kwargs["attention_mask"] = torch.tensor([[1, 0]])

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    stats = collect_input_stats(Wrap(), {"lin": lin}, [batch], abs_mean=True, gram=True)
    assert stats["lin"].rows == 1 and len(calls) == 1
    assert stats["lin"].abs_mean.tolist() == [1.0, 2.0, 3.0]


# --- layer kinds -------------------------------------------------------------------------------


def test_conv1d_equals_linear_of_the_transposed_weight() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 16).to(F64)  # nf=12 (out), nx=16 (in); weight [16, 12]
    nn.init.normal_(conv.bias)
    lin = nn.Linear(16, 12, dtype=F64)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    X = torch.randn(50, 16, dtype=F64)
    calib = [Inputs((X,), {})]
    for method in ("svd", "asvd", "svd-llm"):
        a, b = nn.Sequential(conv), nn.Sequential(lin)
        a = type(a)(*[type(conv)(12, 16).to(F64)])
        a[0].load_state_dict(conv.state_dict())
        b = nn.Sequential(nn.Linear(16, 12, dtype=F64))
        b[0].load_state_dict(lin.state_dict())
        plan_a = run_pass(a, f"decompose Conv1D rank = 4 method {method}", calib)
        run_pass(b, f"decompose Linear rank = 4 method {method}", calib)
        assert plan_a.rows[0].action == "decompose" and isinstance(a[0], LowRankLinear)
        torch.testing.assert_close(a[0](X), b[0](X))


def test_gpt2_conv1d_layers_through_the_manager() -> None:
    run = Manager(parse("decompose Conv1D rank = 0.25 method svd-llm"), tiny_gpt2()).run(
        measure=False
    )
    rows = run.steps[0].plan.rows
    assert rows and all(r.type == "Conv1D" for r in rows)
    assert all(
        isinstance(run.model.get_submodule(r.path), LowRankLinear)
        for r in rows
        if r.action != "skip"
    )
    assert run.drift is not None and run.drift < 1.0


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv2d(16, 32, 3, padding=1)
        self.c1 = nn.Conv2d(32, 32, 1, stride=1)
        self.dil = nn.Conv2d(32, 32, 3, padding=2, dilation=2)
        self.grp = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.example_inputs = (torch.randn(2, 16, 8, 8),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grp(self.dil(self.c1(self.c3(x))))


def test_conv_layers_tucker_pairs_and_refusals() -> None:
    torch.manual_seed(0)
    model = ConvNet()
    ex = Inputs(model.example_inputs, {})
    ref = ex.call(model)
    plan = run_pass(model, "decompose Conv2d rank = 0.25", [ex], ex)
    rows = {r.path: r for r in plan.rows}
    assert isinstance(model.c3, TuckerConv2d) and rows["c3"].detail["method"] == "tucker"
    assert (model.c3.rank_out, model.c3.rank_in) == (8, 4)
    assert isinstance(model.c1, LowRankConv2d) and rows["c1"].detail["method"] == "svd"
    assert isinstance(model.dil, TuckerConv2d) and model.dil.dilation == (2, 2)
    assert rows["grp"].action == "skip" and "grouped" in rows["grp"].note
    assert isinstance(model.grp, nn.Conv2d)
    assert ex.call(model).shape == ref.shape
    for r in plan.changed_rows:
        assert {"method", "rank", "energy"} <= set(r.detail)


def test_data_aware_1x1_conv() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 1, dtype=F64))
    W = model[0].weight[:, :, 0, 0].detach().clone()
    x = torch.randn(4, 16, 5, 5, dtype=F64)
    run_pass(model, "decompose Conv2d rank = 3 method svd-llm", [Inputs((x,), {})])
    assert isinstance(model[0], LowRankConv2d)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 16)
    err = float(((W - model[0].weight.detach()[:, :, 0, 0]) @ rows.T).square().sum())
    sv = torch.linalg.svdvals(W @ torch.linalg.cholesky(rows.T @ rows))
    assert err == pytest.approx(float(sv[3:].square().sum()), rel=1e-8)


def test_tucker_method_on_linear_and_svd_on_kxk_are_refused() -> None:
    model = nn.Sequential(nn.Linear(32, 32), nn.Conv2d(8, 8, 3))
    ctx = PassContext(analysis=analyze(model))
    p = DecomposePass(parse("decompose Linear rank = 0.25 method tucker").statements[0], ctx)
    rows = {r.path: r for r in p.plan(model).rows}
    assert rows["0"].action == "skip" and "tucker" in rows["0"].note
    p = DecomposePass(parse("decompose Conv2d rank = 0.25 method svd").statements[0], ctx)
    rows = {r.path: r for r in p.plan(model).rows}
    assert rows["1"].action == "skip" and "method tucker" in rows["1"].note


# --- rank rules ---------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    in_f=st.integers(2, 24),
    out_f=st.integers(2, 24),
    rank=st.integers(1, 30),
    kind=st.sampled_from(["abs", "frac", "energy"]),
)
def test_never_more_params_or_flops_than_dense(in_f: int, out_f: int, rank: int, kind: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, out_f))
    ex = Inputs((torch.randn(3, in_f),), {})
    spec = {
        "abs": f"{rank}",
        "frac": f"{min(rank, 10) / 10:.1f}",
        "energy": f"energy {min(rank, 10) / 10:.1f}",
    }[kind]
    plan = run_pass(model, f"decompose Linear rank = {spec}", [ex], ex)
    row = plan.rows[0]
    if row.action == "skip":
        assert isinstance(model[0], nn.Linear) and row.note
    else:
        assert row.params_after < row.params_before and row.flops_after < row.flops_before
        assert row.detail["rank"] <= break_even_rank(in_f, out_f)
        assert sum(p.numel() for p in model.parameters()) == row.params_after


@settings(max_examples=20, deadline=None)
@given(
    c=st.integers(2, 12), s=st.integers(2, 12), k=st.sampled_from([1, 3]), frac=st.floats(0.1, 1.0)
)
def test_conv_never_more_params_or_flops(c: int, s: int, k: int, frac: float) -> None:
    model = nn.Sequential(nn.Conv2d(c, s, k, padding=k // 2))
    ex = Inputs((torch.randn(1, c, 6, 6),), {})
    plan = run_pass(model, f"decompose Conv2d rank = {frac:.2f}", [ex], ex)
    row = plan.rows[0]
    if row.action != "skip":
        assert row.params_after < row.params_before and row.flops_after < row.flops_before
        assert sum(p.numel() for p in model.parameters()) == row.params_after


def test_energy_rank_keeps_the_threshold_of_the_data_aware_spectrum() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    X = torch.randn(128, 64) * torch.linspace(0.01, 2, 64)
    plan = run_pass(model, "decompose Linear rank = energy 0.6 method svd-llm", [Inputs((X,), {})])
    row = plan.rows[0]
    assert row.detail["energy"] >= 0.6
    assert row.detail["rank"] <= break_even_rank(64, 64)


def test_round_gives_multiples() -> None:
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 100))
    plan = run_pass(model, "decompose Linear rank = 0.3 round 16")
    assert [r.detail["rank"] for r in plan.rows] == [32, 32]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 40)
    )
    with torch.no_grad():  # different spectra per layer
        model[0].weight.mul_(torch.logspace(0, -2, 48))
    return model


@pytest.mark.parametrize("resource", ["params", "flops"])
@pytest.mark.parametrize("method", ["svd", "svd-llm"])
@pytest.mark.parametrize("round_", [1, 8])
def test_budget_is_met_within_one_rank_step(resource: str, method: str, round_: int) -> None:
    model = _mlp()
    ex = Inputs((torch.randn(6, 48),), {})
    text = f"decompose Linear budget {resource} 40% method {method}" + (
        f" round {round_}" if round_ > 1 else ""
    )
    dense = {
        p: (m.in_features, m.out_features)
        for p, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }
    plan = run_pass(model, text, [ex, ex], ex)
    assert any("budget" in n for n in plan.notes)
    tokens = 6
    layers = {
        p: LayerSpectrum(p, i, o, tokens, torch.ones(min(i, o))) for p, (i, o) in dense.items()
    }
    ranks = {
        r.path: (r.detail["rank"] if r.action != "skip" else min(dense[r.path])) for r in plan.rows
    }
    total = sum(layer_cost(layers[p], min(i, o), resource) for p, (i, o) in dense.items())
    used = sum(layer_cost(layers[p], ranks[p], resource) for p in dense)
    assert used <= 0.4 * total
    for p, (i, o) in dense.items():
        r = ranks[p]
        if r < min(i, o):
            step = round_ if break_even_rank(i, o) >= round_ else 1
            nxt = r + step if r + step <= break_even_rank(i, o) else min(i, o)
            extra = layer_cost(layers[p], nxt, resource) - layer_cost(layers[p], r, resource)
            assert used + extra > 0.4 * total
            assert r % step == 0


def test_infeasible_budget_is_a_located_error() -> None:
    from surgery.passes.base import PassError

    model = _mlp()
    with pytest.raises(PassError) as err:
        run_pass(model, "decompose Linear budget params 1%")
    assert "infeasible" in err.value.diagnostic.message


# --- checker and manager -------------------------------------------------------------------------


def test_checker_knows_the_implemented_options() -> None:
    ok = "decompose Linear budget flops 50% method svd-llm round 8 progressive 2 steps"
    assert check(parse(ok)) == []
    assert check(parse("decompose Conv1D rank = energy 0.9 method asvd")) == []
    assert check(parse("decompose Linear rank = 0.25 keep if faster")) == []
    assert check(parse("decompose Linear where speedup > 1.2 rank = 0.25")) == []
    diags = check(parse("sparsify Linear where speedup > 1.2 2:4"))
    assert len(diags) == 1 and "where speedup" in diags[0].message
    assert "not implemented" in diags[0].message


def test_heal_support_table_makes_heal_checkable() -> None:
    from surgery.heal import HEAL_SUPPORT

    table: Support = support()
    for verb, (options, types) in HEAL_SUPPORT.items():
        table.add(verb, options, types)
    text = "decompose Linear rank = 0.25\nfreeze first-factor\nheal steps 10 lr 1e-3 subset 50% by importance every 5 steps"
    assert check(parse(text), table) == []


def test_manager_svd_llm_on_tiny_bert() -> None:
    model = tiny_bert()
    run = Manager(parse("decompose Linear rank = 0.25 method svd-llm"), model).run(measure=False)
    rows = run.steps[0].plan.rows
    changed = [r for r in rows if r.action != "skip"]
    assert changed and all(r.detail["method"] == "svd-llm" for r in changed)
    assert all(0.0 < r.detail["energy"] <= 1.0 and r.detail["rank"] == 8 for r in changed)
    assert run.params_after < run.params_before
    assert run.drift is not None and run.drift < 0.5
    plain = Manager(parse("decompose Linear rank = 0.25 method svd"), tiny_bert()).run(
        measure=False
    )
    assert plain.drift is not None and run.drift < plain.drift
