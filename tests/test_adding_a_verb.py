"""Adding a verb touches the grammar, one verb module and one tuple entry (README, "Adding a
verb"): done here on a copy of the language half, then parsed, checked and formatted."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VERB_MODULE = '''
"""``prune SELECTOR N [by NAME]``: a verb added by the test."""

from __future__ import annotations

from typing import Literal

from surgery.nodes import Int, Name, Selector, StatementNode
from surgery.verbs.base import Checker, Verb, VerbSupport, format_selector


class Prune(StatementNode):
    verb: Literal["prune"] = "prune"
    selector: Selector
    count: Int
    by: Name | None = None


def check(c: Checker, s: Prune) -> None:
    c.implemented("prune", s)
    c.selector("prune", s.selector)
    c.positive(s.count, "`count`")
    c.name_in(s.by, ("magnitude",), "importance score")


def format(s: Prune) -> str:  # noqa: A001
    out = ["prune", format_selector(s.selector), str(s.count.value)]
    if s.by:
        out.append(f"by {s.by.value}")
    return " ".join(out)


VERB = Verb(
    keyword="prune",
    node=Prune,
    positional=("selector", "count"),
    check=check,
    format=format,
    support=VerbSupport({"count": None, "by": {"magnitude"}}, ("Linear",)),
    language={"type": ("Linear",)},
)
'''

SCRIPT = """
import sys
import surgery
from surgery import ast
from surgery.check import check
from surgery.fmt import format_source
from surgery.program import lower
from surgery.support import SUPPORT

assert surgery.__file__.startswith(sys.argv[1]), surgery.__file__
recipe = surgery.parse("prune  Linear where params > 1K 3 by magnitude")
(stmt,) = recipe.statements
assert type(stmt) is ast.Prune and stmt.count.value == 3 and stmt.by.value == "magnitude"
assert check(recipe) == []
assert format_source("prune Linear 3  by   magnitude # keep") == "prune Linear 3 by magnitude  # keep\\n"
assert ast.Recipe.model_validate_json(recipe.model_dump_json()) == recipe
assert sorted(SUPPORT["prune"].options) == ["by", "count"]
assert lower(recipe).steps == ()  # no pass named: the manager would carry it out
codes = sorted(d.code for d in check(surgery.parse("prune Conv2d 0 by size")))
assert codes == ["S0201", "S0201", "S0203"], codes
print("ok")
"""


def test_a_new_verb_is_a_grammar_rule_a_module_and_a_tuple_entry(tmp_path: Path) -> None:
    package = tmp_path / "surgery"
    shutil.copytree(ROOT / "surgery", package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "grammar", package / "grammar")
    # 1. the grammar
    grammar = package / "grammar" / "surg.lark"
    text = grammar.read_text()
    text = text.replace("          | expect\n", "          | expect\n          | prune\n", 1)
    text += '\nprune: "prune" selector int prune_by?\nprune_by: "by" name -> opt_by\n'
    grammar.write_text(text)
    # 2. one verb module
    (package / "verbs" / "prune.py").write_text(VERB_MODULE)
    # 3. one tuple entry (and the import that names it)
    verbs = package / "verbs" / "__init__.py"
    text = verbs.read_text()
    assert "    expect.VERB,\n)" in text and "    truncate,\n)" in text
    text = text.replace("    expect.VERB,\n)", "    expect.VERB,\n    prune.VERB,\n)", 1)
    text = text.replace("    truncate,\n)", "    truncate,\n    prune,\n)", 1)
    verbs.write_text(text)

    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(package)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
