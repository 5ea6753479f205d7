"""``report.html``: one self-contained page with the run's evidence, plotted.

The page needs no network: styles are inline and every plot is drawn by matplotlib into SVG
that is inlined in the page (no scripts, no fonts, no images fetched). What it shows, each
figure only when the run has the data for it:

* per-layer parameters and FLOPs before and after, and the measured latency of each changed
  layer before and after (eager torch on the first calibration batch: each layer timed alone
  on the input it received, median of :data:`LAYER_REPEATS`; see :func:`layer_latency`);
* the rank chosen per layer, against the layer's full rank;
* healing: the loss of every step, and the held-out evaluations (``HealReport.evals``) when
  the heal made any;
* the Pareto front of a progressive family (FLOP-ideal speedup of each member against its
  drift) and of the points an ``auto`` search explored (``explored``);
* predicted (FLOP-ideal) against measured speedup per target, with the measured intervals;
* the contracts with their intervals, the plan, the warnings, the provenance and the recipe.

``report.md`` (:mod:`surgery.report`) stays the terminal's version of the same run.
"""

from __future__ import annotations

import html
import io
import platform
import re
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery import __version__
from surgery.manager import Run
from surgery.passes import PlanRow
from surgery.report import human

__all__ = [
    "LAYER_REPEATS",
    "MAX_LAYERS",
    "layer_latency",
    "pareto_front",
    "report_html",
    "write_report_html",
]

