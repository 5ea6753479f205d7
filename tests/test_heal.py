"""`heal` (label-free distillation), `freeze` (sequential freezing) and subset selection."""

from __future__ import annotations

import torch
from torch import nn

from surgery.graph import analyze
from surgery.heal import DEFAULT_LR, HEAL_SUPPORT, HealReport, frozen_names, heal
from surgery.inputs import Inputs
from surgery.lowrank import svd_factors
from surgery.modules import LowRankLinear
from surgery.modules.tucker_conv import TuckerConv2d
from surgery.parse import parse
from surgery.passes.base import PassContext, TrainingHook


def _setup(batches: int = 3) -> tuple[nn.Module, nn.Module, PassContext]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    student = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    student.load_state_dict(teacher.state_dict())
    student[0] = LowRankLinear.from_factors(student[0], svd_factors(student[0].weight, 4))
    calib = [Inputs((torch.randn(8, 16),), {}) for _ in range(batches)]
    ctx = PassContext(analysis=analyze(student), calibration=calib, original=teacher)
    return teacher, student, ctx


def _heal(
    student: nn.Module,
    ctx: PassContext,
    text: str,
    freeze: str | None = None,
    hooks: list[TrainingHook] | None = None,
) -> HealReport:
    stmt = parse(text).statements[0]
    fz = parse(f"freeze {freeze}").statements[0] if freeze else None
    return heal(student, stmt, ctx, freeze=fz, hooks=hooks or [])


def test_heal_reduces_the_loss_and_reports() -> None:
    _, student, ctx = _setup()
    seen: list[tuple[str, int, int]] = []
    ctx.progress = lambda what, done, total: seen.append((what, done, total))
    report = _heal(student, ctx, "heal steps 40 lr 1e-2 distill from original")
    assert report.steps == 40 and len(report.losses) == 40
    assert report.losses[-1] < 0.5 * report.losses[0]
    assert report.trainable_params == sum(p.numel() for p in student.parameters())
    assert report.frozen_params == 0 and report.seconds > 0
    assert seen[-1][0].startswith("healing · loss ") and seen[-1][1:] == (40, 40)
    assert not student.training
    assert all(p.requires_grad for p in student.parameters())
    assert set(report.as_dict()) >= {
        "steps",
        "losses",
        "seconds",
        "trainable_params",
        "frozen_params",
    }
    assert _heal(student, ctx, "heal steps 1").lr == DEFAULT_LR


def test_loss_is_normalised_by_the_teacher_mean_square() -> None:
    teacher, student, ctx = _setup(batches=1)
    x = ctx.calibration[0].args[0]
    with torch.no_grad():
        expected = float((student(x) - teacher(x)).square().sum() / teacher(x).square().sum())
    report = _heal(student, ctx, "heal steps 1 lr 1e-12")
    assert abs(report.losses[0] - expected) < 1e-6


def test_teacher_outputs_are_cached_once() -> None:
    teacher, student, ctx = _setup(batches=2)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    _heal(student, ctx, "heal steps 6")
    assert len(calls) == 2


def test_first_factor_frozen_second_trained() -> None:
    _, student, ctx = _setup()
    first = student[0].first.weight.detach().clone()
    second = student[0].second.weight.detach().clone()
    other = student[2].weight.detach().clone()
    report = _heal(student, ctx, "heal steps 3 lr 1e-2", freeze="first-factor")
    assert torch.equal(student[0].first.weight, first)
    assert not torch.equal(student[0].second.weight, second)
    assert not torch.equal(student[2].weight, other)  # not a factor: stays trainable
    assert report.frozen_params == first.numel()


def test_freeze_core_on_tucker() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    student = nn.Sequential(TuckerConv2d.from_conv(teacher[0], rank_out=3, rank_in=2))
    ctx = PassContext(
        analysis=analyze(student),
        calibration=[Inputs((torch.randn(2, 4, 6, 6),), {})],
        original=teacher,
    )
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    _heal(student, ctx, "heal steps 2 lr 1e-2", freeze="core")
    after = dict(student.named_parameters())
    assert torch.equal(after["0.first.weight"], before["0.first.weight"])
    assert torch.equal(after["0.last.weight"], before["0.last.weight"])
    assert not torch.equal(after["0.core.weight"], before["0.core.weight"])


def test_alternate_switches_the_frozen_factor() -> None:
    _, student, ctx = _setup()
    f0 = student[0].first.weight.detach().clone()
    s0 = student[0].second.weight.detach().clone()
    _heal(student, ctx, "heal steps 1 lr 1e-2 every 1 steps", freeze="alternate")  # phase 0
    assert torch.equal(student[0].first.weight, f0) and not torch.equal(
        student[0].second.weight, s0
    )
    f1 = student[0].first.weight.detach().clone()
    s1 = student[0].second.weight.detach().clone()
    _heal(student, ctx, "heal steps 2 lr 1e-2 every 1 steps", freeze="alternate")  # phases 0, 1
    assert not torch.equal(student[0].first.weight, f1) and not torch.equal(
        student[0].second.weight, s1
    )
    names = frozen_names(student, "alternate", 1)
    assert names == {"0.second.weight", "0.second.bias"}


def test_hooks_are_honoured() -> None:
    _, student, ctx = _setup()

    class Hook(TrainingHook):
        def __init__(self) -> None:
            self.steps: list[int] = []
            self.losses = 0

        def loss(self, model: nn.Module) -> torch.Tensor:
            self.losses += 1
            return 0.0 * model[2].weight.sum()

        def after_step(self, model: nn.Module, step: int) -> None:
            self.steps.append(step)

        def trainable(self, name: str, model: nn.Module) -> bool:
            return not name.startswith("2.")

    hook = Hook()
    last = student[2].weight.detach().clone()
    report = _heal(student, ctx, "heal steps 4 lr 1e-2", hooks=[hook])
    assert hook.steps == [0, 1, 2, 3] and hook.losses == 4
    assert torch.equal(student[2].weight, last)
    assert report.frozen_params == sum(p.numel() for p in student[2].parameters())


def test_subset_by_importance() -> None:
    _, student, ctx = _setup(batches=4)
    report = _heal(student, ctx, "heal steps 9 lr 1e-2 subset 50% by importance every 3 steps")
    assert len(report.subsets) == 2 and all(len(s) == 2 for s in report.subsets)
    assert len(report.losses) == 9


def test_heal_support_table_format() -> None:
    assert set(HEAL_SUPPORT) == {"heal", "freeze"}
    options, types = HEAL_SUPPORT["freeze"]
    assert options["what"] == {"first-factor", "core", "alternate"} and types == ()
    assert "lr" in HEAL_SUPPORT["heal"][0]


def test_lowrank_pair_is_a_factor_for_freezing() -> None:
    m = nn.Sequential(LowRankLinear(4, 4, rank=2))
    assert frozen_names(m, "first-factor") == {"0.first.weight"}
    assert frozen_names(m, None) == set()
