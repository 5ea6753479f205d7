"""The typed program between a checked recipe and the manager: ``lower(recipe) -> Program``.

The recipe says *what*, in the order the user wrote it; the program says *how the run goes*:
its configuration (calibration data, targets, contracts) and its steps, in order. A
:class:`PassStep` carries out one statement by its pass, once per member of its family
(``progressive K steps``: K members), with the heal to run between members attached; a
:class:`HealStep` fine-tunes with the ``freeze`` and ``regularize`` statements that apply to
it attached. The manager loops over the steps and never scans the recipe.

No torch: ``surgery plan`` and tests read a program without a model.

>>> from surgery.parse import parse
>>> p = lower(parse('''calibrate with "c.pt" samples 32
... decompose Linear rank = 0.5 progressive 2 steps
... freeze core
... heal steps 10
... target onnx
... expect speedup > 1.2 on onnx'''))
>>> p.calibration.source, p.calibration.samples, p.calibration.batch
('c.pt', 32, 8)
>>> [type(s).__name__ for s in p.steps], p.steps[0].members, p.steps[0].heal_between.steps
(['PassStep', 'HealStep'], 2, 10)
>>> p.steps[1].freeze.what.value, p.targets[0]
('core', TargetSpec(backend='onnx', device=None, trials=None))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from surgery import ast
from surgery.verbs import BY_KEYWORD

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_SAMPLES",
    "CalibrationSpec",
    "HealStep",
    "PassStep",
    "Program",
    "Step",
    "TargetSpec",
    "lower",
]

#: Calibration samples and batch size when the recipe does not say (``calibrate`` is optional:
#: without a file the model's own example inputs are drawn).
DEFAULT_SAMPLES = 16
DEFAULT_BATCH = 8


class TargetSpec(NamedTuple):
    """``target BACKEND [DEVICE] [trials N]`` (device None: the backend's default)."""

    backend: str
    device: str | None = None
    trials: int | None = None


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration inputs come from (``source`` None: drawn from the model), how many."""

    source: str | None = None
    samples: int = DEFAULT_SAMPLES
    batch: int = DEFAULT_BATCH


@dataclass(frozen=True)
class HealStep:
    """``heal …`` with what applies to it: the last ``freeze`` and every ``regularize`` written
    before it."""

    statement: ast.Heal
    freeze: ast.Freeze | None = None
    regularizers: tuple[ast.Regularize, ...] = ()

    @property
    def steps(self) -> int:
        return self.statement.steps.value


@dataclass(frozen=True)
class PassStep:
    """One statement carried out by its pass, ``members`` times (a progressive family).

    Between two members the run heals with ``heal_between`` (the first ``heal`` written after
    the statement, if any) and keeps each member; the last member is kept after the next step
    when that step is a heal (``kept_after_next_heal``), else at once.
    """

    statement: ast.Statement
    members: int = 1
    heal_between: HealStep | None = None
    kept_after_next_heal: bool = False


Step = PassStep | HealStep


@dataclass(frozen=True)
class Program:
    """What a run does, in order, and what it is measured against."""

    recipe: ast.Recipe
    steps: tuple[Step, ...] = ()
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    targets: tuple[TargetSpec, ...] = ()
    contracts: tuple[ast.Expect, ...] = ()


def _heal_step(statements: list[ast.Statement], index: int) -> HealStep:
    stmt = statements[index]
    assert isinstance(stmt, ast.Heal)
    before = statements[:index]
    freeze = next((s for s in reversed(before) if isinstance(s, ast.Freeze)), None)
    regularizers = tuple(s for s in before if isinstance(s, ast.Regularize))
    return HealStep(stmt, freeze, regularizers)


def lower(recipe: ast.Recipe) -> Program:
    """The program of a checked recipe (``surgery.check`` has found no error in it)."""
    statements = list(recipe.statements)
    heals = {i: _heal_step(statements, i) for i, s in enumerate(statements) if s.verb == "heal"}
    work = [i for i, s in enumerate(statements) if BY_KEYWORD[s.verb].pass_path or s.verb == "heal"]
    steps: list[Step] = []
    for n, i in enumerate(work):
        stmt = statements[i]
        if i in heals:
            steps.append(heals[i])
            continue
        later_heal = next((heals[j] for j in sorted(heals) if j > i), None)
        steps.append(
            PassStep(
                statement=stmt,
                members=BY_KEYWORD[stmt.verb].members(stmt),
                heal_between=later_heal,
                kept_after_next_heal=n + 1 < len(work) and work[n + 1] in heals,
            )
        )
    calibrate = next((s for s in statements if isinstance(s, ast.Calibrate)), None)
    calibration = CalibrationSpec()
    if calibrate is not None:
        calibration = CalibrationSpec(
            source=calibrate.source.value,
            samples=calibrate.samples.value if calibrate.samples else DEFAULT_SAMPLES,
            batch=calibrate.batch.value if calibrate.batch else DEFAULT_BATCH,
        )
    targets = tuple(
        TargetSpec(
            s.backend.value,
            s.device.value if s.device else None,
            s.trials.value if s.trials else None,
        )
        for s in statements
        if isinstance(s, ast.Target)
    )
    contracts = tuple(s for s in statements if isinstance(s, ast.Expect))
    return Program(recipe, tuple(steps), calibration, targets, contracts)
