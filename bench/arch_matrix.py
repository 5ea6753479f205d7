"""The architecture coverage matrix: every family × recipe line, apply → save → reload.

Prints one JSON object (``cells``: family, line, status, message, seconds) and then the
matrix as a markdown table for the README (``--markdown-only`` prints only the table).
``--families a,b`` and ``--lines R3,R5`` restrict it. Each cell is ``tests/helpers_arch.py``'s
``run_cell`` on the tiny random-weight models of ``tests/helpers_models.py``; a refusal is the
pass's own diagnostic (why the technique does not apply to that architecture).

    python bench/arch_matrix.py > matrix.txt
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers_arch import LINES, Cell, run_cell
from tests.helpers_models import ARCHS


def markdown(cells: list[Cell], lines: list[str]) -> str:
    """The matrix as a markdown table; refusals are numbered and listed below it. A cell that
    ran but changed nothing (a selector that matches no layer) says so."""
    families = list(dict.fromkeys(c.family for c in cells))
    by = {(c.family, c.line): c for c in cells}
    notes: list[str] = []
    rows = ["| family | " + " | ".join(f"`{LINES[k]}`" for k in lines) + " |"]
    rows.append("|---" * (len(lines) + 1) + "|")
    for f in families:
        marks = []
        for k in lines:
            c = by.get((f, LINES[k]))
            if c is None:
                marks.append("")
            elif c.status == "ok":
                marks.append("✓" if c.changes else "✓ (nothing to change)")
            else:
                notes.append(f"{len(notes) + 1}. {f}, `{LINES[k]}`: {c.message}")
                marks.append(f"{c.mark} ({len(notes)})")
        rows.append(f"| {f} | " + " | ".join(marks) + " |")
    return "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--families", default=",".join(ARCHS))
    ap.add_argument("--lines", default=",".join(LINES))
    ap.add_argument("--markdown-only", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    lines = args.lines.split(",")
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            for k in lines:
                try:
                    cell = run_cell(family, LINES[k], Path(tmp))
                except Exception as exc:  # a crash is a cell of the matrix, not the end of it
                    cell = Cell(family, LINES[k], "crash", f"{type(exc).__name__}: {exc}"[:300])
                cells.append(cell)
                print(f"{family} {k} {cell.status}", file=sys.stderr, flush=True)
    if not args.markdown_only:
        print(json.dumps({"cells": [c.__dict__ for c in cells]}, indent=1, ensure_ascii=False))
    print(markdown(cells, lines))


if __name__ == "__main__":
    main()
