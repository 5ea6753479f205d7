"""The one renderer of results: the plan table, ``plan.json`` and ``report.md``.

Library code returns data; this module turns a :class:`~surgery.manager.Run` into text.
Numbers that were *measured* (drift, speed) are always shown next to the ones that were
*predicted* (parameters, FLOPs), so a reader can see when smaller did not mean faster.
"""

from __future__ import annotations

import platform
from typing import Any

import torch

from surgery import __version__
from surgery.manager import Run, Step
from surgery.passes import PlanRow

__all__ = ["human", "plan_dict", "plan_text", "report_markdown", "summary_lines"]


def human(n: float) -> str:
    """``1234567`` → ``1.23M``.

    >>> human(22713216), human(950), human(3.2e9)
    ('22.71M', '950', '3.20G')
    """
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _detail(row: PlanRow) -> str:
    parts = []
    for key, value in row.detail.items():
        if key == "full_rank":
            continue
        if isinstance(value, float):
            value = f"{value:.3f}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def _table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    right = {i for i, h in enumerate(headers) if h in ("params", "FLOPs")}

    def fmt(cells: list[str]) -> str:
        out = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return (indent + "  ".join(out)).rstrip()

    return [fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def _step_lines(step: Step) -> list[str]:
    plan = step.plan
    lines = [f"line {plan.line}: {plan.statement}"]
    rows = []
    for row in plan.rows:
        rows.append(
            [
                row.path,
                row.type,
                row.shape,
                row.action if row.action == "skip" else _detail(row),
                f"{human(row.params_before)} → {human(row.params_after)}",
                f"{human(row.flops_before)} → {human(row.flops_after)}",
                row.note,
            ]
        )
    if rows:
        lines += _table(["module", "type", "shape", "change", "params", "FLOPs", "note"], rows)
    totals = plan.totals()
    changed = len(plan.changed_rows)
    skipped = len(plan.rows) - changed
    summary = f"  {changed} changed, {skipped} skipped"
    if changed:
        summary += (
            f"; params {human(totals['params_before'])} → {human(totals['params_after'])}, "
            f"FLOPs {human(totals['flops_before'])} → {human(totals['flops_after'])}"
        )
    if step.drift is not None:
        summary += f"; drift after this step {step.drift:.4g}"
    lines.append(summary)
    lines += [f"  note: {n}" for n in plan.notes]
    search = plan.data.get("auto")
    if isinstance(search, dict) and search.get("frontier"):
        lines.append(f"  frontier explored (predicted): {_frontier(search['frontier'])}")
    return lines


def _frontier(points: list[dict[str, Any]], most: int = 12) -> str:
    """A searched front as ``speedup×/drift`` pairs (latency share where no speedup is
    predicted), the chosen point marked ``*``; at most ``most`` points, evenly spread.

    >>> _frontier([{"speedup": 1.2, "latency": 0.8, "drift": 0.05, "chosen": False},
    ...            {"speedup": 1.5, "latency": 0.6, "drift": 0.1, "chosen": True}])
    '1.2×/0.05, 1.5×/0.1*'
    """
    step = max(1, -(-len(points) // most))
    shown = [p for i, p in enumerate(points) if i % step == 0 or p.get("chosen")]
    out = []
    for p in shown:
        speed = f"{p['speedup']:.3g}×" if p.get("speedup") else f"{p['latency']:.3g} of dense"
        drift = f"{p['drift']:.3g}" if p.get("drift") is not None else f"err {p['error']:.3g}"
        out.append(f"{speed}/{drift}{'*' if p.get('chosen') else ''}")
    return ", ".join(out)


def _drift_rows(run: Run) -> str:
    """Which rows the run's drift was measured on (the manager's ``drift_rows``; a run built
    otherwise measured it on its calibration batches)."""
    rows = getattr(run, "drift_rows", "")
    if rows:
        return str(rows)
    n = len(run.calibration)
    return f"{n} calibration batch{'es' if n != 1 else ''}"


def _drift_interval(run: Run) -> str:
    """`` [lo, hi]`` of the run's drift (its bootstrap interval over calibration items), or
    nothing when the run measured none (``run.quality``: :class:`surgery.quality.QualityReport`)."""
    quality = getattr(run, "quality", None)
    interval = getattr(quality, "drift_interval", None)
    return f" [{interval[0]:.4g}, {interval[1]:.4g}]" if interval else ""


def summary_lines(run: Run) -> list[str]:
    """Totals: parameters, FLOPs, the FLOP-ideal speedup, drift and measured speed."""
    lines = [
        f"params  {human(run.params_before)} → {human(run.params_after)} "
        f"({run.params_after / max(run.params_before, 1):.1%})",
        f"FLOPs   {human(run.flops_before)} → {human(run.flops_after)} per forward of the example "
        f"inputs",
    ]
    if run.flop_speedup is not None:
        lines.append(f"FLOP-ideal speedup {run.flop_speedup:.2f}× (predicted)")
    if run.drift is not None:
        lines.append(
            f"drift   {run.drift:.4g}{_drift_interval(run)} (relative output error on "
            f"{_drift_rows(run)})"
        )
    if run.speed is not None:
        lines.append(f"measured {run.speed}")
    lines += [f"target {_target_line(v, run)}" for v in run.verifications]
    for c in run.contracts:
        status = {True: "met", False: "NOT MET", None: "not measured"}[c.held]
        lines.append(f"contract `{c.text}`: {status} ({c.detail})")
    return lines


def _target_line(verification: Any, run: Run) -> str:
    """A backend's verification with the predicted speedup beside the measured one."""
    text = str(verification)
    speed = verification.speed
    if verification.ok and speed is not None and run.flop_speedup:
        realized = speed.speedup / run.flop_speedup
        text += f" — FLOP-ideal {run.flop_speedup:.2f}× (predicted), {realized:.0%} realized"
    if verification.estimate is not None:
        text += f"; {verification.estimate}"
    return text


def plan_text(run: Run) -> str:
    """The plan as a terminal table: one block per statement, then the totals."""
    lines: list[str] = []
    for step in run.steps:
        lines += _step_lines(step)
        lines.append("")
    if not run.steps:
        lines += ["the recipe has no pass statements", ""]
    lines += summary_lines(run)
    return "\n".join(lines) + "\n"


def plan_dict(run: Run, *, recipe: str, model: str) -> dict[str, Any]:
    """The plan and its totals as JSON-ready data (``plan.json``, ``--format json``)."""
    return {
        "recipe": recipe,
        "model": model,
        "steps": [
            {**step.plan.as_dict(), "drift": step.drift, "seconds": round(step.seconds, 3)}
            for step in run.steps
        ],
        "totals": {
            "params_before": run.params_before,
            "params_after": run.params_after,
            "flops_before": run.flops_before,
            "flops_after": run.flops_after,
            "flop_speedup": run.flop_speedup,
        },
        "drift": run.drift,
        "speed": run.speed.as_dict() if run.speed else None,
        "targets": [v.as_dict() for v in run.verifications],
        "contracts": [c.as_dict() for c in run.contracts],
        "warnings": [w.message for w in run.warnings],
    }


def report_markdown(run: Run, *, recipe: str, model: str, recipe_source: str) -> str:
    """``report.md``: what was done, what it cost, what it measured."""
    out = [
        "# surgery report",
        "",
        f"- model: `{model}`",
        f"- recipe: `{recipe}`",
        f"- surgery {__version__}, torch {torch.__version__}, {platform.machine()} "
        f"{platform.system()}, {torch.get_num_threads()} threads",
        "",
        "## Result",
        "",
        "| | before | after | |",
        "|---|---:|---:|---|",
        f"| parameters | {run.params_before:,} | {run.params_after:,} | "
        f"{run.params_after / max(run.params_before, 1):.1%} |",
        f"| FLOPs (example inputs) | {run.flops_before:,} | {run.flops_after:,} | "
        + (f"FLOP-ideal speedup {run.flop_speedup:.2f}× |" if run.flop_speedup else "|"),
    ]
    if run.drift is not None:
        out.append(
            f"| drift (relative output error) | | {run.drift:.4g}{_drift_interval(run)} | "
            f"measured on {_drift_rows(run)}"
            + (" (95% bootstrap interval over items)" if _drift_interval(run) else "")
            + " |"
        )
    if run.speed is not None:
        s = run.speed
        out.append(
            f"| latency ({s.device}, median of {s.repeats}) | {s.baseline_ms:.2f} ms | "
            f"{s.candidate_ms:.2f} ms | **measured speedup {s.speedup:.2f}× "
            f"[{s.ci_low:.2f}, {s.ci_high:.2f}]** |"
        )
    else:
        out.append("| latency | | | not measured |")
    out.append("")
    if run.verifications:
        out += [
            "## Targets",
            "",
            "Numerics first (lowered vs eager), then timing of the lowered "
            "original against the lowered surgered model:",
            "",
        ]
        out += [f"- {_target_line(v, run)}" for v in run.verifications]
        out += [
            "",
            "Ascend (MindIR) timings cannot be measured on this machine. "
            + (
                "The Ascend figure beside a `mindir` target is a roofline estimate from the "
                "device's published peak compute and memory bandwidth (GEMMs padded to the "
                "cube's 16-wide tiles; no operator fusion, no launch overhead), not a "
                "measurement."
                if any(v.estimate is not None for v in run.verifications)
                else "No Ascend estimate was made."
            ),
            "",
        ]
    if run.speed is not None:
        out += [
            f"Timing: {run.speed.warmup} warm-up runs, then {run.speed.repeats} interleaved A/B "
            "repeats of the original and the surgered model on the first calibration batch; the "
            "speedup is the ratio of medians with a 95% bootstrap interval.",
            "",
        ]
    if run.contracts:
        out += ["## Contracts", ""]
        for c in run.contracts:
            status = {True: "met", False: "**not met**", None: "not measured"}[c.held]
            out.append(f"- `{c.text}` (line {c.statement.span.line}): {status} — {c.detail}")
        out.append("")
    out += ["## Plan", "", "```"]
    for step in run.steps:
        out += _step_lines(step)
        out.append("")
    out += ["```", ""]
    if run.warnings:
        out += ["## Warnings", ""]
        out += [f"- {w.message}" + (f" ({w.help})" if w.help else "") for w in run.warnings]
        out.append("")
    out += ["## Provenance", ""]
    if run.changes:
        out += ["| recipe line | pass | module | change |", "|---:|---|---|---|"]
        for change in run.changes:
            detail = ", ".join(f"{k}={v}" for k, v in change.detail.items())
            out.append(
                f"| {change.line} | {change.pass_name} | `{change.path}` | {change.action} {detail} |"
            )
    else:
        out.append("No module was changed.")
    out += ["", "## Recipe", "", "```", recipe_source.rstrip("\n"), "```", ""]
    return "\n".join(out)
