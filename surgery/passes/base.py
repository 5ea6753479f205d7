"""The pass interface: a recipe statement becomes a pass that plans, then applies, a change.

A pass is configured at construction from one AST statement and is a
``torch.fx.passes.infra.pass_base.PassBase``: calling it on a module (an ``nn.Module`` or a
``GraphModule``) returns a ``PassResult``, so it works with torch's own pass manager. The
surgery :class:`~surgery.manager.Manager` adds what a single pass does not do: it lints the
model after every pass, measures drift and records provenance.

Two steps, so ``surgery plan`` can show what would happen without changing anything:

* :meth:`SurgeryPass.plan` reads the model and its :class:`~surgery.facts.Analysis` and
  returns a :class:`StepPlan` (one :class:`PlanRow` per matched module);
* :meth:`SurgeryPass.apply` carries the plan out on the model in place and returns the
  :class:`Change` records (what changed where, by which recipe line).

>>> import torch
>>> from surgery.parse import parse
>>> from surgery.passes import pass_for
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
>>> stmt = parse("decompose Linear where out_features > 32 rank = 8").statements[0]
>>> result = pass_for(stmt)(model)
>>> result.modified, type(result.graph_module[0]).__name__
(True, 'LowRankLinear')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from surgery.diagnostics import Diagnostic, first_line
from surgery.facts import Analysis
from surgery.nodes import StatementNode
from surgery.timing import LayerTimer
from surgery.verbs import BY_KEYWORD

__all__ = [
    "Change",
    "PassContext",
    "PassError",
    "PlanRow",
    "StepPlan",
    "SurgeryPass",
    "TrainingHook",
]


@dataclass
class PlanRow:
    """What a pass will do to one module (or one block, head group, ...)."""

    path: str
    type: str
    shape: str  # human-readable, e.g. "384→1536" or "12 heads"
    action: str  # the verb, or "skip" when the module is left unchanged
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    detail: dict[str, Any] = field(default_factory=dict)  # e.g. {"rank": 96, "energy": 0.91}
    note: str = ""  # why a module is skipped, or what else changes with it

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "type": self.type,
            "shape": self.shape,
            "action": self.action,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "detail": self.detail,
            "note": self.note,
        }


@dataclass
class StepPlan:
    """The plan of one recipe statement."""

    keyword: str
    statement: str  # canonical recipe text of the statement
    line: int
    rows: list[PlanRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # pass-private data for apply()

    @property
    def changed_rows(self) -> list[PlanRow]:
        return [r for r in self.rows if r.action != "skip"]

    def totals(self) -> dict[str, int]:
        rows = self.changed_rows
        return {
            "params_before": sum(r.params_before for r in rows),
            "params_after": sum(r.params_after for r in rows),
            "flops_before": sum(r.flops_before for r in rows),
            "flops_after": sum(r.flops_after for r in rows),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "keyword": self.keyword,
            "statement": self.statement,
            "line": self.line,
            "rows": [r.as_dict() for r in self.rows],
            "notes": list(self.notes),
            "totals": self.totals(),
        } | ({"search": self.data["auto"]} if "auto" in self.data else {})


@dataclass
class Change:
    """Provenance of one structural change: which recipe line did what to which module."""

    pass_name: str
    line: int
    col: int
    statement: str
    path: str
    action: str
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "pass": self.pass_name,
            "line": self.line,
            "col": self.col,
            "statement": self.statement,
            "path": self.path,
            "action": self.action,
            "detail": self.detail,
        }


class PassError(Exception):
    """A pass cannot run on this model; carries a located diagnostic."""

    def __init__(self, diagnostic: Diagnostic) -> None:
        super().__init__(diagnostic.message)
        self.diagnostic = diagnostic

    @classmethod
    def crashed(cls, statement: StatementNode, exc: BaseException, help: str) -> PassError:
        """``S0401`` for an unexpected failure (a pass bug) while carrying out ``statement``:
        it must still name the recipe line; ``help`` says what became of the model."""
        return cls(
            Diagnostic(
                code="S0401",
                message=f"`{statement.verb}` failed on this model: {first_line(exc)}",
                span=statement.span,
                help=help,
            )
        )


class TrainingHook:
    """What a pass asks of healing (masks to keep, regularisers, frozen factors).

    The healer calls :meth:`loss` each step (added to the distillation loss),
    :meth:`after_step` after each optimiser step, and :meth:`trainable` to filter parameters.
    """

    def loss(self, model: nn.Module) -> Any:
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        return None

    def trainable(self, name: str, model: nn.Module) -> bool:
        return True


@dataclass
class PassContext:
    """What a pass may read besides the model. Built by the manager (or lazily, standalone)."""

    analysis: Analysis
    example: Any | None = None  # surgery.inputs.Inputs
    calibration: list[Any] = field(default_factory=list)  # list[surgery.inputs.Inputs]
    original: nn.Module | None = None  # the untouched input model (for distillation, drift)
    strict: bool = False  # selectors that match nothing are errors, not warnings
    warnings: list[Diagnostic] = field(default_factory=list)
    progress: Callable[[str, int, int], None] | None = None  # (what, done, total)
    # Times single layers on the recipe's first target (`keep if faster`, `where speedup`);
    # the manager builds it, so passes never import a backend.
    timer: LayerTimer | None = None
    # The recipe's `expect` statements (the program's contracts): `rank = auto` and
    # `budget latency` aim their rank search at them (surgery.passes.auto_rank).
    contracts: tuple[Any, ...] = ()
    # How much tighter than written that search aims after a measured miss
    # (surgery.passes.auto_rank.refine): speedup targets times `speedup_margin` (≥ 1), drift
    # caps times `drift_margin` (≤ 1).
    speedup_margin: float = 1.0
    drift_margin: float = 1.0

    def warn(self, diagnostic: Diagnostic) -> None:
        self.warnings.append(diagnostic)


S = TypeVar("S", bound=StatementNode)


class SurgeryPass(PassBase, Generic[S]):
    """Base of every recipe pass, generic in its statement type: ``class GroupPass(
    SurgeryPass[ast.Group])`` sets only ``keyword``; its statement type, implemented options
    and module types come from the verb's entry in :data:`surgery.verbs.VERBS`."""

    keyword: ClassVar[str]
    statement_type: ClassVar[type[StatementNode]]
    # Module types the pass handles (for verbs with a selector); the checker reports others.
    supported_types: ClassVar[tuple[str, ...]] = ()
    # Options of the statement that this pass implements; any other option given in a recipe
    # is reported by the checker as not implemented yet (never silently ignored).
    implemented_options: ClassVar[dict[str, set[str] | None]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        verb = BY_KEYWORD.get(getattr(cls, "keyword", ""))
        if verb is not None:  # the one home of what a verb's pass handles
            cls.statement_type = verb.node
            cls.implemented_options = verb.support.options
            cls.supported_types = verb.support.types

    def __init__(
        self, statement: S, context: PassContext | None = None, *, member: int = 1
    ) -> None:
        super().__init__()
        if not isinstance(statement, self.statement_type):
            raise TypeError(
                f"{type(self).__name__} takes a `{self.statement_type.__name__}` statement"
            )
        self.statement: S = statement
        self.context = context
        self.family_step = member  # which member of a progressive family this pass builds

    @property
    def line(self) -> int:
        return int(self.statement.span.line)

    def statement_text(self) -> str:
        from surgery.fmt import format_statement

        return format_statement(self.statement)

    def new_plan(self) -> StepPlan:
        return StepPlan(keyword=self.keyword, statement=self.statement_text(), line=self.line)

    def change(self, path: str, action: str, **detail: Any) -> Change:
        return Change(
            pass_name=self.keyword,
            line=self.statement.span.line,
            col=self.statement.span.col,
            statement=self.statement_text(),
            path=path,
            action=action,
            detail=detail,
        )

    def moved(self, path: str, what: str) -> PassError:
        """The error for a planned module that is no longer what the plan expected."""
        return PassError(
            Diagnostic(
                code="S0410",
                message=f"`{path}` is no longer a `{what}`",
                span=self.statement.span,
                help="an earlier statement replaced it; reorder the recipe",
            )
        )

    def ensure_context(self, model: nn.Module) -> PassContext:
        """The context given at construction, or a static one built from ``model``."""
        if self.context is None:
            from surgery.graph import analyze

            self.context = PassContext(analysis=analyze(model, None))
        return self.context

    def plan(self, model: nn.Module) -> StepPlan:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, model: nn.Module, plan: StepPlan) -> list[Change]:  # pragma: no cover
        raise NotImplementedError

    def run(self, model: nn.Module) -> tuple[StepPlan, list[Change]]:
        """Plan and apply on ``model`` in one go: what ``surgery apply`` calls.

        The default is :meth:`plan` then :meth:`apply`. A pass may override it to apply as it
        plans (decompose streams: each layer is replaced as soon as it is factored), so the
        plan never holds every layer's new weights at once. The result must equal
        ``plan`` followed by ``apply``.
        """
        plan = self.plan(model)
        return plan, self.apply(model, plan)

    def family_steps(self) -> int:
        """How many members the statement builds (``progressive K steps``: K; else 1): its
        verb's ``members`` (`surgery.verbs`), which the program's steps carry too.

        The manager constructs the pass once per member (``member=k``), heals in between when
        the recipe heals, and saves each member.
        """
        return BY_KEYWORD[self.keyword].members(self.statement)

    def training_hooks(self, model: nn.Module) -> list[TrainingHook]:
        """Hooks the healer must honour after this pass ran (none by default)."""
        return []

    def call(self, graph_module: nn.Module) -> PassResult:  # type: ignore[override]
        """torch's PassBase entry point: plan and apply on ``graph_module`` in place."""
        self.ensure_context(graph_module)
        plan = self.plan(graph_module)
        changes = self.apply(graph_module, plan)
        return PassResult(graph_module, bool(changes))
