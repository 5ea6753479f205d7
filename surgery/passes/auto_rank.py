"""``rank = auto`` and ``budget latency P``: per-layer ranks chosen by the compiler.

The recipe says what the result must achieve (``expect speedup >= X [on B]``,
``expect drift <= D``) or caps the matched layers' latency (``budget latency 60%``); this
module finds the ranks. Every matched matrix layer gets a list of *options*: stay dense, or
one of its candidate ranks (multiples of the target's tile, or of ``round N``, up to the
break-even rank). Each option has

* a **latency**: the layer timed alone at its real input shape on the recipe's first target
  (:class:`surgery.timing.LayerTimer`, the tables ``keep if faster`` uses), and
* an **error**: ``w · lost(r)``, with ``lost(r)`` the fraction of the layer's (data-aware:
  ``method svd-llm``/``asvd``) ``Σσ²`` that rank ``r`` discards and ``w`` the layer's measured
  sensitivity (:mod:`surgery.sensitivity`: the model's squared drift per unit of lost energy,
  so ``Σ w·lost`` predicts the squared drift of the whole assignment). Without sensitivities
  (``budget latency`` without ``by sensitivity``) ``w = 1``: the error is the lost energy.

Choosing one option per layer is a multiple-choice knapsack. :func:`pareto_front` solves it
exactly: it folds the layers in one at a time, keeping every assignment no other beats in both
summed latency and summed error (the Pareto front; a front larger than ``max_points`` is
thinned to the fastest point per step of log-error, which keeps every latency reachable). Every goal is then a choice on that front
(:func:`search`): a latency cap keeps the least error under it, an error cap alone the least
latency under it. The front is the "frontier explored" the plan keeps.

**From layers to the model.** A layer table says nothing about the rest of the model
(attention, norms, activations). A speedup contract is turned into a cap on the matched
layers' summed latency with their *share* ``f`` of the model's time, measured by timing the
matched layers inside one forward of the calibration batch (:func:`layer_share`, eager
torch): the model's predicted time is ``1 − f + f·L/L₀`` of the original for layers' latency
``L`` against ``L₀`` dense. On another target the share is assumed equal (the plan says so).
What the prediction misses, the manager measures: :func:`refine` turns a measured miss into
tighter targets (:class:`Margins`) for a second search.

>>> layers = [Layer("a", 10.0, [(8, 4.0, 0.5), (16, 6.0, 0.1)]),
...           Layer("b", 10.0, [(8, 3.0, 2.0)])]
>>> front = pareto_front(layers)
>>> [(round(p.latency, 1), round(p.error, 1)) for p in front.points()]
[(7.0, 2.5), (9.0, 2.1), (13.0, 2.0), (14.0, 0.5), (16.0, 0.1), (20.0, 0.0)]
>>> pick = search(layers, [Goal("budget latency 70%", latency=14.0)])
>>> pick.ranks, pick.latency, pick.error
({'a': 8, 'b': None}, 14.0, 0.5)
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "Front",
    "Goal",
    "Layer",
    "Margins",
    "Pick",
    "Predictor",
    "Unreachable",
    "candidate_grid",
    "layer_share",
    "measured_for",
    "pareto_front",
    "refine",
    "search",
]

#: Largest Pareto front kept between layers (beyond it: the best point per latency bucket).
MAX_POINTS = 4000
#: Frontier points kept on the plan for the report.
FRONTIER_POINTS = 48
#: Extra tightening on top of the measured miss when :func:`refine` retries.
_RETRY_SLACK = 1.01


# --- the knapsack ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One layer's options: ``(rank, latency, error)`` for each candidate rank; staying dense
    (``rank`` None) costs ``dense`` and no error and is always an option."""

    path: str
    dense: float
    options: Sequence[tuple[int, float, float]]

    def choices(self) -> list[tuple[int | None, float, float]]:
        """Dense and the candidates no other option beats in both latency and error (a rank
        slower than dense never pays: dense has no error)."""
        all_: list[tuple[int | None, float, float]] = [(None, self.dense, 0.0)]
        all_ += [(r, t, e) for r, t, e in self.options if t < self.dense]
        all_.sort(key=lambda o: (o[1], o[2]))
        kept: list[tuple[int | None, float, float]] = []
        best = math.inf
        for option in all_:
            if option[2] < best:
                kept.append(option)
                best = option[2]
        return kept


