"""Shared pytest configuration: the golden files and the one flag that rewrites them.

Every golden file lives at ``tests/golden/<kind>/<name>.<ext>``:

* ``recipes/<recipe>.fmt.surg``: what ``surgery fmt recipes/<recipe>.surg`` prints;
* ``plans/<case>.plan.json``: the plan of a recipe on a tiny model (``test_plan_golden.py``);
* ``invalid/<case>.surg`` + ``.stderr``: an invalid recipe and, byte for byte, the diagnostic
  ``surgery check`` renders for it (``test_check.py``).

Tests compare through the ``golden`` fixture; ``pytest --update-golden`` rewrites the files
from the current output instead (and the shipped ``surgery/schema/recipe.schema.json``, which
is compared the same way).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
ROOT = GOLDEN.parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite golden files (tests/golden/**, the shipped schema) from the current "
        "output instead of comparing against them",
    )


def check_golden(path: Path, actual: str, *, update: bool) -> None:
    """Assert that ``path`` holds ``actual`` byte for byte (UTF-8), or rewrite it if ``update``.

    ``path`` is relative to ``tests/golden/`` unless absolute. Bytes, not text mode, so that
    line endings are compared exactly.
    """
    path = GOLDEN / path
    shown = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
    data = actual.encode("utf-8")
    if update:
        if not path.is_file() or path.read_bytes() != data:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return
    assert path.is_file(), f"missing golden {shown}; run `pytest --update-golden` to write it"
    expected = path.read_bytes().decode("utf-8")
    assert actual == expected, f"{shown} differs; run `pytest --update-golden` if intended"


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Callable[[Path | str, str], None]:
    """``golden(path, actual)``: compare with ``tests/golden/<path>``, or rewrite it when the
    run was started with ``--update-golden``."""
    update = bool(request.config.getoption("--update-golden"))

    def compare(path: Path | str, actual: str) -> None:
        check_golden(Path(path), actual, update=update)

    return compare
