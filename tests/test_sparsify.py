"""`sparsify Linear N:M`: semi-structured masks, Wanda scores, masks kept while healing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from surgery.inputs import Inputs
from surgery.modules.registry import build
from surgery.modules.sparse import SparseLinear, nm_mask, semi_structured_available
from surgery.parse import parse
from surgery.passes.base import PassContext
from surgery.passes.sparsify import CPU_NOTE, KeepMasks, SparsifyPass, input_norms


def _groups(mask: torch.Tensor, m: int) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1, m).sum(-1)  # [out, in/M] kept per group


@settings(max_examples=40, deadline=None)
@given(
    nm=st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2), (3, 3)]),
    out_f=st.integers(1, 9),
    groups=st.integers(1, 5),
    seed=st.integers(0, 10_000),
)
def test_nm_mask_keeps_exactly_n_largest(
    nm: tuple[int, int], out_f: int, groups: int, seed: int
) -> None:
    n, m = nm
    w = torch.randn(out_f, groups * m, generator=torch.Generator().manual_seed(seed))
    mask = nm_mask(w.abs(), n, m)
    assert bool((_groups(mask, m) == n).all())
    kept = w.abs().masked_fill(~mask, float("inf")).reshape(out_f, groups, m).amin(-1)
    dropped = w.abs().masked_fill(mask, float("-inf")).reshape(out_f, groups, m).amax(-1)
    assert bool((kept >= dropped).all())  # every kept |w| is at least every dropped one


def test_nm_mask_ties_still_keep_n() -> None:
    assert bool((_groups(nm_mask(torch.zeros(3, 8), 2, 4), 4) == 2).all())


def test_mask_survives_an_optimiser_step_with_the_hook() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    SparsifyPass(parse("sparsify Linear 2:4").statements[0])(model)
    hook = KeepMasks()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        loss = model(torch.randn(8, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        # AdamW's decoupled weight decay alone moves pruned weights off zero... and back
        hook.after_step(model, step)
    for layer in (model[0], model[2]):
        assert isinstance(layer, SparseLinear)
        nonzero = layer.weight.detach() != 0
        assert bool((_groups(nonzero, 4) <= 2).all())
        assert bool((_groups(layer.mask, 4) == 2).all())
        assert not bool(nonzero[~layer.mask].any())


def test_without_the_hook_pruned_weights_would_move() -> None:
    """Why the hook exists: the forward masks, but weight decay still revives pruned weights."""
    lin = SparseLinear.from_linear(nn.Linear(8, 4), 2, 4)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=0.5)
    lin(torch.randn(3, 8)).sum().backward()
    with torch.no_grad():
        lin.weight[~lin.mask] = 1.0  # stands for drift of pruned entries
    opt.step()
    assert bool(lin.weight[~lin.mask].ne(0).any())
    KeepMasks().after_step(nn.Sequential(lin), 0)
    assert not bool(lin.weight[~lin.mask].ne(0).any())


def test_pass_end_to_end_plan_and_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 6), nn.Linear(6, 2))
    dense_first = model[0].weight.detach().clone()
    p = SparsifyPass(parse("sparsify Linear 2:4").statements[0])
    p.ensure_context(model)
    plan = p.plan(model)
    assert CPU_NOTE in plan.notes
    actions = {r.path: r.action for r in plan.rows}
    assert actions == {
        "0": "sparsify",
        "2": "sparsify",
        "3": "skip",
    }  # 6 inputs: not a multiple of 4
    row = plan.rows[0]
    assert row.params_after == 32 * 16 // 2 + 32 and row.flops_after == row.flops_before
    p.apply(model, plan)
    assert isinstance(model[0], SparseLinear) and isinstance(model[3], nn.Linear)
    torch.testing.assert_close(model[0].weight, dense_first * model[0].mask)
    assert p.training_hooks(model) and isinstance(p.training_hooks(model)[0], KeepMasks)


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def test_wanda_scores_with_calibration_inputs() -> None:
    from surgery.graph import analyze

    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0] * 2] * 4)  # [4, 8]
    # inputs 0 and 1 of each group are huge: Wanda keeps them although their |w| is small
    x = torch.tensor([[100.0, 100.0, 1.0, 1.0] * 2] * 3)  # (3, 8)
    model = nn.Sequential(_linear(weight))
    norms = input_norms(model, ["0"], [Inputs((x,), {})])
    torch.testing.assert_close(norms["0"], x.to(torch.float64).norm(dim=0))
    ctx = PassContext(analysis=analyze(model, None), calibration=[Inputs((x,), {})])
    p = SparsifyPass(parse("sparsify Linear 2:4").statements[0], ctx)
    plan = p.plan(model)
    assert plan.rows[0].detail["score"] == "wanda"
    p.apply(model, plan)
    assert isinstance(model[0], SparseLinear)
    assert model[0].mask[0].int().tolist() == [1, 1, 0, 0, 1, 1, 0, 0]
    magnitude = SparseLinear.from_linear(_linear(weight), 2, 4)  # no calibration: |w| only
    assert magnitude.mask[0].int().tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


@pytest.mark.parametrize("pattern", ["0:4", "4:4", "5:4", "2:0"])
def test_check_rejects_what_sparsify_does_not_revalidate(pattern: str) -> None:
    from surgery.check import check

    assert [d.code for d in check(parse(f"sparsify Linear {pattern}"))] == ["S0203"]


@pytest.mark.parametrize(("n", "m", "bias"), [(2, 4, True), (1, 4, False), (4, 8, True)])
def test_save_reload(n: int, m: int, bias: bool) -> None:
    module = SparseLinear.from_linear(nn.Linear(16, 5, bias=bias, dtype=torch.float64), n, m)
    rebuilt = build(module.registry_name(), module.spec())
    rebuilt.load_state_dict(module.state_dict())
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.equal(rebuilt(x), module(x)) and torch.equal(rebuilt.mask, module.mask)


def test_to_semi_structured_is_guarded() -> None:
    module = SparseLinear(16, 8)
    if semi_structured_available():
        pytest.skip("a CUDA device is present; bench/sparsity.py measures the conversion")
    with pytest.raises(RuntimeError, match="CUDA"):
        module.to_semi_structured()
    with pytest.raises(RuntimeError, match="2:4"):
        SparseLinear(16, 8, n=1, m=4).to_semi_structured()


@pytest.mark.skipif(not semi_structured_available(), reason="needs CUDA with sm >= 8.0")
def test_to_semi_structured_on_cuda() -> None:  # pragma: no cover - no GPU in CI
    module = SparseLinear.from_linear(nn.Linear(128, 128), 2, 4).half().cuda()
    fast = module.to_semi_structured()
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    torch.testing.assert_close(fast(x), module(x), rtol=1e-2, atol=1e-2)
