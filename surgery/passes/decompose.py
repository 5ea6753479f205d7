"""`decompose`: replace matched layers by low-rank factorizations.

``decompose SELECTOR (rank = R | rank = auto | budget params|flops|latency P) [method M] [round N]
[progressive K steps]``

**Layers.** ``Linear(in→out)`` and Hugging Face ``Conv1D`` (GPT-2's transposed linear,
weight ``[in, out]``) become a :class:`~surgery.modules.LowRankLinear` pair
``Linear(in→r)`` then ``Linear(r→out)``; a 1×1 ``Conv2d`` becomes a
:class:`~surgery.modules.lowrank_conv.LowRankConv2d` pair (the same SVD split, per pixel);
a ``k×k`` ``Conv2d`` becomes a Tucker-2 :class:`~surgery.modules.tucker_conv.TuckerConv2d`
(``1×1 C→r_in``, ``k×k r_in→r_out``, ``1×1 r_out→S``; dilation, stride and padding stay on the
core). Grouped convolutions are skipped (a factor would mix channels across groups).

**Methods** (``method M``; the default is ``svd`` for matrices and ``tucker`` for ``k×k``):

* ``svd``: truncated SVD of ``W`` with the √Σ split.
* ``asvd`` (arXiv 2312.05821): SVD of ``W·diag(s)``, ``s = mean|x|^0.5`` per input channel
  over the calibration inputs, ``1/s`` folded back into the first factor.
* ``svd-llm`` (arXiv 2403.07378): SVD of ``W·L`` with ``L = cholesky(XᵀX)`` (``XᵀX``
  accumulated in float64); truncating singular value ``i`` costs exactly ``σ_i²`` of squared
  output error on the calibration rows.
* ``tucker``: HOSVD Tucker-2 of a ``k×k`` convolution (1×1 convolutions use ``svd``).

The statistics of all selected layers are collected in *one* pass over the calibration
batches with forward pre-hooks; rows at padded positions (``attention_mask == 0`` of a batch
whose hooked input is ``[B, T, in]``) are left out, the model's outputs there mean nothing.

**Ranks.** ``rank = 0.25`` (fraction of ``min(in, out)``), ``rank = 128`` (absolute),
``rank = energy 0.9`` (smallest rank keeping ≥ 90% of the data-aware ``Σσ²``), or a global
``budget params|flops P`` over all matched matrix layers (:func:`~surgery.lowrank.allocate_budget`
on their data-aware spectra; FLOP budgets weight each layer by its tokens per forward, from the
analysed input shapes; ``k×k`` convolutions are skipped under a budget). For Tucker layers a
fraction or an absolute rank applies to the output and input channels separately, and an
energy threshold to each mode unfolding's spectrum. ``round N`` rounds ranks to multiples of
``N`` (:func:`~surgery.lowrank.round_rank`, never above the break-even rank). A per-layer rank
is :func:`~surgery.passes.ranks.resolve_rank`, the rule ``split`` uses too.

**Searched ranks.** ``rank = auto`` and ``budget latency P`` leave every matrix layer's rank
to a search (:mod:`surgery.passes.auto_rank`): each layer is timed alone on the recipe's first
target at candidate ranks on the tile (or ``round N``) grid up to its break-even rank, each
candidate's error is the layer's measured sensitivity times the (data-aware) energy it
discards, and the exact Pareto front of (summed latency, summed error) over all layers is
searched for the least error under the latency goal (``expect speedup >= X`` through the
layers' measured share of the model's time, or the budget), or the least latency under an
``expect drift`` cap. A layer may stay dense. When nothing meets every goal, the error
(``S0502``) names the contract that binds and the best value reachable. Rows carry the
latency of the chosen form (``ms``); ``plan.data["auto"]`` holds the search (the frontier
explored, the predictions, the contracts aimed at) for the report and for
:func:`~surgery.passes.auto_rank.refine`.

**Never larger.** A layer whose factorization would not have strictly fewer parameters *and*
FLOPs than the layer is skipped, and the plan says why; so are tied weights, layers the model
never calls, factors of an earlier decomposition and layers the calibration never reaches.

**Progressive** (``progressive K steps``, PLRD arXiv 2406.19995): the statement builds a family
of ``K`` members. Step 1 decomposes each layer at ``r_1``; step ``k > 1`` re-factors the second
factor of each pair made by step 1 (``second ≈ A·B``) and folds ``B`` into the first factor
(:func:`~surgery.lowrank.refactor_pair`), so every original layer stays two layers. The schedule
is geometric from the layer's break-even rank ``r_0`` (the largest rank that still saves
parameters) to the requested rank ``r_K``: ``r_k = round(r_0·(r_K/r_0)^(k/K))``, non-increasing,
``r_K`` exactly at step K (rounded to ``round N`` when given). It is decided at step 1 and
kept on each pair (:func:`~surgery.passes.progressive.mark_pair`), so energy thresholds and
budgets are resolved once on the original spectra. With ``method svd`` and no healing in
between, the product of the pair at step ``k`` is exactly the rank-``r_k`` truncation of the
product at step ``k − 1``; data-aware methods truncate in the calibration metric instead.

**Where the parts live.** This module is the pass: which layers, which kind, planning and
applying. The calibration statistics are :mod:`surgery.passes.calibration_stats`, the rank
rule :mod:`surgery.passes.ranks` (shared with ``split``), the progressive family
:mod:`surgery.passes.progressive`, the latency policy of ``keep if faster`` and
``where speedup`` :mod:`surgery.passes.rank_latency`; the replacement modules build
themselves from their factors (:meth:`LowRankLinear.from_factors
<surgery.modules.LowRankLinear.from_factors>`).

Plan rows carry ``method``, ``rank`` and ``energy`` (the fraction of the — data-aware — ``Σσ²``
kept); progressive rows add ``step`` (``k/K``), ``target`` (``r_K``), ``member_params`` (the
model's parameters after this member) and, once applied, ``member_drift`` (relative output
error of the member against the original model on the example inputs, before healing).

>>> import torch
>>> from surgery.parse import parse
>>> model = torch.nn.Sequential(torch.nn.Linear(256, 256))
>>> p = DecomposePass(parse("decompose Linear rank = 0.25").statements[0])
>>> plan = p.ensure_context(model) and p.plan(model)
>>> row = plan.rows[0]
>>> row.detail["rank"], row.detail["method"], row.params_before, row.params_after
(64, 'svd', 65792, 33024)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from surgery import ast
from surgery.diagnostics import Diagnostic
from surgery.lowrank import (
    Factors,
    LayerSpectrum,
    allocate_budget,
    asvd_factors,
    break_even_rank,
    layer_cost,
    refactor_pair,
    svd_factors,
    svd_llm_factors,
    tucker2_factors,
)
from surgery.memory import release_free_memory
from surgery.modules import LowRankLinear
from surgery.modules.lowrank_conv import LowRankConv2d
from surgery.modules.tucker_conv import TuckerConv2d
from surgery.passes.auto_rank import (
    Layer,
    Margins,
    Predictor,
    Unreachable,
    candidate_grid,
    frontier,
    goals_from,
    layer_share,
    lost_energy,
    pareto_front,
    search,
)
from surgery.passes.base import Change, PassContext, PassError, PlanRow, StepPlan, SurgeryPass
from surgery.passes.calibration_stats import ASVD_ALPHA, LayerStats, collect_input_stats
from surgery.passes.progressive import (
    annotate_member,
    mark_pair,
    member_drift,
    pairs_of,
    progressive_schedule,
    schedule_of,
)
from surgery.passes.rank_latency import (
    keep_if_faster_ranks,
    keep_if_faster_tucker_ranks,
    layer_speedups,
    rank_tables,
    tucker_speedups,
)
from surgery.passes.ranks import resolve_rank, resolve_tucker_ranks
from surgery.select import matches_type, select, type_label, type_names, uses_speedup
from surgery.sensitivity import layer_sensitivities
from surgery.timing import LayerTimer, TimingUnavailable
from surgery.verbs.base import format_number

_R = TypeVar("_R")  # what `keep if faster` chooses: a rank, or a Tucker rank pair

__all__ = ["DecomposePass"]

Kind = Literal["linear", "conv1d", "conv1x1", "tucker", "pair"]
_FACTORED = (LowRankLinear, LowRankConv2d, TuckerConv2d)


# ---------------------------------------------------------------------------------------------
# helpers


def _weight(module: nn.Module) -> Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor):
        raise TypeError(f"`{type(module).__name__}` has no weight tensor")
    return w


def _matrix(module: nn.Module, kind: Kind) -> Tensor:
    """The ``[out, in]`` weight matrix of a matrix-like layer."""
    w = _weight(module)
    if kind == "conv1d":
        return w.T  # HF Conv1D stores [in, out]
    if kind == "conv1x1":
        return w[:, :, 0, 0]  # [S, C, 1, 1] -> [S, C]
    return w


def _tokens(shapes: list[tuple[int, ...]], conv: bool) -> int:
    """Rows a matrix layer multiplies per forward: batch × sequence, or batch × pixels."""
    if not shapes:
        return 1
    s = shapes[0]
    if conv:  # output (B, S, H', W')
        return max(1, math.prod(s[:1]) * math.prod(s[2:]))
    return max(1, math.prod(s[:-1]))


def _tucker_costs(
    module: nn.Conv2d, r_out: int, r_in: int, in_hw: int, out_hw: int
) -> tuple[int, int, int, int]:
    """(dense params, Tucker params, dense MACs, Tucker MACs) per image, biases excluded."""
    S, C, kh, kw = module.weight.shape
    k2 = kh * kw
    dense_p = S * C * k2
    tucker_p = C * r_in + r_in * r_out * k2 + r_out * S
    dense_m = out_hw * S * C * k2
    tucker_m = in_hw * C * r_in + out_hw * (r_in * r_out * k2 + r_out * S)
    return dense_p, tucker_p, dense_m, tucker_m


@dataclass
class _Candidate:
    """A layer the plan may decompose, with what the rank rule needs to know."""

    path: str
    kind: Kind
    module: nn.Module
    row: PlanRow
    in_f: int
    out_f: int
    tokens: int
    full: Factors | None = None  # factors at the largest rank that may be used
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# the pass


class DecomposePass(SurgeryPass[ast.Decompose]):
    """Low-rank decomposition of ``Linear``/``Conv1D``/``Conv2d`` layers (see the module doc)."""

    keyword: ClassVar[str] = "decompose"
    #: While :meth:`run` streams: the change made for each layer replaced during planning.
    _streamed: dict[str, Change] | None = None

    # --- statement accessors ------------------------------------------------------------

    @property
    def _steps(self) -> int:
        """``K`` for ``progressive K steps``, else 1 (the verb's ``members``)."""
        return self.family_steps()

    @property
    def _multiple(self) -> int:
        stmt: ast.Decompose = self.statement
        return stmt.round.value if stmt.round is not None else 1

    @property
    def _tag(self) -> str:
        span = self.statement.span
        return f"{span.line}:{span.col}:{span.start}"

    @property
    def _searched(self) -> ast.Node | None:
        """``rank = auto`` or ``budget latency …``: the option that makes the pass search ranks
        on measured latency (None for a rank rule or a params/FLOPs budget)."""
        stmt: ast.Decompose = self.statement
        if stmt.rank_auto is not None:
            return stmt.rank_auto
        if stmt.budget is not None and stmt.budget.resource == "latency":
            return stmt.budget
        return None

    def _method_for(self, kind: Kind) -> str:
        stmt: ast.Decompose = self.statement
        if stmt.method is not None:
            return stmt.method.value
        return "tucker" if kind == "tucker" else "svd"

    def _error(self, message: str, node: ast.Node | None, help: str | None = None) -> PassError:
        span = node.span if node is not None else self.statement.span
        return PassError(Diagnostic(code="S0401", message=message, span=span, help=help))

    # --- planning -----------------------------------------------------------------------

    def plan(self, model: nn.Module) -> StepPlan:
        """Choose each layer's method and rank; compute the factors (kept for :meth:`apply`)."""
        context = self.ensure_context(model)
        if self.family_step > 1:
            return self._plan_refactor(model, context)
        return self._plan_first(model, context)

    def _stands_for_linear(self, path: str, module: nn.Module) -> bool:
        """A module that lost its class but computes a Linear (a `.pt2` program unflattened
        into `InterpreterModule`s: the analysis recovers the original class name)."""
        info = self.context.analysis.modules.get(path) if self.context else None
        weight = getattr(module, "weight", None)
        return (
            info is not None
            and info.type == "Linear"
            and isinstance(weight, Tensor)
            and weight.dim() == 2
            and not any(True for _ in module.children())
        )

    def _classify(self, path: str, module: nn.Module) -> tuple[Kind | None, str]:
        """The layer kind, or None and the reason to skip it."""
        names = type_names(module)
        if isinstance(module, nn.Linear) or self._stands_for_linear(path, module):
            return "linear", ""
        weight = getattr(module, "weight", None)
        if "Conv1D" in names and isinstance(weight, Tensor) and weight.dim() == 2:
            return "conv1d", ""
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                return None, (
                    f"grouped convolution (groups={module.groups}): a factor would mix channels "
                    "across groups"
                )
            if tuple(module.kernel_size) == (1, 1):
                return "conv1x1", ""
            return "tucker", ""
        return None, f"`{type(module).__name__}` layers are not decomposed"

    def _plan_first(self, model: nn.Module, context: PassContext) -> StepPlan:
        stmt: ast.Decompose = self.statement
        analysis = context.analysis
        plan = self.new_plan()
        modules = dict(model.named_modules())
        speedups = self._speedups(model, context) if uses_speedup(stmt.selector.where) else None
        paths = select(
            model, analysis, stmt.selector, types=self.supported_types, speedups=speedups
        )
        measured = analysis.total_flops > 0
        inside_factors = {
            f"{p}.{child}" if p else child
            for p, m in modules.items()
            if isinstance(m, _FACTORED)
            for child, _ in m.named_children()
        }
        candidates: list[_Candidate] = []
        for path in paths:
            module = modules[path]
            info = analysis.modules[path]
            kind, why = self._classify(path, module)
            if kind is None:
                if isinstance(module, nn.Conv2d):  # a refused conv gets a row saying why
                    label = type_label(module, info.type, stmt.selector)
                    row = self._row(path, label, module, info.flops)
                    row.action, row.note = "skip", why
                    plan.rows.append(row)
                continue
            if kind == "tucker":
                out_f, in_f = module.weight.shape[:2]
            else:
                out_f, in_f = _matrix(module, kind).shape
            row = self._row(
                path,
                type_label(module, info.type, stmt.selector),
                module,
                info.flops,
                kind=kind,
                in_f=in_f,
                out_f=out_f,
            )
            plan.rows.append(row)
            skip = None
            method = self._method_for(kind)
            row.detail["method"] = method
            if path in inside_factors:
                skip = "already a factor of a decomposition"
            elif info.tied:
                skip = "weight shared with another module (tied)"
            elif measured and info.calls == 0:
                skip = "never called as a module (its weight is used directly)"
            elif kind == "tucker" and method != "tucker":
                skip = f"method `{method}` factors matrices; a {module.kernel_size[0]}×{module.kernel_size[1]} Conv2d needs `method tucker` (its default)"
            elif kind != "tucker" and method == "tucker":
                skip = (
                    "`method tucker` applies to k×k Conv2d layers; use `svd`, `asvd` or `svd-llm`"
                )
            elif kind == "tucker" and (stmt.budget is not None or stmt.rank_auto is not None):
                skip = (
                    f"{'`rank = auto`' if stmt.rank_auto else 'budgets'} cover matrix layers "
                    "(Linear, Conv1D, 1×1 Conv2d); give Conv2d a `rank`"
                )
            elif kind == "tucker" and self._steps > 1:
                skip = "progressive refactoring applies to SVD pairs; decompose Conv2d in its own statement"
            elif kind != "tucker" and break_even_rank(in_f, out_f) == 0:
                skip = "no rank saves parameters for this shape"
            if skip:
                row.action, row.note = "skip", skip
                continue
            conv = kind == "conv1x1"
            shapes = info.output_shapes if conv else info.input_shapes
            cand = _Candidate(path, kind, module, row, in_f, out_f, _tokens(shapes, conv))
            if kind == "tucker":
                cand.extra["in_hw"] = (
                    math.prod(info.input_shapes[0][2:]) if info.input_shapes else 0
                )
                cand.extra["out_hw"] = (
                    math.prod(info.output_shapes[0][2:]) if info.output_shapes else 0
                )
            candidates.append(cand)

        del modules  # holds every layer: streaming must be able to free the replaced ones
        matrix = [c for c in candidates if c.kind != "tucker"]
        self._factor_matrices(model, context, matrix, plan)
        self._choose_ranks(model, matrix, plan)
        for cand in candidates:
            if cand.kind == "tucker":
                self._plan_tucker(cand)
        plan.data["factors"] = {
            c.path: c.full for c in candidates if c.row.action != "skip" and c.full is not None
        }
        plan.data["tucker"] = {
            c.path: c.extra["factors"]
            for c in candidates
            if c.row.action != "skip" and c.kind == "tucker"
        }
        if self._steps > 1:
            annotate_member(plan, context, self.family_step, self._steps)
        if not paths:
            plan.notes.append("the selector matched no module")
        return plan

    def _row(
        self,
        path: str,
        type_name: str,
        module: nn.Module,
        flops: int,
        *,
        kind: Kind | None = None,
        in_f: int = 0,
        out_f: int = 0,
    ) -> PlanRow:
        params = sum(p.numel() for p in module.parameters())
        if kind == "tucker" or (kind is None and isinstance(module, nn.Conv2d)):
            assert isinstance(module, nn.Conv2d)
            k = "×".join(str(s) for s in module.kernel_size)
            shape = f"{module.in_channels}→{module.out_channels} {k}"
        else:
            shape = f"{in_f}→{out_f}"
        return PlanRow(
            path=path,
            type=type_name,
            shape=shape,
            action="decompose",
            params_before=params,
            params_after=params,
            flops_before=flops,
            flops_after=flops,
            detail={},
        )

    def _calibration(self, context: PassContext) -> list[Any]:
        if context.calibration:
            return list(context.calibration)
        if context.example is not None:
            return [context.example]
        assert self.statement.method is not None  # only data-aware methods need calibration
        raise self._error(
            f"`method {self.statement.method.value}` needs calibration inputs",
            self.statement.method,
            "add `calibrate with FILE`, or run the recipe through `surgery` (it makes inputs)",
        )

    def _stats(
        self, model: nn.Module, context: PassContext, modules: dict[str, nn.Module], method: str
    ) -> dict[str, LayerStats]:
        if method not in ("asvd", "svd-llm") or not modules:
            return {}
        return collect_input_stats(
            model,
            modules,
            self._calibration(context),
            abs_mean=method == "asvd",
            gram=method == "svd-llm",
            progress=context.progress,
        )

    def _factor_matrices(
        self, model: nn.Module, context: PassContext, cands: list[_Candidate], plan: StepPlan
    ) -> None:
        """Full (data-aware) spectrum of every matrix candidate and its factors at the largest
        rank the rank rule may pick (:meth:`_max_rank`), to bound time and memory.

        When streaming (:meth:`run`), each layer's rank is chosen and the layer replaced right
        after it is factored, and its factors are dropped."""
        method = self._method_for("linear")
        stats = self._stats(model, context, {c.path: c.module for c in cands}, method)
        for i, cand in enumerate(cands):
            W = _matrix(cand.module, cand.kind)  # [out, in]
            keep = self._max_rank(cand)
            if method == "svd":
                f = svd_factors(W, keep)
            else:
                s = stats.pop(cand.path)
                if s.rows == 0:
                    cand.row.action, cand.row.note = "skip", "not reached by the calibration inputs"
                    continue
                if method == "asvd":
                    f = asvd_factors(W, s.abs_mean, keep, alpha=ASVD_ALPHA)
                else:
                    assert s.xtx is not None
                    f = svd_llm_factors(W, s.xtx, keep)
                    if s.rows < cand.in_f:
                        cand.row.note = (
                            f"{s.rows} calibration rows < {cand.in_f} inputs: XᵀX is singular, "
                            "a ridge jitter was added"
                        )
                del s  # free the [in, in] float64 Gram as soon as it is used
            cand.full = f
            del W
            if self._streamed is not None:
                self._choose_rank(model, cand, self._rank_rule(cand))
                if cand.row.action != "skip":
                    assert cand.full is not None
                    self._streamed[cand.path] = self._replace(model, cand.row, cand.full, None)
                cand.full, cand.module = None, nn.Identity()  # the old layer can be freed
                release_free_memory()
            if context.progress is not None:
                context.progress("factorizing", i + 1, len(cands))

    def _max_rank(self, cand: _Candidate) -> int:
        """The largest rank :meth:`_choose_rank` may use for ``cand``: the break-even rank,
        or the requested rank when a fraction or absolute rank decides it alone."""
        stmt: ast.Decompose = self.statement
        full = min(cand.in_f, cand.out_f)
        be = max(1, min(break_even_rank(cand.in_f, cand.out_f), full))
        if stmt.budget is not None or stmt.rank_auto is not None or self._steps > 1:
            return be
        if stmt.rank is None or stmt.rank.kind == "energy":
            return be
        return max(1, min(self._rank_rule(cand), be))

    def _speedups(self, model: nn.Module, context: PassContext) -> dict[str, float]:
        """``where speedup > X``: each layer of the selector's type timed alone on the
        recipe's first target (torch CPU when it names none), at the requested rank rounded
        to the target's tile: matrix layers (Linear, Conv1D, 1×1 Conv2d) against their low-rank
        pair, k×k Conv2d against its Tucker-2 form (when the method is `tucker`, the default).
        Layers that cannot be timed (grouped convs among them) have no speedup and never
        match."""
        stmt: ast.Decompose = self.statement
        rank = stmt.rank
        if rank is None or rank.kind == "energy":
            raise self._error(
                "`where speedup` times each layer at its requested rank: give a fraction or an "
                "absolute `rank`",
                stmt.selector,
            )
        wanted = {stmt.selector.type.value} if stmt.selector.type else set(self.supported_types)
        modules = dict(model.named_modules())
        requested: dict[str, int] = {}
        convs: dict[str, nn.Module] = {}
        pairs: dict[str, tuple[int, int]] = {}
        for path, info in context.analysis.modules.items():
            module = modules.get(path)
            if (
                module is None
                or not info.input_shapes
                or not matches_type(module, info.type, wanted)
            ):
                continue
            kind = self._classify(path, module)[0] if isinstance(module, nn.Conv2d) else None
            if kind in ("tucker", "conv1x1"):
                assert isinstance(module, nn.Conv2d)
                method = self._method_for(kind)
                if kind == "tucker" and method == "tucker":
                    convs[path], pairs[path] = module, self._tucker_request(module)
                elif kind == "conv1x1" and method != "tucker":
                    r = self._speedup_rank(module.in_channels, module.out_channels)
                    convs[path], pairs[path] = module, (r, r)
                continue
            if info.kernel is not None or info.in_features is None or info.out_features is None:
                continue
            requested[path] = self._speedup_rank(info.in_features, info.out_features)
        timer = self._timer("`where speedup`", stmt.selector)
        try:
            speedups = layer_speedups(model, context.analysis, list(requested), requested, timer)
            if convs:
                speedups |= tucker_speedups(convs, context.analysis, pairs, timer)
            return speedups
        except (TimingUnavailable, ValueError) as exc:
            raise self._error(
                f"`where speedup` cannot time layers on {timer.name}: {exc}", stmt.selector
            ) from exc

    def _speedup_rank(self, in_f: int, out_f: int) -> int:
        """The rank `where speedup` times a matrix layer at: the fraction or absolute rank."""
        rank = self.statement.rank
        assert rank is not None and rank.kind != "energy"
        return resolve_rank(rank, min(in_f, out_f), clamp=True)

    def _faster_rank(
        self, model: nn.Module, cand: _Candidate, requested: int
    ) -> tuple[int | None, str]:
        """``keep if faster``: the rank just below the latency cliff on the recipe's first
        target (torch CPU when it names none), or None when no rank beats the dense layer.

        Each layer shape is timed alone at its real input shape; the tables are cached on
        disk, and the choice is a pure function of the table (`surgery.passes.rank_latency`).
        """
        if cand.kind == "conv1x1":  # timed as the two 1×1 convs it becomes, at (rank, rank)
            pair, where = self._faster_conv_ranks(cand, (requested, requested))
            return (None if pair is None else pair[0]), where
        assert self.context is not None
        analysis = self.context.analysis
        return self._time_on_first_target(
            cand,
            lambda timer: keep_if_faster_ranks(
                model, analysis, [cand.path], {cand.path: requested}, timer
            ),
        )

    def _time_on_first_target(
        self, cand: _Candidate, measure: Callable[[LayerTimer], dict[str, _R | None]]
    ) -> tuple[_R | None, str]:
        """``measure(timer)[cand.path]`` on the context's timer (the recipe's first target)
        and that target's name; a located error when it cannot be timed there."""
        timer = self._timer("`keep if faster`", self.statement.keep_if_faster)
        try:
            chosen = measure(timer)
        except (TimingUnavailable, ValueError) as exc:
            raise self._error(
                f"`keep if faster` cannot time `{cand.path}` on {timer.name}: {exc}",
                self.statement.keep_if_faster,
                help="remove `keep if faster`, or choose a target that is available here",
            ) from exc
        return chosen[cand.path], timer.name

    def _timer(self, what: str, node: Any) -> LayerTimer:
        """The context's layer timer; a located error when the pass runs without one."""
        timer = self.context.timer if self.context is not None else None
        if timer is None:
            raise self._error(
                f"{what} times layers on a target, and this pass has no timer",
                node,
                help="run the recipe with `surgery plan`/`surgery apply` (they time on its "
                "first target), or give the pass a `PassContext(timer=...)`",
            )
        return timer

    def _choose_ranks(self, model: nn.Module, cands: list[_Candidate], plan: StepPlan) -> None:
        stmt: ast.Decompose = self.statement
        live = [c for c in cands if c.row.action != "skip" and c.full is not None]
        if self._searched is not None:
            ranks = self._search_ranks(model, live, plan)
        elif stmt.budget is not None:
            ranks = self._budget_ranks(model, live, plan)
        else:
            ranks = {c.path: self._rank_rule(c) for c in live}
        for cand in live:
            self._choose_rank(model, cand, ranks[cand.path])
        plan.data["schedules"] = {
            c.path: c.extra["schedule"] for c in live if "schedule" in c.extra
        }

    def _choose_rank(self, model: nn.Module, cand: _Candidate, target: int) -> None:
        """Settle ``cand``'s rank from the rule's ``target``: rounding, the never-larger
        checks, ``keep if faster``, the progressive schedule; truncate its factors."""
        stmt: ast.Decompose = self.statement
        assert cand.full is not None
        row, (in_f, out_f) = cand.row, (cand.in_f, cand.out_f)
        full = min(in_f, out_f)
        be = break_even_rank(in_f, out_f)
        row.detail["full_rank"] = full
        if self._searched is not None and target >= full:
            row.action = "skip"
            row.note = cand.extra.get("dense_note", "the search keeps this layer dense")
            return
        if stmt.budget is not None and target >= full:
            row.action, row.note = "skip", "the budget keeps this layer dense"
            return
        if target > full:
            row.detail["rank"] = target
            row.action, row.note = "skip", f"rank {target} exceeds full rank {full}"
            return
        if target > be:
            row.detail["rank"] = target
            row.action, row.note = (
                "skip",
                f"rank {target} saves no parameters (break-even {be})",
            )
            return
        if stmt.keep_if_faster is not None:
            chosen, where = self._faster_rank(model, cand, target)
            row.detail["measured_on"] = where
            if chosen is None:
                row.detail["rank"] = target
                row.action, row.note = (
                    "skip",
                    f"no rank ≤ {target} is faster than dense on {where}",
                )
                return
            if chosen != target:
                row.detail["requested_rank"] = target
            target = chosen
        rank = target
        if self._steps > 1:
            schedule = progressive_schedule(be, target, self._steps, self._multiple)
            cand.extra["schedule"] = schedule
            rank = schedule[0]
            row.detail["step"] = f"1/{self._steps}"
            row.detail["target"] = target
        cand.full = _truncate(cand.full, rank)
        row.detail["rank"] = rank
        row.detail["energy"] = round(_energy(cand.full.singular_values, rank), 6)
        self._costs(row, in_f, out_f, rank, old_rank=None)

    def _rank_rule(self, cand: _Candidate) -> int:
        """The statement's ``rank = …`` for ``cand``, rounded to ``round N`` (never above the
        break-even rank); an energy threshold reads the (data-aware) spectrum."""
        rank = self.statement.rank
        assert rank is not None, "the checker requires a rank or a budget"

        def spectrum() -> Tensor:
            assert cand.full is not None
            return cand.full.singular_values

        return resolve_rank(
            rank,
            min(cand.in_f, cand.out_f),
            spectrum,
            multiple=self._multiple,
            max_rank=break_even_rank(cand.in_f, cand.out_f),
        )

    def _search_ranks(
        self, model: nn.Module, cands: list[_Candidate], plan: StepPlan
    ) -> dict[str, int]:
        """``rank = auto`` / ``budget latency``: each layer's rank from the search over measured
        latency and predicted error (:mod:`surgery.passes.auto_rank`); ``min(in, out)`` for a
        layer the search keeps dense."""
        stmt: ast.Decompose = self.statement
        node = self._searched
        assert node is not None and self.context is not None
        context = self.context
        budget = stmt.budget if stmt.rank_auto is None else None
        what = "`rank = auto`" if budget is None else "`budget latency`"
        if not cands:
            return {}
        timer = self._timer(what, node)
        step = self._multiple if stmt.round is not None else timer.tile
        grids: dict[str, list[int]] = {}
        for c in cands:
            assert c.full is not None
            grids[c.path] = candidate_grid(c.full.rank, step)
        try:
            tables = rank_tables(model, context.analysis, grids, timer)
        except (TimingUnavailable, ValueError) as exc:
            raise self._error(
                f"{what} cannot time layers on {timer.name}: {exc}",
                node,
                help="choose a target that is available here, or give a fixed `rank`",
            ) from exc
        by_sensitivity = budget is None or (
            budget.by is not None and budget.by.value == "sensitivity"
        )
        weights = (
            self._sensitivities(model, cands) if by_sensitivity else {c.path: 1.0 for c in cands}
        )
        layers = []
        for c in cands:
            assert c.full is not None
            lost = lost_energy(c.full.singular_values, grids[c.path])
            table = tables[c.path]
            options = [(r, table[r], weights[c.path] * lost[r]) for r in grids[c.path]]
            layers.append(Layer(c.path, table[None], options))
        dense = sum(layer.dense for layer in layers)
        contracts = tuple(context.contracts)
        share = None
        if any(e.metric.value == "speedup" and e.op in (">", ">=") for e in contracts):
            batch = context.calibration[0] if context.calibration else context.example
            if batch is not None:
                share = layer_share(model, [c.path for c in cands], batch)
        predictor = Predictor(dense, share, drift_units=by_sensitivity)
        margins = Margins(context.speedup_margin, context.drift_margin)
        budget_text = ""
        if budget is not None:
            budget_text = f"budget latency {format_number(budget.value)}"
        goals, notes = goals_from(
            contracts, predictor, margins, budget=budget, budget_text=budget_text
        )
        if not goals:
            raise self._error(
                "`rank = auto` has nothing to aim at: no `expect speedup` or `expect drift` "
                "contract reached this pass",
                node,
                help="add e.g. `expect speedup >= 1.5` to the recipe (run it with `surgery "
                "apply`/`plan`, or give the pass a `PassContext(contracts=...)`), or use "
                "`budget latency 60%`",
            )
        front = pareto_front(layers)
        result = search(layers, goals, front=front)
        if isinstance(result, Unreachable):
            raise self._unreachable(result, predictor, timer.name)
        ranks: dict[str, int] = {}
        for c in cands:
            rank = result.ranks[c.path]
            table = tables[c.path]
            c.row.detail["ms"] = round(table[rank] * 1e3, 4)
            if rank is None:
                c.row.detail["dense_ms"] = round(table[None] * 1e3, 4)
                c.extra["dense_note"] = (
                    f"the search keeps this layer dense ({len(grids[c.path])} ranks timed on "
                    f"{timer.name})"
                )
                ranks[c.path] = min(c.in_f, c.out_f)
            else:
                ranks[c.path] = rank
        self._record_search(plan, result, front, predictor, goals, margins, timer.name, layers)
        plan.notes.extend(notes)
        return ranks

    def _record_search(
        self,
        plan: StepPlan,
        pick: Any,
        front: Any,
        predictor: Predictor,
        goals: list[Any],
        margins: Margins,
        where: str,
        layers: list[Layer],
    ) -> None:
        """The search's result on the plan: a note per fact, ``plan.data["auto"]`` for the
        report and for :func:`~surgery.passes.auto_rank.refine`."""
        speedup_goals = [g for g in goals if g.kind == "speedup"]
        drift_goals = [g for g in goals if g.kind == "drift"]
        aim_speedup = max(speedup_goals, key=lambda g: g.target) if speedup_goals else None
        aim_drift = min(drift_goals, key=lambda g: g.target) if drift_goals else None
        predicted_speedup = predictor.speedup(pick.latency)
        predicted_drift = predictor.drift(pick.error)
        timed = sum(len(layer.options) for layer in layers)
        plan.notes.append(
            f"ranks searched on {where}: {len(layers)} layers, {timed} candidate ranks timed; "
            f"goals: {', '.join(f'`{g.text}`' for g in goals)}; "
            f"chosen: {predictor.describe(pick)} (predicted)"
        )
        if predictor.share is not None:
            plan.notes.append(
                f"the searched layers take {predictor.share:.0%} of the model's time (measured "
                "in eager torch on the calibration batch; assumed the same on the target)"
            )
        if margins != Margins():
            plan.notes.append(
                f"aiming past the contracts after a measured miss: speedup ×{margins.speedup:.3f},"
                f" drift ×{margins.drift:.3f}"
            )
        plan.notes.append(
            f"frontier explored: {len(front)} Pareto points"
            + (" (thinned)" if front.thinned else "")
        )
        plan.data["auto"] = {
            "target": where,
            "goals": [g.text for g in goals],
            "share": predictor.share,
            "latency": pick.latency / predictor.dense if predictor.dense else None,
            "predicted_speedup": predicted_speedup,
            "predicted_drift": predicted_drift,
            "predicted_error": pick.error,
            "speedup_target": aim_speedup.target if aim_speedup else None,
            "speedup_line": aim_speedup.node.span.line if aim_speedup else None,
            "drift_target": aim_drift.target if aim_drift else None,
            "drift_line": aim_drift.node.span.line if aim_drift else None,
            "margins": [margins.speedup, margins.drift],
            "ranks": dict(pick.ranks),
            # per layer: dense seconds and each candidate as [rank, seconds, predicted error]
            "layers": {
                layer.path: {"dense": layer.dense, "options": [list(o) for o in layer.options]}
                for layer in layers
            },
            "frontier": frontier(front, predictor, pick),
        }

    def _unreachable(self, miss: Unreachable, predictor: Predictor, where: str) -> PassError:
        """``S0502``: no choice of ranks meets ``miss.goal``; the best value reachable."""
        goal, best = miss.goal, miss.best
        if goal.kind == "speedup":
            s = predictor.speedup(best.latency)
            reach = f"{s:.2f}×" if s is not None else "unknown"
        else:
            reach = f"{best.latency / predictor.dense:.1%} of the dense latency"
        if miss.alone:
            message = f"no choice of ranks can meet `{goal.text}`: the best reachable is {reach}"
            first = "with every searched layer at its fastest candidate rank"
        else:
            others = ", ".join(f"`{g.text}`" for g in miss.others)
            message = (
                f"no choice of ranks can meet `{goal.text}` together with {others}: "
                f"the best reachable is {reach}"
            )
            first = f"the fastest choice that meets {others}"
        notes = [f"{first}: {predictor.describe(best)} (predicted from layers timed on {where})"]
        if goal.kind == "speedup" and predictor.share is not None:
            notes.append(
                f"the searched layers take {predictor.share:.0%} of the model's time; the rest "
                "is not changed by `decompose`"
            )
        span = goal.node.span if goal.node is not None else self.statement.span
        if goal.node is not self._searched:
            notes.insert(0, f"ranks searched by line {self.line}: `{self.statement_text()}`")
        return PassError(
            Diagnostic(
                code="S0502",
                message=message,
                span=span,
                notes=tuple(notes),
                help=("raise the budget" if goal.kind == "latency" else "relax the contract")
                + ", select more layers, or allow smaller ranks (a smaller `round`)",
            )
        )

    def _budget_ranks(
        self, model: nn.Module, cands: list[_Candidate], plan: StepPlan
    ) -> dict[str, int]:
        budget = self.statement.budget
        assert budget is not None and budget.resource != "latency"  # latency: _search_ranks
        spectra = []
        for c in cands:
            assert c.full is not None
            spectra.append(LayerSpectrum(c.path, c.in_f, c.out_f, c.tokens, c.full.singular_values))
        if not spectra:
            return {}
        weights = None
        if budget.by is not None and budget.by.value == "sensitivity":
            weights = self._sensitivities(model, cands)
            plan.notes.append(
                f"budget by sensitivity: {len(weights)} layers each truncated alone to half their "
                "break-even rank and the model's drift measured on the calibration inputs"
            )
        try:
            ranks = allocate_budget(
                spectra,
                budget.value.magnitude,
                budget.resource,
                multiple=self._multiple,
                weights=weights,
            )
        except ValueError as exc:
            raise self._error(str(exc), budget, "raise the budget or select fewer layers") from exc
        dense = sum(layer_cost(s, min(s.in_f, s.out_f), budget.resource) for s in spectra)
        used = sum(layer_cost(s, ranks[s.name], budget.resource) for s in spectra)
        plan.notes.append(
            f"budget {budget.resource} {budget.value.magnitude:.0%}: the {len(spectra)} budgeted "
            f"layers keep {used / dense:.1%} of their {budget.resource} ({used:,} of {dense:,}, "
            "weights only)"
        )
        return ranks

    def _sensitivities(self, model: nn.Module, cands: list[_Candidate]) -> dict[str, float]:
        """``budget ... by sensitivity``: each layer's weight in the allocation, measured with
        the layer alone at half its break-even rank (:mod:`surgery.sensitivity`)."""
        assert self.context is not None
        probes: dict[str, tuple[nn.Module, float]] = {}
        for c in cands:
            assert c.full is not None
            rank = max(1, min(break_even_rank(c.in_f, c.out_f) // 2, c.full.rank))
            f = _truncate(c.full, rank)
            probes[c.path] = (self._lowrank(c.path, c.module, f), 1.0 - f.energy)
        weights = layer_sensitivities(
            model, probes, self._calibration(self.context), self.context.progress
        )
        for c in cands:
            c.row.detail["sensitivity"] = round(weights[c.path], 6)
        return weights

    def _costs(self, row: PlanRow, in_f: int, out_f: int, rank: int, old_rank: int | None) -> None:
        bias = row.params_before - (old_rank * (in_f + out_f) if old_rank else in_f * out_f)
        row.params_after = rank * (in_f + out_f) + bias
        # FLOPs scale like the weights: every row goes through r·(in+out) MACs, not in·out.
        dense = old_rank * (in_f + out_f) if old_rank else in_f * out_f
        row.flops_after = row.flops_before * rank * (in_f + out_f) // dense

    def _faster_conv_ranks(
        self, cand: _Candidate, requested: tuple[int, int]
    ) -> tuple[tuple[int, int] | None, str]:
        """``keep if faster`` for a conv: the ``(r_out, r_in)`` just below the latency cliff
        on the recipe's first target (torch CPU when it names none), both ranks scaled
        together in tile steps of the larger one; None when no pair beats the dense conv.

        The conv and its factored form (TuckerConv2d for k×k, the LowRankConv2d pair at
        ``(rank, rank)`` for 1×1) are timed alone at the conv's real input shape; tables are
        cached on disk and the choice is a pure function of the table
        (`surgery.passes.rank_latency.choose_tucker_ranks`)."""
        assert self.context is not None
        analysis = self.context.analysis
        return self._time_on_first_target(
            cand,
            lambda timer: keep_if_faster_tucker_ranks(
                {cand.path: cand.module}, analysis, {cand.path: requested}, timer
            ),
        )

    def _tucker_request(self, module: nn.Conv2d) -> tuple[int, int]:
        """The ``(r_out, r_in)`` the statement's rank asks of a k×k conv (before `keep if
        faster`): a fraction or absolute rank of each mode, or each mode's energy threshold."""
        rank = self.statement.rank
        assert rank is not None
        return resolve_tucker_ranks(rank, module.weight, multiple=self._multiple)

    def _plan_tucker(self, cand: _Candidate) -> None:
        stmt: ast.Decompose = self.statement
        module = cand.module
        assert isinstance(module, nn.Conv2d)
        row = cand.row
        S, C = module.weight.shape[:2]
        w = module.weight.detach().to(torch.float64)
        r_out, r_in = self._tucker_request(module)
        row.detail["rank"] = f"{r_out}×{r_in}"
        row.detail["full_rank"] = f"{S}×{C}"
        in_hw = cand.extra.get("in_hw") or 1
        out_hw = cand.extra.get("out_hw") or 1
        dense_p, tucker_p, dense_m, tucker_m = _tucker_costs(module, r_out, r_in, in_hw, out_hw)
        if tucker_p >= dense_p or tucker_m >= dense_m:
            what = "parameters" if tucker_p >= dense_p else "FLOPs"
            row.action = "skip"
            row.note = (
                f"Tucker ranks {r_out}×{r_in} save no {what} ({tucker_p:,} vs {dense_p:,} weights)"
            )
            return
        if stmt.keep_if_faster is not None:
            # Pairs at or below the requested one in both ranks: they save at least as much.
            chosen, where = self._faster_conv_ranks(cand, (r_out, r_in))
            row.detail["measured_on"] = where
            if chosen is None:
                row.action = "skip"
                row.note = f"no rank ≤ {r_out}×{r_in} is faster than dense on {where}"
                return
            if chosen != (r_out, r_in):
                row.detail["requested_rank"] = f"{r_out}×{r_in}"
                r_out, r_in = chosen
                row.detail["rank"] = f"{r_out}×{r_in}"
                dense_p, tucker_p, dense_m, tucker_m = _tucker_costs(
                    module, r_out, r_in, in_hw, out_hw
                )
        _, core, _ = tucker2_factors(module.weight, rank_out=r_out, rank_in=r_in)
        total = float(w.square().sum())
        kept = float(core.to(torch.float64).square().sum())  # orthonormal U: ‖core‖² is kept energy
        row.detail["energy"] = round(kept / total if total > 0 else 1.0, 6)
        bias = module.bias.numel() if module.bias is not None else 0
        row.params_after = tucker_p + bias
        row.flops_after = row.flops_before * tucker_m // max(dense_m, 1)
        cand.extra["factors"] = (r_out, r_in)

    # --- progressive steps k > 1 ----------------------------------------------------------

    def _plan_refactor(self, model: nn.Module, context: PassContext) -> StepPlan:
        plan = self.new_plan()
        k, K = self.family_step, self._steps
        method = self._method_for("linear")
        pairs = pairs_of(model, self._tag)
        if not pairs:
            plan.notes.append(f"step {k}/{K}: no pair made by step 1 of this statement is left")
            return plan
        stats = self._stats(model, context, dict[str, nn.Module](pairs), method)
        analysis = context.analysis
        refactored: dict[str, Factors] = {}
        for i, (path, m) in enumerate(pairs.items()):
            schedule = schedule_of(m)
            info = analysis.modules.get(path)
            if isinstance(m, LowRankLinear):
                in_f, out_f = m.in_features, m.out_features
            else:
                in_f, out_f = m.in_channels, m.out_channels
            old = m.rank
            row = PlanRow(
                path=path,
                type=type(m).__name__,
                shape=f"{in_f}→{out_f}",
                action="decompose",
                params_before=sum(p.numel() for p in m.parameters()),
                params_after=0,
                flops_before=info.flops if info else 0,
                flops_after=0,
                detail={"method": method, "rank": schedule[k - 1], "full_rank": min(in_f, out_f)},
            )
            row.params_after, row.flops_after = row.params_before, row.flops_before
            plan.rows.append(row)
            rank = schedule[min(k, len(schedule)) - 1]
            row.detail["step"] = f"{k}/{K}"
            row.detail["target"] = schedule[-1]
            if rank >= old:
                row.action, row.note = "skip", f"rank stays {old} at this step"
                continue
            first = m.first.weight.reshape(old, in_f)  # [r, in] (1×1 conv: [r, C, 1, 1])
            second = m.second.weight.reshape(out_f, old)  # [out, r]
            gram: Tensor | None = None
            if method in ("asvd", "svd-llm"):
                s = stats[path]
                if s.rows == 0:
                    row.action, row.note = "skip", "not reached by the calibration inputs"
                    continue
                if method == "asvd":
                    gram = s.asvd_scale.square()  # [in]: the metric diag(s²)
                else:
                    gram = s.xtx
                    s.xtx = None
            f = refactor_pair(first, second, rank, gram)
            refactored[path] = f
            row.detail["rank"] = rank
            row.detail["energy"] = round(f.energy, 6)
            self._costs(row, in_f, out_f, rank, old_rank=old)
            if context.progress is not None:
                context.progress("refactoring", i + 1, len(pairs))
        plan.data["factors"] = refactored
        plan.data["tucker"] = {}
        plan.data["schedules"] = {p: schedule_of(m) for p, m in pairs.items()}
        annotate_member(plan, context, self.family_step, self._steps)
        return plan

    # --- applying -------------------------------------------------------------------------

    def run(self, model: nn.Module) -> tuple[StepPlan, list[Change]]:
        """Plan and apply; with a per-layer rank rule (a fraction, an absolute rank or an
        energy threshold, no budget, no progressive family) each matrix layer is replaced as
        soon as it is factored, so besides the model only one layer's factors are ever alive.
        The result is the same as :meth:`plan` then :meth:`apply`."""
        stmt: ast.Decompose = self.statement
        if (
            stmt.budget is not None
            or stmt.rank_auto is not None
            or self._steps > 1
            or self.family_step > 1
        ):
            return super().run(model)
        self._streamed = {}
        try:
            return super().run(model)
        finally:
            self._streamed = None

    def apply(self, model: nn.Module, plan: StepPlan) -> list[Change]:
        """Replace every planned layer; frees each layer's factors as soon as it is used."""
        factors: dict[str, Factors] = plan.data.get("factors", {})
        tucker: dict[str, tuple[int, int]] = plan.data.get("tucker", {})
        schedules: dict[str, list[int]] = plan.data.get("schedules", {})
        streamed = self._streamed or {}
        changes: list[Change] = []
        for row in plan.changed_rows:
            if row.path in streamed:  # replaced while planning (:meth:`run`)
                changes.append(streamed[row.path])
                continue
            if row.path in tucker:
                old = model.get_submodule(row.path)
                if not isinstance(old, nn.Conv2d):
                    raise self.moved(row.path, "Conv2d")
                r_out, r_in = tucker[row.path]
                new = TuckerConv2d.from_conv(old, rank_out=r_out, rank_in=r_in)
                new.train(old.training)
                model.set_submodule(row.path, new)
                changes.append(self._change(row))
            else:
                f = factors.pop(row.path)
                changes.append(self._replace(model, row, f, schedules.get(row.path)))
        if self._steps > 1 and changes:
            member_drift(model, plan, self.context)
        return changes

    def _replace(
        self, model: nn.Module, row: PlanRow, f: Factors, schedule: list[int] | None
    ) -> Change:
        """Swap the matrix layer at ``row.path`` for its low-rank pair built from ``f``."""
        new = self._lowrank(row.path, model.get_submodule(row.path), f)
        if schedule is not None:
            mark_pair(new, self._tag, schedule)
        model.set_submodule(row.path, new)
        return self._change(row)

    def _lowrank(self, path: str, old: nn.Module, f: Factors) -> nn.Module:
        """The low-rank pair built from ``f`` for the matrix layer ``old`` at ``path``."""
        if isinstance(old, nn.Conv2d | LowRankConv2d):
            return LowRankConv2d.from_factors(old, f)
        if (
            isinstance(old, nn.Linear | LowRankLinear)
            or "Conv1D" in type_names(old)
            or self._stands_for_linear(path, old)
        ):
            return LowRankLinear.from_factors(old, f)
        raise self.moved(path, "Linear")

    def _change(self, row: PlanRow) -> Change:
        detail: dict[str, Any] = {
            k: row.detail[k] for k in ("rank", "method", "energy") if k in row.detail
        }
        return self.change(row.path, "decompose", **detail)


def _energy(sv: Tensor, rank: int) -> float:
    sq = sv.to(torch.float64).square()
    total = float(sq.sum())
    return 1.0 if total == 0.0 else float(sq[:rank].sum()) / total


def _truncate(f: Factors, rank: int) -> Factors:
    """``f`` at a lower rank: the √Σ and SVD-LLM splits truncate by slicing (cloned, so the
    full factors can be freed)."""
    if rank == f.rank:
        return f
    return Factors(
        left=f.left[:, :rank].clone(),
        right=f.right[:rank].clone(),
        singular_values=f.singular_values,
        rank=rank,
        energy=_energy(f.singular_values, rank),
    )