#: Timed calls of each layer (after one warm-up call) for the per-layer latency plot.
LAYER_REPEATS = 7
#: At most this many changed layers are plotted (and timed): the first ones in model order.
MAX_LAYERS = 64

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#1d2125;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
.met{color:#146c2e;font-weight:600}.failed{color:#b3261e;font-weight:600}.unknown{color:#8a6d00}
figure{margin:1.2em 0}figcaption{font-size:.9em;color:#555;margin-top:.3em}
figure svg{max-width:100%;height:auto}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em}
.meta{color:#555;font-size:.9em}.note{color:#555}
"""


# --- data the plots read --------------------------------------------------------------------------


def _changed_rows(run: Run) -> list[PlanRow]:
    """The last changing plan row of each layer, in the order the run first changed them."""
    rows: dict[str, PlanRow] = {}
    for step in run.steps:
        for row in step.plan.rows:
            if row.action != "skip":
                rows[row.path] = row
    return list(rows.values())[:MAX_LAYERS]


def _layer_costs(run: Run, rows: Sequence[PlanRow]) -> list[tuple[str, int, int, int, int]]:
    """``(path, params before, after, FLOPs before, after)`` of each changed layer: from the
    analyses of the model before and after the run, else from the plan row."""
    out = []
    for row in rows:
        before = run.before.modules.get(row.path)
        after = run.after.modules.get(row.path)
        out.append(
            (
                row.path,
                before.params if before else row.params_before,
                after.params if after else row.params_after,
                before.flops if before else row.flops_before,
                after.flops if after else row.flops_after,
            )
        )
    return out


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _captured_inputs(model: nn.Module, paths: Iterable[str], batch: Any) -> dict[str, Any]:
    """The ``(args, kwargs)`` each module at ``paths`` is first called with on ``batch``."""
    seen: dict[str, Any] = {}
    handles = []
    for path in paths:
        module = _submodule(model, path)
        if module is None:
            continue

        def hook(mod: nn.Module, args: Any, kwargs: Any, path: str = path) -> None:
            seen.setdefault(path, (args, kwargs))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        batch.call(model)
    finally:
        for h in handles:
            h.remove()
    return seen


def _median_ms(module: nn.Module, call: tuple[Any, Any], repeats: int) -> float:
    args, kwargs = call
    with torch.inference_mode():
        module(*args, **kwargs)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(*args, **kwargs)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def layer_latency(
    run: Run, paths: Sequence[str] | None = None, *, repeats: int = LAYER_REPEATS
) -> dict[str, tuple[float | None, float | None]]:
    """Measured milliseconds of each layer before and after surgery, on eager torch.

    Each layer of the original and of the surgered model (same path) is timed alone on the
    input it receives when the whole model runs on the first calibration batch (median of
    ``repeats`` calls after one warm-up). A layer that is gone after surgery is ``None``.
    ``paths`` defaults to the changed layers.
    """
    chosen = list(paths) if paths is not None else [r.path for r in _changed_rows(run)]
    batch = run.calibration[0] if run.calibration else run.example
    out: dict[str, tuple[float | None, float | None]] = {}
    was = (run.original.training, run.model.training)
    run.original.eval()
    run.model.eval()
    try:
        before = _captured_inputs(run.original, chosen, batch)
        after = _captured_inputs(run.model, chosen, batch)
        for path in chosen:
            a = _submodule(run.original, path)
            b = _submodule(run.model, path)
            ms_a = (
                _median_ms(a, before[path], repeats) if a is not None and path in before else None
            )
            ms_b = _median_ms(b, after[path], repeats) if b is not None and path in after else None
            out[path] = (ms_a, ms_b)
    finally:
        run.original.train(was[0])
        run.model.train(was[1])
    return out


def _rank_of(row: PlanRow) -> tuple[float, float] | None:
    """(chosen rank, full rank) of a decomposed layer; a Tucker conv's ``a×b`` ranks count as
    their product against the full product."""

    def value(v: Any) -> float | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, int | float):
            return float(v)
        if isinstance(v, str) and re.fullmatch(r"\d+×\d+", v):
            a, b = v.split("×")
            return float(int(a) * int(b))
        return None

    rank, full = value(row.detail.get("rank")), value(row.detail.get("full_rank"))
    if rank is None or full is None:
        return None
    return rank, full


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: higher speedup (x) and lower loss (y).

    >>> pareto_front([(1.0, 0.1), (2.0, 0.3), (1.5, 0.4), (2.5, 0.5)])
    [0, 1, 3]
    """
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 >= x and y2 <= y) and (x2 > x or y2 < y)
            for j, (x2, y2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


# --- plotting ---------------------------------------------------------------------------------------


def _svg(fig: Any, index: int) -> str:
    """A matplotlib figure as inline SVG: no prolog, no metadata, ids made unique per figure."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "surgery"}):
        fig.savefig(
            buf,
            format="svg",
            bbox_inches="tight",
            metadata={"Date": None, "Creator": None, "Format": None, "Type": None},
        )
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    prefix = f"f{index}-"
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', text)
    text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}{m.group(1)}"', text)
    text = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}{m.group(1)})", text)
    return text.replace("<svg ", f'<svg role="img" aria-label="figure {index}" ', 1)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def _short(path: str, keep: int = 3) -> str:
    parts = path.split(".")
    return ".".join(parts[-keep:]) if len(parts) > keep else path


def _paired_bars(
    ax: Any, labels: Sequence[str], before: Sequence[float], after: Sequence[float], unit: str
) -> None:
    import numpy as np

    x = np.arange(len(labels))
    ax.bar(x - 0.2, before, 0.4, label="before", color="#9aa5b1")
    ax.bar(x + 0.2, after, 0.4, label="after", color="#2f6fde")
    ax.set_xticks(x, [_short(label) for label in labels], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(unit)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _layer_width(n: int) -> float:
    return min(16.0, max(6.0, 0.32 * n + 2))


def _plot_layer_costs(costs: Sequence[tuple[str, int, int, int, int]]) -> Any:
    fig = _figure(_layer_width(len(costs)), 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    labels = [c[0] for c in costs]
    _paired_bars(top, labels, [c[1] for c in costs], [c[2] for c in costs], "parameters")
    _paired_bars(bottom, labels, [c[3] for c in costs], [c[4] for c in costs], "FLOPs")
    top.set_title("parameters and FLOPs per changed layer")
    return fig


def _plot_latency(latency: Mapping[str, tuple[float | None, float | None]]) -> Any:
    fig = _figure(_layer_width(len(latency)), 3.6)
    ax = fig.subplots()
    labels = list(latency)
    _paired_bars(
        ax,
        labels,
        [v[0] or 0.0 for v in latency.values()],
        [v[1] or 0.0 for v in latency.values()],
        "ms (median)",
    )
    ax.set_title("measured latency per changed layer (eager torch, each layer alone)")
    return fig


def _plot_ranks(ranks: Sequence[tuple[str, float, float]]) -> Any:
    import numpy as np

    fig = _figure(_layer_width(len(ranks)), 3.6)
    ax = fig.subplots()
    x = np.arange(len(ranks))
    ax.bar(x, [r[2] for r in ranks], 0.7, color="none", edgecolor="#9aa5b1", label="full rank")
    ax.bar(x, [r[1] for r in ranks], 0.7, color="#2f6fde", label="chosen rank")
    ax.set_xticks(x, [_short(r[0]) for r in ranks], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("rank")
    ax.set_title("rank chosen per layer")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _plot_heal(heals: Sequence[Any]) -> Any:
    fig = _figure(8.0, 3.8)
    ax = fig.subplots()
    twin = None
    for i, report in enumerate(heals, 1):
        losses = list(getattr(report, "losses", []) or [])
        if losses:
            ax.plot(range(1, len(losses) + 1), losses, lw=1.2, label=f"heal {i}: training loss")
        evals = [e for e in getattr(report, "evals", None) or [] if "step" in e]
        for key in ("drift", "loss", "perplexity", "accuracy"):
            points = [(float(e["step"]), float(e[key])) for e in evals if key in e]
            if not points:
                continue
            if twin is None:
                twin = ax.twinx()
                twin.set_ylabel("held-out")
            twin.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                ls="--",
                lw=1,
                label=f"heal {i}: held-out {key}",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if all(v > 0 for r in heals for v in getattr(r, "losses", []) or []):
        ax.set_yscale("log")
    handles, labels = ax.get_legend_handles_labels()
    if twin is not None:
        h2, l2 = twin.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("healing")
    return fig


def _plot_pareto(series: Sequence[tuple[str, list[dict[str, Any]]]], y_label: str) -> Any:
    fig = _figure(7.0, 4.2)
    ax = fig.subplots()
    for name, points in series:
        xy = [(float(p["speedup"]), float(p["y"])) for p in points]
        ax.scatter([p[0] for p in xy], [p[1] for p in xy], s=28, alpha=0.75, label=name)
        front = sorted((xy[i] for i in pareto_front(xy)), key=lambda p: p[0])
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], lw=1.2, label=f"{name}: front")
        for p in points:
            if p.get("label"):
                ax.annotate(str(p["label"]), (float(p["speedup"]), float(p["y"])), fontsize=7)
            if p.get("chosen"):
                ax.scatter(
                    [float(p["speedup"])],
                    [float(p["y"])],
                    s=120,
                    facecolors="none",
                    edgecolors="#b3261e",
                    label="chosen",
                )
    ax.set_xlabel("speedup (×)")
    ax.set_ylabel(y_label)
    ax.set_title("Pareto front: speedup against quality")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _speed_rows(run: Run) -> list[tuple[str, float, float, float]]:
    """``(target, measured, ci low, ci high)`` of every measured speedup."""
    rows = []
    if run.speed is not None:
        s = run.speed
        rows.append((f"{s.device} (eager)", s.speedup, s.ci_low, s.ci_high))
    for v in run.verifications:
        t = getattr(v, "speed", None)
        if t is not None and getattr(v, "ok", False):
            rows.append((str(v.backend), t.speedup, t.ci_low, t.ci_high))
    return rows


def _plot_speed(run: Run, rows: Sequence[tuple[str, float, float, float]]) -> Any:
    import numpy as np

    fig = _figure(max(5.0, 1.4 * len(rows) + 3), 3.8)
    ax = fig.subplots()
    x = np.arange(len(rows))
    ideal = run.flop_speedup or 0.0
    ax.bar(x - 0.2, [ideal] * len(rows), 0.4, color="#9aa5b1", label="predicted (FLOP-ideal)")
    measured = [r[1] for r in rows]
    err = np.array([[r[1] - r[2] for r in rows], [r[3] - r[1] for r in rows]]).clip(min=0)
    ax.bar(x + 0.2, measured, 0.4, yerr=err, capsize=4, color="#2f6fde", label="measured (95% CI)")
    ax.axhline(1.0, color="#444", lw=0.8, ls=":")
    # A noisy timing's interval can be huge: keep the bars readable, the caps clipped.
    ax.set_ylim(0, 1.6 * max([ideal, *measured, 1.0]))
    ax.set_xticks(x, [r[0] for r in rows], fontsize=8)
    ax.set_ylabel("speedup (×)")
    ax.set_title("predicted against measured speedup per target")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


# --- the page ---------------------------------------------------------------------------------------


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: set[int]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ' class="num"' if i in numeric else ""
            cells.append(f"<td{cls}>{cell}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _family_points(run: Run) -> list[dict[str, Any]]:
    """One point per member of a progressive family: FLOP-ideal speedup, drift."""
    from surgery.graph import analyze

    points = []
    for member in run.family:
        flops = analyze(member.model, run.example, trace=False).total_flops
        if flops > 0:
            points.append(
                {
                    "speedup": run.flops_before / flops,
                    "y": member.drift,
                    "label": f"step {member.step}",
                }
            )
    return points


def _explored_points(explored: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Points of an ``auto`` search: each a mapping with ``speedup`` and a quality value
    (``quality``, else ``drift``), optionally ``label``, ``chosen``, ``metric``."""
    points = []
    metric = "drift"
    for p in explored:
        y = p.get("quality", p.get("drift"))
        if p.get("speedup") is None or y is None:
            continue
        if "quality" in p and p.get("metric"):
            metric = str(p["metric"])
        points.append(
            {
                "speedup": float(p["speedup"]),
                "y": float(y),
                "label": p.get("label"),
                "chosen": bool(p.get("chosen")),
            }
        )
    return points, metric


def report_html(
    run: Run,
    *,
    recipe: str = "recipe.surg",
    model: str = "model",
    recipe_source: str | None = None,
    latency: Mapping[str, tuple[float | None, float | None]] | None = None,
    explored: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The page (see the module docstring) as text. ``latency`` is per-layer milliseconds
    before and after (:func:`layer_latency`); ``explored`` the points of an ``auto`` search."""
    from surgery.fmt import format_recipe

    source = recipe_source if recipe_source is not None else format_recipe(run.recipe)
    figures: list[tuple[str, str]] = []  # (svg, caption)
    notes: list[str] = []

    def add(fig: Any, caption: str) -> None:
        figures.append((_svg(fig, len(figures) + 1), caption))

    rows = _changed_rows(run)
    if rows:
        add(
            _plot_layer_costs(_layer_costs(run, rows)),
            "Parameters and FLOPs (one forward of the example inputs) of each changed layer, "
            "before and after surgery (counted).",
        )
    else:
        notes.append("No layer was changed, so there are no per-layer plots.")
    if latency:
        add(
            _plot_latency(latency),
            "Measured latency of each changed layer before and after, each layer timed alone "
            "on eager torch on the input it receives from the first calibration batch (median "
            f"of {LAYER_REPEATS} calls); a bar of 0 is a layer that no longer exists.",
        )
    elif rows:
        notes.append("Per-layer latency was not measured (the run was not timed).")
    ranks = [(r.path, *rk) for r in rows if (rk := _rank_of(r)) is not None]
    if ranks:
        add(_plot_ranks(ranks), "Rank chosen for each decomposed layer, against its full rank.")
    if run.heals:
        add(
            _plot_heal(run.heals),
            "Training loss of each heal step (relative squared output error against the "
            "original) and, where the heal evaluated held-out data, those evaluations.",
        )
    series: list[tuple[str, list[dict[str, Any]]]] = []
    y_label = "drift (lower is better)"
    if run.family:
        family = _family_points(run)
        if family:
            series.append(("progressive family (FLOP-ideal speedup)", family))
    if explored:
        points, metric = _explored_points(explored)
        if points:
            series.append(("auto search", points))
            y_label = f"{metric} (lower is better)" if metric == "drift" else metric
    if series:
        add(
            _plot_pareto(series, y_label),
            "Each point a candidate model; the line joins those no other candidate beats on "
            "both speedup and quality.",
        )
    speed = _speed_rows(run)
    if speed and run.flop_speedup:
        add(
            _plot_speed(run, speed),
            "FLOP-ideal speedup (total FLOPs before / after: predicted) against the speedup "
            "measured on each target, with its 95% bootstrap interval.",
        )
    elif not speed:
        notes.append("Speed was not measured (`--no-measure`), so there is no speed plot.")

    summary = [
        (
            "parameters",
            f"{run.params_before:,}",
            f"{run.params_after:,}",
            f"{run.params_after / max(run.params_before, 1):.1%}",
        ),
        (
            "FLOPs (example inputs)",
            f"{run.flops_before:,}",
            f"{run.flops_after:,}",
            f"FLOP-ideal speedup {run.flop_speedup:.2f}×" if run.flop_speedup else "",
        ),
    ]
    quality = getattr(run, "quality", None)
    drift_ci = getattr(quality, "drift_interval", None) if quality is not None else None
    if run.drift is not None:
        ci = f" [{drift_ci[0]:.4g}, {drift_ci[1]:.4g}]" if drift_ci else ""
        summary.append(
            (
                "drift (relative output error)",
                "",
                f"{run.drift:.4g}{ci}",
                "measured on the calibration data",
            )
        )
    if run.speed is not None:
        s = run.speed
        summary.append(
            (
                f"latency ({s.device}, median of {s.repeats})",
                f"{s.baseline_ms:.2f} ms",
                f"{s.candidate_ms:.2f} ms",
                f"measured speedup {s.speedup:.2f}× [{s.ci_low:.2f}, {s.ci_high:.2f}]",
            )
        )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>surgery report: {_e(model)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>surgery report</h1>",
        f'<p class="meta">model <code>{_e(model)}</code> · recipe <code>{_e(recipe)}</code> · '
        f"surgery {_e(__version__)}, torch {_e(torch.__version__)}, {_e(platform.machine())} "
        f"{_e(platform.system())}, {torch.get_num_threads()} threads</p>",
        "<h2>Result</h2>",
        _table(["", "before", "after", ""], ([_e(c) for c in r] for r in summary), {1, 2}),
    ]
    if run.contracts:
        status = {
            True: ("met", "met"),
            False: ("not met", "failed"),
            None: ("not measured", "unknown"),
        }
        contract_rows = []
        for c in run.contracts:
            word, cls = status[c.held]
            measured = f"{c.measured:.4g}" if c.measured is not None else ""
            interval = f"[{c.interval[0]:.4g}, {c.interval[1]:.4g}]" if c.interval else ""
            contract_rows.append(
                [
                    f"<code>{_e(c.text)}</code>",
                    _e(c.statement.span.line),
                    f'<span class="{cls}">{word}</span>',
                    _e(measured),
                    _e(interval),
                    _e(c.detail),
                ]
            )
        parts += [
            "<h2>Contracts</h2>",
            _table(
                ["contract", "line", "status", "measured", "95% interval", "detail"],
                contract_rows,
                {1, 3},
            ),
        ]
    parts.append("<h2>Plots</h2>")
    for svg, caption in figures:
        parts.append(f"<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>")
    parts += [f'<p class="note">{_e(n)}</p>' for n in notes]
    if rows:
        plan_rows = []
        for r in rows:
            detail = " ".join(f"{k}={v}" for k, v in r.detail.items() if k != "full_rank")
            plan_rows.append(
                [
                    f"<code>{_e(r.path)}</code>",
                    _e(r.type),
                    _e(r.shape),
                    _e(detail),
                    _e(f"{human(r.params_before)} → {human(r.params_after)}"),
                    _e(f"{human(r.flops_before)} → {human(r.flops_after)}"),
                ]
            )
        parts += [
            "<h2>Changed layers</h2>",
            _table(["module", "type", "shape", "change", "params", "FLOPs"], plan_rows, set()),
        ]
    if run.warnings:
        parts.append("<h2>Warnings</h2><ul>")
        parts += [
            f"<li>{_e(w.message)}{' (' + _e(w.help) + ')' if w.help else ''}</li>"
            for w in run.warnings
        ]
        parts.append("</ul>")
    if run.changes:
        prov = [
            [
                _e(c.line),
                _e(c.pass_name),
                f"<code>{_e(c.path)}</code>",
                _e(c.action + " " + ", ".join(f"{k}={v}" for k, v in c.detail.items())),
            ]
            for c in run.changes
        ]
        parts += [
            "<h2>Provenance</h2>",
            _table(["recipe line", "pass", "module", "change"], prov, {0}),
        ]
    parts += ["<h2>Recipe</h2>", f"<pre>{_e(source.rstrip())}</pre>", "</body></html>", ""]
    return "\n".join(parts)


def write_report_html(
    run: Run,
    path: str | Path,
    *,
    recipe: str = "recipe.surg",
    model: str = "model",
    recipe_source: str | None = None,
    latency: Mapping[str, tuple[float | None, float | None]] | None = None,
    measure_layers: bool | None = None,
    explored: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``report.html`` for ``run`` to ``path``; return the path.

    Per-layer latency is ``latency`` when given, else measured (:func:`layer_latency`) when
    ``measure_layers`` is true -- by default when the run was timed (``run.speed`` is set).
    """
    if latency is None and (
        measure_layers if measure_layers is not None else run.speed is not None
    ):
        latency = layer_latency(run)
    text = report_html(
        run,
        recipe=recipe,
        model=model,
        recipe_source=recipe_source,
        latency=latency,
        explored=explored,
    )
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path