@dataclass
class Front:
    """The Pareto front of the layers folded so far, with back-pointers to the assignment of
    each point."""

    layers: list[Layer]
    choices: list[list[tuple[int | None, float, float]]]
    latency: np.ndarray
    error: np.ndarray
    back: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    thinned: bool = False

    def __len__(self) -> int:
        return len(self.latency)

    def assignment(self, index: int) -> dict[str, int | None]:
        """Rank per layer (None: dense) of front point ``index``."""
        ranks: dict[str, int | None] = {}
        j = index
        for layer, opts, (parent, option) in zip(
            reversed(self.layers), reversed(self.choices), reversed(self.back), strict=True
        ):
            ranks[layer.path] = opts[int(option[j])][0]
            j = int(parent[j])
        return dict(reversed(list(ranks.items())))

    def points(self) -> list[Pick]:
        return [self.pick(i) for i in range(len(self))]

    def pick(self, index: int) -> Pick:
        return Pick(self.assignment(index), float(self.latency[index]), float(self.error[index]))


def pareto_front(layers: Sequence[Layer], *, max_points: int = MAX_POINTS) -> Front:
    """Every assignment of one option per layer that no other beats in both summed latency
    and summed error, by increasing latency (exact unless the front outgrew ``max_points``:
    then :func:`_thin` keeps it near, never losing a latency some assignment reaches)."""
    choices = [layer.choices() for layer in layers]
    front = Front(list(layers), choices, np.zeros(1), np.zeros(1))
    for opts in choices:
        lat = np.array([o[1] for o in opts])
        err = np.array([o[2] for o in opts])
        n, k = len(front.latency), len(opts)
        total_lat = (front.latency[:, None] + lat[None, :]).ravel()
        total_err = (front.error[:, None] + err[None, :]).ravel()
        parent = np.repeat(np.arange(n), k)
        option = np.tile(np.arange(k), n)
        order = np.lexsort((total_err, total_lat))  # by latency, then error
        total_lat, total_err = total_lat[order], total_err[order]
        parent, option = parent[order], option[order]
        before = np.concatenate(([np.inf], np.minimum.accumulate(total_err)[:-1]))
        keep = total_err < before  # strictly less error than every faster point
        total_lat, total_err = total_lat[keep], total_err[keep]
        parent, option = parent[keep], option[keep]
        if len(total_lat) > max_points:
            kept = _thin(total_err, max_points)
            total_lat, total_err = total_lat[kept], total_err[kept]
            parent, option = parent[kept], option[kept]
            front.thinned = True
        front.latency, front.error = total_lat, total_err
        front.back.append((parent, option))
    return front


def _thin(error: np.ndarray, most: int) -> np.ndarray:
    """Which points of a front (by increasing latency, so decreasing error) to keep: the
    fastest point of each of ``most`` equal steps of ``log(error)``. Every dropped point has a
    kept one that is no slower and whose error is at most one step larger, so a latency cap
    that some point met is still met (the error is what thinning approximates)."""
    floor = max(float(error[0]) * 1e-9, 1e-300)
    logs = np.log(error + floor)
    width = (logs[0] - logs[-1]) / most
    if not width > 0:
        return np.arange(len(error)) < 1
    bins = np.floor((logs[0] - logs) / width).astype(np.int64)
    return np.r_[True, bins[1:] != bins[:-1]]


