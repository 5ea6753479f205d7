"""Diagnostic codes: one table (`surgery.codes.CODES`), one meaning per code.

The source of `surgery/` and `backends/` is scanned as text. A quoted code (``"S0310"``) is a
use; a code named anywhere else (a comment, a rendered example) must still exist. A code used
by two modules is how one code came to mean two things, so that needs an entry in ``SHARED``
saying why both modules mean the same fact.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from surgery.codes import CODES

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for package in ("surgery", "backends") for p in (ROOT / package).rglob("*.py"))
TABLE = ROOT / "surgery" / "codes.py"
USE = re.compile(r"""["'](S\d{4})["']""")
MENTION = re.compile(r"\bS\d{4}\b")
# A code spliced together at run time would escape the scan: `f"S03{n}"`, `"S03" + x`.
BUILT = re.compile(r"""f["']S\d{0,3}\{|["']S\d{0,3}["']\s*[+%]""")

# Codes used by more than one module: the modules, and why it is one fact.
SHARED: dict[str, tuple[set[str], str]] = {
    "S0001": (
        {"surgery/cli.py", "surgery/diagnostics.py"},
        "the recipe file cannot be read: the CLI cannot open it, diagnostics cannot decode it",
    ),
    "S0203": (
        {"surgery/check.py", "surgery/diagnostics.py"},
        "diagnostics' docstring renders one of the checker's errors as its example",
    ),
    "S0401": (
        {
            "surgery/manager.py",
            "surgery/passes/base.py",
            "surgery/passes/decompose.py",
            "surgery/fx_surgery.py",
        },
        "a statement cannot be carried out: `PassError.crashed` (passes/base.py) wraps a pass "
        "that fails unexpectedly, for the manager and the streamed run alike; the manager "
        "also when healing or measuring cannot go on, decompose says why in its own words (no "
        "calibration inputs, no timing, an unreachable budget), and fx_surgery.py when "
        "rewriting a graph",
    ),
    "S0410": (
        {
            "surgery/passes/base.py",
            "surgery/passes/group.py",
            "surgery/passes/skip.py",
            "surgery/passes/truncate.py",
        },
        "each pass's apply finds that an earlier statement replaced a module it planned on; "
        "base.py's `moved()` says it for a module type, the others for their own structure",
    ),
}


# The checker is one unit: `check.py` runs each verb's own checks (`surgery/verbs/<verb>.py`)
# over the shared range rules (`surgery/verbs/base.py`), then the rules between statements.
CHECKER = "surgery/check.py"


def _relative(path: Path) -> str:
    name = path.relative_to(ROOT).as_posix()
    return CHECKER if name.startswith("surgery/verbs/") else name


def _uses() -> dict[str, set[str]]:
    """code -> the modules that use it (quoted), the table itself left out."""
    uses: dict[str, set[str]] = defaultdict(set)
    for path in SOURCES:
        if path != TABLE:
            for code in USE.findall(path.read_text(encoding="utf-8")):
                uses[code].add(_relative(path))
    return uses


def test_every_code_used_is_in_the_table() -> None:
    missing = {code: sorted(where) for code, where in _uses().items() if code not in CODES}
    assert not missing, f"add these to surgery/codes.py: {missing}"


def test_every_code_in_the_table_is_used() -> None:
    unused = sorted(set(CODES) - set(_uses()))
    assert not unused, f"no module raises {unused}: remove them from surgery/codes.py"


def test_every_code_named_anywhere_exists() -> None:
    named = {
        (code, _relative(path))
        for path in SOURCES
        for code in MENTION.findall(path.read_text(encoding="utf-8"))
        if code not in CODES and not (path == TABLE and code == "S0202")  # "never used"
    }
    assert not named, sorted(named)


def test_goldens_use_codes_of_the_table() -> None:
    rendered = {
        (code, p.name)
        for p in sorted((ROOT / "tests" / "golden" / "invalid").glob("*.stderr"))
        for code in re.findall(r"^(?:error|warning)\[(S\d{4})\]", p.read_text(), re.M)
    }
    assert rendered, "no golden diagnostics found"
    assert not {(c, name) for c, name in rendered if c not in CODES}


def test_no_code_is_built_at_run_time() -> None:
    built = [
        f"{_relative(p)}: {m.group(0)}"
        for p in SOURCES
        for m in BUILT.finditer(p.read_text(encoding="utf-8"))
    ]
    assert not built, built


@pytest.mark.parametrize("code", sorted(_uses()))
def test_each_code_has_one_meaning(code: str) -> None:
    """One module per code, or the modules listed in ``SHARED`` with the reason."""
    where = _uses()[code]
    if len(where) > 1:
        assert code in SHARED, f"{code} is used by {sorted(where)}: renumber one, or list it"
        assert where == SHARED[code][0]


def test_shared_entries_are_current() -> None:
    uses = _uses()
    stale = {code for code, (where, _why) in SHARED.items() if uses.get(code) != where}
    assert not stale, f"SHARED no longer matches the source for {sorted(stale)}"


def test_the_table_is_sorted_well_formed_and_says_one_thing_per_code() -> None:
    assert list(CODES) == sorted(CODES)
    assert all(re.fullmatch(r"S0\d{3}", code) for code in CODES)
    for meaning in CODES.values():
        assert meaning and "\n" not in meaning and not meaning.endswith(".")
        assert meaning[0] == meaning[0].lower(), meaning  # rustc style: lowercase
    assert len(set(CODES.values())) == len(CODES)


def test_the_table_imports_no_torch() -> None:
    """`surgery.check` may import it: the language half of surgery stays torch-free."""
    code = "import sys, surgery.codes; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
