"""`regularize nuclear λ [every M steps]`: TRP hooks driven by a tiny manual training loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery.modules.lowrank_linear import LowRankLinear
from surgery.parse import parse
from surgery.passes.regularize import (
    DEFAULT_EVERY,
    NuclearRegularizer,
    hooks_for,
    nuclear_targets,
    project_energy,
)

F64 = torch.float64


def _rank(w: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(w.detach().to(F64)))


def test_projection_with_full_energy_is_identity() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 12))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ranks = NuclearRegularizer(strength=0.0, energy=1.0).project(model)
    assert ranks == {"0": 8, "2": 8}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_projection_below_full_energy_reduces_rank(energy: float) -> None:
    torch.manual_seed(0)
    w = torch.randn(20, 16, dtype=F64)
    s = torch.linalg.svdvals(w)
    rank = project_energy(w, energy)
    assert _rank(w) == rank < 16
    kept = torch.linalg.svdvals(w)[:rank]
    torch.testing.assert_close(kept, s[:rank])  # truncation keeps the leading spectrum
    assert float(s[:rank].square().sum() / s.square().sum()) >= energy


def test_shrink_step_is_the_clipped_nuclear_subgradient() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 5, bias=False, dtype=F64)
    u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    lam = float(s.min()) / 2  # every σ ≥ λ: the step equals W − λ·U Vᵀ exactly
    NuclearRegularizer(strength=lam, every=None).after_step(nn.Sequential(lin), 0)
    torch.testing.assert_close(lin.weight.detach(), (u * s) @ vh - lam * u @ vh)


def test_loss_mode_gradient_is_lambda_u_vt() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 5, bias=False, dtype=F64)
    hook = NuclearRegularizer(strength=0.1, every=None, mode="loss")
    loss = hook.loss(nn.Sequential(lin))
    assert loss is not None
    loss.backward()
    u, _, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    assert lin.weight.grad is not None
    torch.testing.assert_close(lin.weight.grad, 0.1 * u @ vh)
    assert NuclearRegularizer(strength=0.1).loss(nn.Sequential(lin)) is None  # step mode


def test_manual_training_loop_prunes_rank() -> None:
    """TRP in a tiny loop: fit a rank-2 target; shrinkage + projection find a low rank."""
    torch.manual_seed(0)
    target = torch.randn(16, 2, dtype=F64) @ torch.randn(2, 16, dtype=F64)
    model = nn.Sequential(nn.Linear(16, 16, bias=False, dtype=F64))
    hook = NuclearRegularizer(strength=1e-3, every=5, energy=0.99)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(256, 16, dtype=F64)
    for step in range(60):
        loss = (model(x) - x @ target.T).square().mean()
        extra = hook.loss(model)
        if extra is not None:
            loss = loss + extra
        opt.zero_grad()
        loss.backward()
        opt.step()
        hook.after_step(model, step)
    assert hook.ranks["0"] <= 4
    assert _rank(model[0].weight) == hook.ranks["0"]


def test_projection_happens_every_m_steps() -> None:
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    hook = NuclearRegularizer(strength=0.0, every=3, energy=0.5)
    for step in range(2):
        hook.after_step(model, step)
    assert hook.ranks == {}
    hook.after_step(model, 2)  # the third step
    assert hook.ranks["0"] < 8


def test_targets_skip_lowrank_factors_and_tied_weights() -> None:
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict(
        {"emb": emb, "head": head, "lr": LowRankLinear(8, 8, rank=2), "mlp": nn.Linear(8, 8)}
    )
    assert set(nuclear_targets(model)) == {"mlp"}


def test_hooks_for_statement() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    [hook] = hooks_for(parse("regularize nuclear 3e-4 every 10 steps").statements[0], model)
    assert isinstance(hook, NuclearRegularizer)
    assert (hook.strength, hook.every, hook.energy, hook.mode) == (3e-4, 10, 0.99, "step")
    [default] = hooks_for(parse("regularize nuclear 1e-3").statements[0], model)
    assert isinstance(default, NuclearRegularizer) and default.every == DEFAULT_EVERY
    with pytest.raises(ValueError, match="only `nuclear`"):
        hooks_for(parse("regularize l1 1e-3").statements[0], model)
