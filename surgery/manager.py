"""The pass manager: runs a checked recipe on a model, step by step.

The recipe is lowered first (:func:`surgery.program.lower`): the manager loops over the
program's steps and reads the run's configuration from it, never from the recipe. For each
pass step (once per member of a progressive family, healing in between when the recipe
heals), the manager

1. plans it against the current model and its analysis (a selector that matches nothing is
   a warning naming the nearest modules, an error with ``strict``);
2. applies it to a *copy* of the model, so a pass that fails leaves the model untouched and
   the error names the recipe line;
3. lints the result: the model must still run on the example inputs with the same output
   shapes and finite values; it measures the drift (relative output error against the
   original) and records every change with its pass and recipe line.

Statements that are not passes configure the run: ``calibrate`` (inputs for data-aware
passes, drift and timing: :func:`surgery.inputs.prepare_inputs`), ``target`` (where speed is
measured, and the layer timer passes use) and ``expect`` (contracts checked at the end:
:mod:`surgery.contracts`).

>>> import torch
>>> from surgery.parse import parse
>>> from surgery.inputs import Inputs
>>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
>>> model.example_inputs = ((torch.randn(4, 256),), {})
>>> run = Manager(parse("decompose Linear where out_features > 8 rank = 0.25"), model).run(measure=False)
>>> [c.path for c in run.changes], run.steps[0].drift < 1.0
(['0'], True)
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from surgery import ast
from surgery.contracts import Contract, Measured, evaluate
from surgery.diagnostics import Diagnostic, first_line
from surgery.facts import Analysis
from surgery.heal_checkpoint import CheckpointError
from surgery.heal_data import HealDataError
from surgery.inputs import (
    InputError,
    Inputs,
    flatten_outputs,
    held_out_inputs,
    prepare_inputs,
)
from surgery.load import LoadedModel
from surgery.metrics import drift, padding_mask
from surgery.passes import (
    Change,
    PassContext,
    PassError,
    StepPlan,
    SurgeryPass,
    TrainingHook,
    pass_for,
)
from surgery.passes.auto_rank import Margins, measured_for, refine
from surgery.program import HealStep, TargetSpec, lower
from surgery.quality import QualityError, QualityReport, UserMetric, measure_quality
from surgery.select import no_match_help
from surgery.support import RUN_VERBS
from surgery.timing import LayerTimer, Speedup, measure_speedup

__all__ = ["MANAGER_SUPPORT", "Contract", "Manager", "Member", "Run", "Step", "drift"]

# Statements the manager itself carries out: verb -> (implemented options, types).
MANAGER_SUPPORT: dict[str, tuple[dict[str, set[str] | None], tuple[str, ...]]] = dict(RUN_VERBS)

Progress = Callable[[str, int, int], None]


@dataclass
class Step:
    """One statement as it ran."""

    statement: Any
    plan: StepPlan
    changes: list[Change]
    drift: float | None  # on the first calibration batch, after this step
    seconds: float
    params: int  # of the whole model after this step
    family_member: int | None = None  # progressive step index, when the pass builds a family


class Member(NamedTuple):
    """One member of a progressive family, kept as it was: saved as ``OUT/step-<index>``."""

    step: int  # which member (1-based): `progressive K steps` builds steps 1..K
    model: nn.Module
    drift: float  # on the probe batch
    changes: list[Change]  # the provenance of this member: every change made before it was kept


@dataclass
class Run:
    """Everything a recipe run produced: the model, the plan, the evidence."""

    recipe: ast.Recipe
    original: nn.Module
    model: nn.Module
    loaded: LoadedModel | None
    example: Inputs
    calibration: list[Inputs]
    before: Analysis
    after: Analysis
    steps: list[Step] = field(default_factory=list)
    warnings: list[Diagnostic] = field(default_factory=list)
    drift: float | None = None  # on `drift_rows`
    drift_rows: str = ""  # which rows the final drift was measured on (inputs.DriftRows)
    speed: Speedup | None = None
    contracts: list[Contract] = field(default_factory=list)
    family: list[Member] = field(default_factory=list)
    heals: list[Any] = field(default_factory=list)  # surgery.heal.HealReport of each `heal`
    verifications: list[Any] = field(default_factory=list)  # surgery.backends.Verification
    # drift's bootstrap interval and every contract measured on data (surgery.quality)
    quality: QualityReport | None = None

    @property
    def changes(self) -> list[Change]:
        return [c for s in self.steps for c in s.changes]

    @property
    def params_before(self) -> int:
        return self.before.total_params

    @property
    def params_after(self) -> int:
        return self.after.total_params

    @property
    def flops_before(self) -> int:
        return self.before.total_flops

    @property
    def flops_after(self) -> int:
        return self.after.total_flops

    @property
    def flop_speedup(self) -> float | None:
        """The FLOP-ideal speedup: total FLOPs before / after."""
        if self.flops_after <= 0:
            return None
        return self.flops_before / self.flops_after

    @property
    def failed_contracts(self) -> list[Contract]:
        return [c for c in self.contracts if c.held is False]


#: Reruns of a recipe whose `rank = auto` search missed, when measured, a contract it aimed at.
AUTO_RETRIES = 2


def _auto_margins(run: Run) -> Margins | None:
    """The tightest margins :func:`~surgery.passes.auto_rank.refine` asks for after ``run``
    (None: every `rank = auto` search met what it aimed at, or there is none)."""
    found: Margins | None = None
    for step in run.steps:
        margins = refine(step.plan, *measured_for(step.plan, run.contracts))
        if margins is not None:
            found = (
                margins
                if found is None
                else Margins(max(found.speedup, margins.speedup), min(found.drift, margins.drift))
            )
    return found


@dataclass
class _State:
    """The model as the run goes, with what later steps need to know about it."""

    model: nn.Module
    analysis: Analysis
    hooks: list[TrainingHook] = field(default_factory=list)


class Manager:
    """Runs ``recipe`` on a model (a :class:`LoadedModel` or a plain module)."""

    def __init__(
        self,
        recipe: ast.Recipe,
        model: LoadedModel | nn.Module,
        *,
        recipe_dir: Path | None = None,
        strict: bool = False,
        progress: Progress | None = None,
        seed: int = 0,
        max_heal_steps: int | None = None,
        checkpoint_dir: Path | None = None,
        resume: bool = False,
        parallel: Any = None,
        metrics: Mapping[str, UserMetric] | None = None,
        trust_code: bool = False,
    ) -> None:
        self.recipe = recipe
        self.program = lower(recipe)
        self.loaded = model if isinstance(model, LoadedModel) else None
        self.model: nn.Module = model.model if isinstance(model, LoadedModel) else model
        self.recipe_dir = recipe_dir or Path.cwd()
        self.strict = strict
        self.progress = progress
        self.seed = seed
        self.max_heal_steps = max_heal_steps  # a cap for quick trial runs of a recipe
        # Healing: where checkpoints go (`heal-<n>/` below it; None: none are written),
        # whether to continue from them, and the data-parallel runner (surgery.heal.Parallel;
        # None: one process).
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self.parallel = parallel
        # User metrics (`expect metric "module:function"`) the caller allows, by that name;
        # with `trust_code` any a recipe names is imported.
        self.metrics = metrics
        self.trust_code = trust_code
        self._heal_data: dict[int, Any] = {}  # id of a `heal` statement -> its TrainingData
        self._heals_run = 0
        self.extra_targets: list[TargetSpec] = []  # e.g. from --target
        self._timer: LayerTimer | None = None
        # How much tighter than the contracts the `rank = auto` search aims (raised after a
        # measured miss, see `run`).
        self.margins = Margins()
        self._probe: tuple[Inputs, Any] = (Inputs(), None)  # set by run(): (batch, outputs)

    # --- inputs -------------------------------------------------------------------------

    def _source(self) -> Any:
        return self.loaded if self.loaded is not None else self.model

    def _calibration_path(self) -> Path | None:
        spec = self.program.calibration
        if spec.source is None:
            return None
        path = Path(spec.source)
        return path if path.is_absolute() else self.recipe_dir / path

    def _inputs(self) -> tuple[Inputs, list[Inputs]]:
        spec = self.program.calibration
        return prepare_inputs(
            self._source(),
            self._calibration_path(),
            samples=spec.samples,
            batch=spec.batch,
            seed=self.seed,
        )

    def _emit(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)

    # --- running ------------------------------------------------------------------------

    def run(
        self,
        *,
        measure: bool = True,
        warmup: int = 3,
        repeats: int = 20,
        targets: list[tuple[str, str | None, int | None]] | None = None,
        workdir: Path | None = None,
    ) -> Run:
        """Run every statement; measure drift, and speed when ``measure``; check contracts.

        A ``rank = auto`` search whose measured result misses a contract it aimed at is run
        again (the whole recipe, at most :data:`AUTO_RETRIES` times) with targets tightened by
        :func:`surgery.passes.auto_rank.refine`; a retry whose targets no ranks can meet
        keeps the run before it.
        """
        self.margins = Margins()
        kwargs: dict[str, Any] = dict(
            measure=measure, warmup=warmup, repeats=repeats, targets=targets, workdir=workdir
        )
        run = self._run_once(**kwargs)
        for _ in range(AUTO_RETRIES if measure else 0):
            margins = _auto_margins(run)
            if margins is None:
                break
            self.margins = margins
            try:
                run = self._run_once(**kwargs)
            except PassError:
                break
        return run

    def _run_once(
        self,
        *,
        measure: bool = True,
        warmup: int = 3,
        repeats: int = 20,
        targets: list[tuple[str, str | None, int | None]] | None = None,
        workdir: Path | None = None,
    ) -> Run:
        """One run of every statement (see :meth:`run`).

        With ``measure``, the recipe's ``target`` statements (plus ``targets``) are lowered,
        checked and timed by `surgery.backends`, with artifacts under ``workdir``.
        """
        from surgery.graph import analyze

        self.extra_targets = [TargetSpec(*t) for t in targets or []]
        self._timer = None  # built on first use from this run's first target
        self._emit("preparing inputs", 0, 1)
        example, calibration = self._inputs()
        # Drift (after each step and at the end) is measured on rows no data-aware step fits
        # to (svd-llm, asvd, sensitivity, Wanda, similarity and heal all see the calibration
        # rows); when the calibration file has none left, on the calibration rows, saying so.
        spec = self.program.calibration
        rows = held_out_inputs(
            self._source(),
            self._calibration_path(),
            samples=spec.samples,
            batch=spec.batch,
            seed=self.seed,
        )
        original = self.model
        was_training = original.training
        original.eval()
        self._emit("analysing the model", 0, 1)
        try:
            reference = example.call(original)
        except Exception as exc:  # the model itself, before any surgery, rejects the inputs
            raise InputError(
                f"the model does not run on its example inputs ({first_line(exc)}); give "
                "inputs it accepts with `calibrate with FILE` (a tensor file of real inputs)"
            ) from exc
        before = analyze(original, example)
        ref_shapes = [tuple(t.shape) for t in flatten_outputs(reference)]
        # Drift after each step is measured on real data when there is some: the first
        # calibration batch (the example inputs are random token ids or pixels).
        probe = rows.batches[0] if rows.fresh else calibration[0] if calibration else example
        try:
            self._probe = (probe, probe.call(original))
        except Exception as exc:  # tensors of the wrong shape or dtype for this model
            raise InputError(
                f"the model does not run on the calibration inputs ({first_line(exc)}); a "
                "tensor file must hold what the model's forward takes: a tensor (the first "
                "argument), a list (positional arguments) or a dict (keyword arguments), with "
                "the batch first"
            ) from exc

        # Training data is read and checked before any pass runs: bad data is an error at the
        # recipe's string, before minutes of surgery and healing.
        self._load_heal_data(original)
        self._heals_run = 0
        model = copy.deepcopy(original)
        run = Run(
            recipe=self.recipe,
            original=original,
            model=model,
            loaded=self.loaded,
            example=example,
            calibration=calibration,
            before=before,
            after=before,
        )
        run.warnings.extend(
            Diagnostic(code="S0302", message=w, severity="warning") for w in before.warnings
        )
        state = _State(model=model, analysis=before)
        steps = self.program.steps
        # A family's last member is saved after the heal step that follows it, if any.
        pending_member: int | None = None
        for index, step in enumerate(steps):
            stmt = step.statement
            self._emit(f"line {stmt.span.line}: {stmt.verb}", index, len(steps))
            if isinstance(step, HealStep):
                self._heal(step, state, run, example, calibration, original)
                if pending_member is not None:
                    self._add_member(run, pending_member, state.model)
                    pending_member = None
                continue
            members = step.members
            for member in range(1, members + 1):
                context = self._context(state, example, calibration, original)
                surgery_pass = pass_for(stmt, context, member=member)
                self._run_pass(surgery_pass, state, run, example, reference, ref_shapes)
                if members == 1:
                    continue
                if member < members:
                    if step.heal_between is not None:
                        self._heal(step.heal_between, state, run, example, calibration, original)
                    self._add_member(run, member, state.model)
                elif step.kept_after_next_heal:
                    pending_member = member
                else:
                    self._add_member(run, member, state.model)
        model = state.model
        analysis = state.analysis
        self._emit("passes done", len(steps), len(steps))
        run.model = model
        run.after = analysis if run.steps else before
        model.eval()  # measured and saved in inference mode; the original gets its mode back

        measured_on = rows.batches if rows.fresh else calibration
        run.drift_rows = (
            rows.description
            if rows.fresh
            else f"the {len(calibration)} calibration batches data-aware steps were fitted to"
        )
        if not rows.fresh:
            run.warnings.append(
                Diagnostic(code="S0304", message=rows.description, severity="warning")
            )
        self._emit("measuring drift", 0, len(measured_on))
        refs, cands = [], []
        for i, batch in enumerate(measured_on):
            refs.append(batch.call(original))
            cands.append(batch.call(model))
            self._emit("measuring drift", i + 1, len(measured_on))
        run.drift = drift(refs, cands, [padding_mask(b) for b in measured_on])
        run.quality = self._quality(original, model, measured_on, (refs, cands))
        del refs, cands
        if measure:
            timing_inputs = calibration[0] if calibration else example
            run.speed = measure_speedup(
                original,
                model,
                timing_inputs,
                warmup=warmup,
                repeats=repeats,
                progress=self.progress,
            )
        specs = self._targets()
        if measure and specs:
            from surgery.backends import run_targets

            workdir = workdir or Path(tempfile.mkdtemp(prefix="surgery-lowered-"))
            run.verifications = run_targets(
                run.original,
                run.model,
                run.calibration[0] if run.calibration else run.example,
                specs,
                workdir,
                warmup=warmup,
                repeats=repeats,
                progress=self.progress,
            )
        original.train(was_training)
        measured = Measured(
            run.params_before,
            run.params_after,
            run.flops_before,
            run.flops_after,
            run.drift,
            run.speed,
            run.verifications,
            run.quality,
        )
        run.contracts = [evaluate(s, measured) for s in self.program.contracts]
        return run

    def _quality(
        self,
        original: nn.Module,
        model: nn.Module,
        calibration: list[Inputs],
        outputs: tuple[list[Any], list[Any]],
    ) -> QualityReport:
        """Drift's interval and every contract measured on data (`surgery.quality`); a metric
        that does not apply to this model or data is an error naming its `expect` line."""
        spec = self.program.calibration
        source = None
        if spec.source is not None:
            path = Path(spec.source)
            source = path if path.is_absolute() else self.recipe_dir / path
        try:
            return measure_quality(
                self.program.contracts,
                original,
                model,
                calibration=calibration,
                loaded=self._source(),
                calibration_source=source,
                calibration_outputs=outputs,
                recipe_dir=self.recipe_dir,
                metrics=self.metrics,
                trust_code=self.trust_code,
                seed=self.seed,
                progress=self.progress,
            )
        except QualityError as exc:
            stmt = exc.statement
            raise PassError(
                Diagnostic(
                    code="S0401",
                    message=str(exc),
                    span=stmt.span if stmt is not None else None,
                    help=exc.help,
                )
            ) from exc

    def _probe_drift(self, model: nn.Module) -> float:
        """Drift of ``model`` on the probe batch (see `run`)."""
        batch, reference = self._probe
        return drift([reference], [batch.call(model)], [padding_mask(batch)])

    def _add_member(self, run: Run, member: int, model: nn.Module) -> None:
        """Keep a copy of one member of a progressive family, with its drift."""
        run.family.append(
            Member(member, copy.deepcopy(model), self._probe_drift(model), list(run.changes))
        )

    def _context(
        self, state: _State, example: Inputs, calibration: list[Inputs], original: nn.Module
    ) -> PassContext:
        return PassContext(
            analysis=state.analysis,
            example=example,
            calibration=calibration,
            original=original,
            strict=self.strict,
            progress=self.progress,
            timer=self._layer_timer(),
            contracts=self.program.contracts,
            speedup_margin=self.margins.speedup,
            drift_margin=self.margins.drift,
        )

    def _layer_timer(self) -> LayerTimer:
        """What passes time single layers with: the recipe's first target (torch CPU when it
        names none), tables cached on disk."""
        if self._timer is None:
            from surgery.backends import get_backend
            from surgery.backends.latency import BackendTimer

            specs = self._targets() or [TargetSpec("torch", "cpu")]
            self._timer = BackendTimer(get_backend(*specs[0]))
        return self._timer

    def _targets(self) -> list[TargetSpec]:
        """The recipe's `target` statements, then the extra ones (``--target``)."""
        return [*self.program.targets, *self.extra_targets]

    def _run_pass(
        self,
        surgery_pass: SurgeryPass,
        state: _State,
        run: Run,
        example: Inputs,
        reference: Any,
        ref_shapes: list[tuple[int, ...]],
    ) -> None:
        """Plan and apply on a copy, lint; the model changes only if all of that succeeds."""
        stmt: Any = surgery_pass.statement
        started = time.perf_counter()
        candidate = copy.deepcopy(state.model)
        try:
            plan, changes = surgery_pass.run(candidate)
        except PassError:
            raise
        except Exception as exc:  # a pass bug must still name the recipe line
            raise PassError.crashed(
                stmt, exc, "the model was left unchanged; see the plan with `surgery plan`"
            ) from exc
        self._check_matches(stmt, plan, candidate, state.analysis, run)
        step_drift = self._lint(stmt, candidate, example, reference, ref_shapes)
        state.model = candidate
        state.hooks.extend(surgery_pass.training_hooks(candidate))
        assert surgery_pass.context is not None
        run.warnings.extend(surgery_pass.context.warnings)
        if changes:
            from surgery.graph import analyze

            state.analysis = analyze(candidate, example, trace=False)
        run.steps.append(
            Step(
                statement=stmt,
                plan=plan,
                changes=changes,
                drift=step_drift,
                seconds=time.perf_counter() - started,
                params=state.analysis.total_params,
                family_member=surgery_pass.family_step if surgery_pass.family_steps() > 1 else None,
            )
        )

    def _heal(
        self,
        step: HealStep,
        state: _State,
        run: Run,
        example: Inputs,
        calibration: list[Inputs],
        original: nn.Module,
    ) -> None:
        """Fine-tune the current model towards the original's outputs (see `surgery.heal`)."""
        from surgery.heal import heal

        stmt = step.statement
        context = self._context(state, example, calibration, original)
        if self.max_heal_steps is not None and stmt.steps.value > self.max_heal_steps:
            run.warnings.append(
                Diagnostic(
                    code="S0303",
                    message=f"`heal steps {stmt.steps.value}` capped at {self.max_heal_steps} "
                    "steps by --max-heal-steps",
                    span=stmt.steps.span,
                    severity="warning",
                )
            )
            capped = stmt.steps.model_copy(update={"value": self.max_heal_steps})
            stmt = stmt.model_copy(update={"steps": capped})
        index = self._heals_run
        self._heals_run += 1
        parallel = self.parallel
        if parallel is not None and parallel.world > 1:
            # Every rank must have built the same surgered model (same recipe, model, seed):
            # data-parallel healing averages gradients of what must be one model.
            try:
                parallel.check_same(state.model)
            except RuntimeError as exc:
                raise PassError(
                    Diagnostic(
                        code="S0401",
                        message=f"the ranks built different models before `heal`: {exc}",
                        span=step.statement.span,
                        help="run the same recipe, model and seed on every rank",
                    )
                ) from exc
        directory = self.checkpoint_dir / f"heal-{index}" if self.checkpoint_dir else None
        try:
            report = heal(
                state.model,
                stmt,
                context,
                freeze=step.freeze,
                hooks=list(state.hooks),
                regularizers=step.regularizers,
                data=self._heal_data.get(id(step.statement)),
                parallel=self.parallel,
                checkpoint_dir=directory,
                resume=self.resume,
                index=index,
                contracts_hold=self._contracts_hold(step.statement),
            )
        except HealDataError as exc:
            raise PassError(self._data_diagnostic(step.statement, exc)) from exc
        except CheckpointError as exc:
            raise PassError(
                Diagnostic(
                    code="S0371",
                    message=f"cannot resume `heal`: {exc}",
                    span=step.statement.span,
                    help="run without `--resume` to start healing afresh",
                )
            ) from exc
        if parallel is not None:
            # FSDP2 leaves sharded parameters behind: later passes, drift and OUT need a
            # plain module with full weights.
            state.model = parallel.unwrap(state.model)
        run.heals.append(report)
        run.warnings.extend(context.warnings)

    def _load_heal_data(self, model: nn.Module) -> None:
        """Read and tokenise the training and held-out data of every ``heal … on "DATA"``."""
        from surgery.heal import TrainingData

        for step in self.program.steps:
            heals = [step] if isinstance(step, HealStep) else [step.heal_between]
            for h in heals:
                if h is None or h.statement.on is None or id(h.statement) in self._heal_data:
                    continue
                self._emit(f"line {h.statement.span.line}: reading training data", 0, 1)
                try:
                    self._heal_data[id(h.statement)] = TrainingData.load(
                        h.statement,
                        model,
                        loaded=self.loaded,
                        base=self.recipe_dir,
                        seed=h.statement.seed.value if h.statement.seed else self.seed,
                    )
                except HealDataError as exc:
                    raise PassError(self._data_diagnostic(h.statement, exc)) from exc

    @staticmethod
    def _data_diagnostic(statement: ast.Heal, exc: Exception) -> Diagnostic:
        """Bad training data, located at the recipe node it is about."""
        node = getattr(statement, getattr(exc, "node", "on"), None) or statement.on or statement
        return Diagnostic(
            code="S0370",
            message=str(exc),
            span=node.span,
            help=getattr(exc, "help", None),
        )

    def _contracts_hold(self, statement: ast.Heal) -> Callable[[float], bool] | None:
        """What ``stop early`` asks: do the recipe's drift contracts hold at this held-out
        drift? (Healing changes no parameter or FLOP count and no speed; contracts measured
        on data of their own are left to the end.) None without such contracts."""
        from surgery.select import compare

        drifts = [
            c
            for c in self.program.contracts
            if c.metric.value == "drift" and getattr(c, "data", None) is None
        ]
        if statement.stop_early is None or not drifts:
            return None

        def hold(value: float) -> bool:
            return all(compare(value, c.op, c.value.magnitude) for c in drifts)

        return hold

    def _check_matches(
        self, stmt: Any, plan: StepPlan, model: nn.Module, analysis: Analysis, run: Run
    ) -> None:
        selector = getattr(stmt, "selector", None)
        if selector is None or plan.rows:
            return
        diag = Diagnostic(
            code="S0301",
            message=f"`{stmt.verb}` matched no module of this model",
            span=selector.span,
            help=no_match_help(model, analysis, selector) or None,
            severity="error" if self.strict else "warning",
        )
        if self.strict:
            raise PassError(diag)
        run.warnings.append(diag)

    def _lint(
        self,
        stmt: Any,
        model: nn.Module,
        example: Inputs,
        reference: Any,
        ref_shapes: list[tuple[int, ...]],
    ) -> float:
        try:
            out = example.call(model)
        except Exception as exc:
            raise PassError(
                Diagnostic(
                    code="S0402",
                    message=f"after `{stmt.verb}` the model no longer runs: {first_line(exc)}",
                    span=stmt.span,
                    help="the model was left unchanged by this statement",
                )
            ) from exc
        shapes = [tuple(t.shape) for t in flatten_outputs(out)]
        if shapes != ref_shapes:
            raise PassError(
                Diagnostic(
                    code="S0403",
                    message=f"`{stmt.verb}` changed the model's output shapes",
                    span=stmt.span,
                    notes=(f"before: {ref_shapes}", f"after: {shapes}"),
                    help="the model was left unchanged by this statement",
                )
            )
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in flatten_outputs(out)):
            raise PassError(
                Diagnostic(
                    code="S0404",
                    message=f"after `{stmt.verb}` the model outputs NaN or infinity",
                    span=stmt.span,
                    help="the model was left unchanged by this statement",
                )
            )
        return self._probe_drift(model)