# --- goals and the search ----------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """One constraint of the search, in the layers' own units: summed latency at most
    ``latency`` or summed error at most ``error``. ``text`` names its source (a contract or
    the budget) for the plan and the diagnostic, ``node`` its place in the recipe."""

    text: str
    latency: float | None = None
    error: float | None = None
    node: Any = None
    kind: str = "latency"  # "speedup", "latency" (a budget) or "drift"
    target: float | None = None  # the contract's value as written (speedup X, drift D)


@dataclass(frozen=True)
class Pick:
    """A point of the front: ranks per layer (None: dense), summed latency and error."""

    ranks: dict[str, int | None]
    latency: float
    error: float


@dataclass(frozen=True)
class Unreachable:
    """No assignment meets every goal: ``goal`` binds; ``best`` is the point that comes
    closest to it (within the other goals when some assignment meets those)."""

    goal: Goal
    best: Pick
    others: tuple[Goal, ...] = ()
    alone: bool = True  # no assignment meets ``goal`` even ignoring the other goals


def search(
    layers: Sequence[Layer], goals: Sequence[Goal], *, front: Front | None = None
) -> Pick | Unreachable:
    """The best assignment under ``goals``: with a latency cap, the least error under every
    cap; with error caps only, the least latency under them.

    >>> layers = [Layer("a", 4.0, [(8, 1.0, 1.0)]), Layer("b", 4.0, [(8, 2.0, 3.0)])]
    >>> miss = search(layers, [Goal("fast", latency=3.0), Goal("close", error=2.0, kind="drift")])
    >>> miss.goal.text, miss.alone, (miss.best.latency, miss.best.error)  # fastest with error ≤ 2
    ('fast', False, (5.0, 1.0))
    """
    front = front or pareto_front(layers)
    lat, err = front.latency, front.error
    tol = 1e-12
    lat_goals = [g for g in goals if g.latency is not None]
    err_goals = [g for g in goals if g.error is not None]
    lat_ok = np.ones(len(front), dtype=bool)
    for g in lat_goals:
        assert g.latency is not None
        lat_ok &= lat <= g.latency * (1 + tol) + tol
    err_ok = np.ones(len(front), dtype=bool)
    for g in err_goals:
        assert g.error is not None
        err_ok &= err <= g.error * (1 + tol) + tol
    both = lat_ok & err_ok
    if both.any():
        idx = np.flatnonzero(both)
        if lat_goals:  # least error, then least latency (the front is sorted by latency)
            best = idx[np.argmin(err[idx])]
        else:
            best = idx[0]
        return front.pick(int(best))
    if not lat_ok.any():  # the tightest latency cap binds on its own
        goal = min(lat_goals, key=lambda g: g.latency if g.latency is not None else math.inf)
        return Unreachable(goal, front.pick(0), tuple(g for g in goals if g is not goal))
    if not err_ok.any():  # pragma: no cover - dense has no error, so an error cap ≥ 0 holds
        goal = min(err_goals, key=lambda g: g.error if g.error is not None else math.inf)
        return Unreachable(goal, front.pick(len(front) - 1), tuple(goals))
    # Each kind can be met alone, not together: the latency goal binds given the error caps;
    # the best reachable is the fastest assignment that meets every error cap.
    goal = min(lat_goals, key=lambda g: g.latency if g.latency is not None else math.inf)
    best = int(np.flatnonzero(err_ok)[0])
    return Unreachable(
        goal, front.pick(best), tuple(g for g in goals if g is not goal), alone=False
    )


# --- from the layers to the model -----------------------------------------------------------


@dataclass(frozen=True)
class Predictor:
    """Model-level predictions from the layers' summed latency and error.

    ``dense`` is the matched layers' summed dense latency, ``share`` their share of the model's
    time (None: not measured), ``drift_units``: the error is a predicted squared drift.

    >>> p = Predictor(dense=10.0, share=0.5, drift_units=True)
    >>> round(p.speedup(5.0), 4), round(p.latency_for_speedup(4 / 3), 4), p.drift(0.04)
    (1.3333, 5.0, 0.2)
    """

    dense: float
    share: float | None = None
    drift_units: bool = True

    def speedup(self, latency: float) -> float | None:
        if self.share is None or self.dense <= 0:
            return None
        return 1.0 / (1.0 - self.share + self.share * latency / self.dense)

    def latency_for_speedup(self, speedup: float) -> float:
        """The largest summed layer latency at which the model is predicted ``speedup``×
        faster (negative when no layer latency is small enough)."""
        assert self.share is not None and self.share > 0
        return self.dense * (1.0 / speedup - (1.0 - self.share)) / self.share

    def drift(self, error: float) -> float | None:
        return math.sqrt(max(error, 0.0)) if self.drift_units else None

    def describe(self, pick: Pick) -> str:
        parts = [f"layers at {pick.latency / self.dense:.1%} of their dense latency"]
        s = self.speedup(pick.latency)
        if s is not None:
            parts.append(f"model {s:.2f}× faster")
        d = self.drift(pick.error)
        parts.append(f"drift {d:.4g}" if d is not None else f"lost energy {pick.error:.4g}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Margins:
    """How much tighter than the contracts as written the search aims: every speedup target
    times ``speedup`` (≥ 1), every drift cap times ``drift`` (≤ 1). Raised by :func:`refine`
    after a measured miss; the manager hands them to the pass in its context."""

    speedup: float = 1.0
    drift: float = 1.0


def refine(
    plan: Any, measured_speedup: float | None, measured_drift: float | None = None
) -> Margins | None:
    """Tighter targets for a second search after the measured result missed, or None.

    ``plan`` is the decompose step's :class:`~surgery.passes.base.StepPlan` (its ``data["auto"]``
    holds what the search predicted, the contracts it aimed at and the margins it used);
    ``measured_speedup`` and ``measured_drift`` are what the run measured for those contracts
    (:func:`measured_for` reads them from the evaluated contracts). If the measured speedup
    falls short of the speedup contract, the predictor was optimistic by
    ``predicted / measured``: the next search must predict that much more (plus 1%). Likewise
    a drift over its cap scales the next cap by ``predicted / measured``. None when every
    aimed-at contract was met, or the plan has no search.

    >>> from types import SimpleNamespace
    >>> plan = SimpleNamespace(data={"auto": {"speedup_target": 1.6, "predicted_speedup": 1.7,
    ...     "drift_target": None, "predicted_drift": 0.1, "margins": [1.0, 1.0]}})
    >>> m = refine(plan, 1.5)  # predicted 1.7, measured 1.5: aim at 1.7/1.5·1.01 of 1.6
    >>> round(m.speedup, 4), m.drift
    (1.1447, 1.0)
    >>> refine(plan, 1.65) is None
    True
    """
    info = getattr(plan, "data", {}).get("auto")
    if not info:
        return None
    speedup_margin, drift_margin = info["margins"]
    new_speedup, new_drift = speedup_margin, drift_margin
    missed = False
    target, predicted = info.get("speedup_target"), info.get("predicted_speedup")
    if target is not None and predicted and measured_speedup and measured_speedup < target:
        new_speedup = max(
            speedup_margin * _RETRY_SLACK, predicted / measured_speedup * _RETRY_SLACK
        )
        missed = True
    cap, predicted_drift = info.get("drift_target"), info.get("predicted_drift")
    if cap is not None and predicted_drift and measured_drift and measured_drift > cap:
        new_drift = min(
            drift_margin / _RETRY_SLACK, predicted_drift / measured_drift / _RETRY_SLACK
        )
        missed = True
    return Margins(new_speedup, new_drift) if missed else None


def measured_for(plan: Any, contracts: Iterable[Any]) -> tuple[float | None, float | None]:
    """``(speedup, drift)`` the run measured for the contracts the plan's search aimed at
    (the evaluated :class:`surgery.contracts.Contract` objects of a run, matched by line)."""
    info = getattr(plan, "data", {}).get("auto") or {}
    speedup = drift = None
    for c in contracts:
        line = c.statement.span.line
        if c.measured is None:
            continue
        if line == info.get("speedup_line"):
            speedup = float(c.measured)
        if line == info.get("drift_line"):
            drift = float(c.measured)
    return speedup, drift


# --- inputs of the search ---------------------------------------------------------------------


def candidate_grid(cap: int, step: int, *, most: int = 16) -> list[int]:
    """Candidate ranks of a layer: multiples of ``step`` up to ``cap`` (the largest rank that
    still saves parameters), at most ``most`` of them spread evenly, the smallest and largest
    always in; ``[cap]`` when ``cap`` is below one step.

    >>> candidate_grid(383, 8, most=5)
    [8, 104, 192, 280, 376]
    >>> candidate_grid(15, 8), candidate_grid(5, 8), candidate_grid(0, 8)
    ([8], [5], [])
    """
    if cap < 1:
        return []
    grid = list(range(step, cap + 1, step)) or [cap]
    if len(grid) <= most:
        return grid
    picks = np.unique(np.round(np.linspace(0, len(grid) - 1, most)).astype(int))
    return [grid[i] for i in picks]


def lost_energy(singular_values: torch.Tensor, ranks: Iterable[int]) -> dict[int, float]:
    """Fraction of ``Σσ²`` each rank discards.

    >>> {r: round(v, 6) for r, v in lost_energy(torch.tensor([2.0, 1.0]), [1, 2]).items()}
    {1: 0.2, 2: 0.0}
    """
    sq = singular_values.to(torch.float64).square()
    total = float(sq.sum())
    cum = torch.cumsum(sq, 0)
    out = {}
    for r in ranks:
        kept = float(cum[min(r, len(cum)) - 1]) if r > 0 else 0.0
        out[r] = 0.0 if total == 0 else max(0.0, 1.0 - kept / total)
    return out


def layer_share(
    model: nn.Module, paths: Sequence[str], batch: Any, *, warmup: int = 1, repeats: int = 5
) -> float:
    """Median share of one forward of ``batch`` (an ``Inputs``) spent inside the modules at
    ``paths``, timed with forward hooks in eager torch (the model is unchanged)."""
    modules = [model.get_submodule(p) for p in paths]
    started: dict[int, float] = {}
    spent = [0.0]

    def pre(module: nn.Module, args: Any) -> None:
        started[id(module)] = time.perf_counter()

    def post(module: nn.Module, args: Any, out: Any) -> None:
        spent[0] += time.perf_counter() - started.pop(id(module), time.perf_counter())

    handles = [h for m in modules for h in (m.register_forward_pre_hook(pre),)]
    handles += [m.register_forward_hook(post) for m in modules]
    was_training = model.training
    model.eval()
    shares = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                batch.call(model)
            for _ in range(repeats):
                spent[0] = 0.0
                start = time.perf_counter()
                batch.call(model)
                total = time.perf_counter() - start
                shares.append(min(1.0, spent[0] / total) if total > 0 else 0.0)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return statistics.median(shares)


def frontier(front: Front, predictor: Predictor, chosen: Pick | None) -> list[dict[str, Any]]:
    """At most :data:`FRONTIER_POINTS` points of the front, evenly spread in latency, with the
    chosen one: ``latency`` (fraction of the layers' dense latency), predicted model
    ``speedup`` (None without a measured share), ``error`` and predicted ``drift``."""
    n = len(front)
    keep = set(np.unique(np.round(np.linspace(0, n - 1, min(n, FRONTIER_POINTS))).astype(int)))
    points = []
    for i in sorted(keep):
        lat, err = float(front.latency[i]), float(front.error[i])
        points.append(_point(lat, err, predictor, chosen=False))
    if chosen is not None:
        points.append(_point(chosen.latency, chosen.error, predictor, chosen=True))
        points.sort(key=lambda p: (p["latency"], not p["chosen"]))
    return points


def _point(lat: float, err: float, predictor: Predictor, *, chosen: bool) -> dict[str, Any]:
    speedup = predictor.speedup(lat)
    drift = predictor.drift(err)
    return {
        "latency": round(lat / predictor.dense, 6) if predictor.dense else 0.0,
        "speedup": round(speedup, 4) if speedup is not None else None,
        "error": round(err, 8),
        "drift": round(drift, 6) if drift is not None else None,
        "chosen": chosen,
    }


def goals_from(
    contracts: Sequence[Any],
    predictor: Predictor,
    margins: Margins,
    *,
    budget: Any = None,
    budget_text: str = "",
) -> tuple[list[Goal], list[str]]:
    """The search's goals from the recipe's contracts (``expect speedup >/>= X``,
    ``expect drift </<= D``; others are not predicted) and a latency budget; notes on what
    was left out."""
    goals: list[Goal] = []
    notes: list[str] = []
    if budget is not None:
        goals.append(
            Goal(budget_text, latency=budget.value.magnitude * predictor.dense, node=budget)
        )
    for c in contracts:
        metric, op = c.metric.value, c.op
        text = _text(c)
        value = c.value.magnitude
        if metric == "speedup" and op in (">", ">="):
            if predictor.share is None:
                continue
            aim = value * margins.speedup * (1.0000001 if op == ">" else 1.0)
            goals.append(
                Goal(
                    text,
                    latency=predictor.latency_for_speedup(aim),
                    node=c,
                    kind="speedup",
                    target=value,
                )
            )
        elif metric == "drift" and op in ("<", "<="):
            if not predictor.drift_units:
                notes.append(f"`{text}` is not predicted: the layers are weighed by spectra alone")
                continue
            cap = value * margins.drift
            goals.append(Goal(text, error=cap * cap, node=c, kind="drift", target=value))
    return goals, notes


def _text(c: Any) -> str:
    from surgery.fmt import format_statement

    return format_statement(c)
