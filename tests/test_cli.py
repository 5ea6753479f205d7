"""The command line as a user runs it: the ``surgery`` console script next to the Python running
the tests, and ``python -m surgery``.

Every process pays the torch import (seconds), so the command matrix runs twice: through
``surgery.cli.main`` in this process (fast), and, marked ``slow``, as console-script processes
started together in parallel. ``test_console_script_version`` and ``test_python_dash_m`` always
start real processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from surgery import __version__
from surgery.ast import recipe_json_schema
from surgery.cli import _internal_error, main

ROOT = Path(__file__).resolve().parents[1]
SURGERY = str(Path(sys.executable).with_name("surgery"))
OK_RECIPE = "recipes/minilm-lowrank.surg"
INVALID_RECIPE = "tests/golden/invalid/015-kv-zero.surg"
MULTI_ERROR_RECIPE = "tests/golden/invalid/032-multiple-errors.surg"
UNFORMATTED = "group   kv=2 ;skip tokens 55% after  block 3 # SkipViT\ndecompose Linear rank=0.5\n"
FORMATTED = "group kv = 2\nskip tokens 55% after block 3  # SkipViT\ndecompose Linear rank = 0.5\n"


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


COMMANDS = {
    "version": ["--version"],
    "help": ["--help"],
    "check_ok": ["check", OK_RECIPE],
    "check_invalid": ["check", INVALID_RECIPE],
    "check_missing": ["check", "no/such/recipe.surg"],
    "check_json": ["check", "--format", "json", MULTI_ERROR_RECIPE],
    "fmt": ["fmt", "{tmp}/fmt-me.surg"],
    "fmt_check_bad": ["fmt", "--check", "{tmp}/unformatted.surg"],
    "fmt_check_good": ["fmt", "--check", "{tmp}/formatted.surg"],
    "fmt_write": ["fmt", "--write", "{tmp}/rewrite.surg"],
    "schema": ["schema"],
}


def _in_process(args: list[str]) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse: --version, --help, usage errors
            code = exc.code if isinstance(exc.code, int) else 0
    return Result(args, code, out.getvalue(), err.getvalue())


def _console_scripts(commands: dict[str, list[str]]) -> dict[str, Result]:
    """Run every command as its own ``surgery`` process, all at once."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = {
        key: subprocess.Popen(
            [SURGERY, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for key, args in commands.items()
    }
    results = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[key] = Result(commands[key], proc.returncode, out, err)
    return results


@pytest.fixture(
    scope="module",
    params=["main", pytest.param("console-script", marks=pytest.mark.slow)],
)
def runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, dict[str, Result]]]:
    """Every command of COMMANDS, run through ``surgery.cli.main`` in this process (fast), or
    (marked slow: each process imports torch) through the console script as a user runs it."""
    tmp = tmp_path_factory.mktemp("cli")
    for name, text in [
        ("unformatted", UNFORMATTED),
        ("formatted", FORMATTED),
        ("rewrite", UNFORMATTED),
        ("fmt-me", UNFORMATTED),
    ]:
        (tmp / f"{name}.surg").write_text(text, encoding="utf-8")
    commands = {k: [a.format(tmp=tmp) for a in args] for k, args in COMMANDS.items()}
    if request.param == "main":
        old = os.getcwd()
        os.chdir(ROOT)
        try:
            results = {key: _in_process(args) for key, args in commands.items()}
        finally:
            os.chdir(old)
    else:
        results = _console_scripts(commands)
    yield tmp, results


def _no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output, result.output


def test_version(runs: tuple[Path, dict[str, Result]]) -> None:
    _, results = runs
    r = results["version"]
    assert r.returncode == 0
    assert r.stdout.strip() == f"surgery {__version__}"


def test_help_shows_commands_and_examples(runs: tuple[Path, dict[str, Result]]) -> None:
    _, results = runs
    r = results["help"]
    assert r.returncode == 0
    for command in ("check", "fmt", "plan", "apply", "load", "schema"):
        assert command in r.stdout
    assert "examples:" in r.stdout
    assert "surgery check recipes/" in r.stdout
    assert "exit codes" in r.stdout


def test_check_ok(runs: tuple[Path, dict[str, Result]]) -> None:
    _, results = runs
    r = results["check_ok"]
    assert r.returncode == 0, r.output
    assert r.stdout == ""
    assert re.fullmatch(rf"ok: {re.escape(OK_RECIPE)}: \d+ statements?\n", r.stderr)


def test_check_invalid(runs: tuple[Path, dict[str, Result]]) -> None:
    _, results = runs
    r = results["check_invalid"]
    assert r.returncode == 2
    _no_traceback(r)
    assert r.stdout == ""
    assert "error[S0203]: `kv` must be a positive integer, found 0" in r.stderr
    assert f" --> {INVALID_RECIPE}:1:12" in r.stderr
    assert r.stderr.rstrip().endswith(f"{INVALID_RECIPE}: " + r.stderr.rstrip().rsplit(": ", 1)[-1])


def test_check_missing_file(runs: tuple[Path, dict[str, Result]]) -> None:
    _, results = runs
    r = results["check_missing"]
    assert r.returncode == 2
    _no_traceback(r)
    assert "error[S0001]: recipe file `no/such/recipe.surg` does not exist" in r.stderr
    assert " --> no/such/recipe.surg" in r.stderr


def test_check_json(runs: tuple[Path, dict[str, Result]]) -> None:
    _, results = runs
    r = results["check_json"]
    assert r.returncode == 2
    _no_traceback(r)
    report = json.loads(r.stdout)
    assert isinstance(report, list) and report
    non_209 = [d for d in report if d["code"] != "S0209"]
    assert [(d["code"], d["span"]["line"]) for d in non_209] == [
        ("S0203", 2),
        ("S0203", 3),
        ("S0203", 4),
        ("S0208", 5),
    ]
    for d in report:
        assert re.fullmatch(r"S\d{4}", d["code"])
        assert d["file"] == MULTI_ERROR_RECIPE
        assert isinstance(d["span"]["line"], int) and isinstance(d["span"]["col"], int)
        assert d["message"] and d["severity"] == "error"


def test_fmt_prints_canonical_form(runs: tuple[Path, dict[str, Result]]) -> None:
    tmp, results = runs
    r = results["fmt"]
    assert r.returncode == 0, r.output
    assert r.stdout == FORMATTED
    assert (tmp / "fmt-me.surg").read_text(encoding="utf-8") == UNFORMATTED  # untouched


def test_fmt_check(runs: tuple[Path, dict[str, Result]]) -> None:
    _, results = runs
    bad, good = results["fmt_check_bad"], results["fmt_check_good"]
    assert bad.returncode == 1
    assert "would reformat" in bad.stderr and bad.stdout == ""
    assert good.returncode == 0, good.output
    assert good.output == ""


def test_fmt_write(runs: tuple[Path, dict[str, Result]]) -> None:
    tmp, results = runs
    r = results["fmt_write"]
    assert r.returncode == 0, r.output
    assert (tmp / "rewrite.surg").read_text(encoding="utf-8") == FORMATTED
    assert not list(tmp.glob(".*.tmp")), "a temporary file was left behind"


def test_schema(runs: tuple[Path, dict[str, Result]]) -> None:
    _, results = runs
    r = results["schema"]
    assert r.returncode == 0
    assert json.loads(r.stdout) == recipe_json_schema()
    shipped = ROOT / "surgery" / "schema" / "recipe.schema.json"
    assert r.stdout == shipped.read_text(encoding="utf-8")


def test_python_dash_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "surgery", "check", OK_RECIPE, INVALID_RECIPE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    r = Result(result.args, result.returncode, result.stdout, result.stderr)
    assert r.returncode == 2  # one of the two recipes is invalid
    _no_traceback(r)
    assert f"ok: {OK_RECIPE}: " in r.stderr
    assert f" --> {INVALID_RECIPE}:1:12" in r.stderr


def test_console_script_version() -> None:
    result = subprocess.run([SURGERY, "--version"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"surgery {__version__}\n"


# --- in process: paths that are awkward to reach from outside ------------------------------


def test_fmt_write_is_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.surg"
    path.write_text(UNFORMATTED, encoding="utf-8")

    def crash(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    code = main(["fmt", "--write", str(path)])
    # the failure happens before the rename: the original is intact
    assert path.read_text(encoding="utf-8") == UNFORMATTED
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("internal error: OSError: disk full\n")
    trace = re.search(r"written to (\S+)", err)
    assert trace is not None
    Path(trace.group(1)).unlink()


def test_fmt_write_leaves_invalid_recipes_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.surg"
    path.write_text("grop kv = 2\n", encoding="utf-8")
    assert main(["fmt", "--write", str(path)]) == 2
    assert path.read_text(encoding="utf-8") == "grop kv = 2\n"
    assert "error[S0101]" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.surg"]


def test_fmt_write_and_check_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fmt", "--write", "--check", OK_RECIPE])
    assert info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_check_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "Traceback" not in err


def test_check_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin1.surg"
    path.write_bytes(b'calibrate with "donn\xe9es.pt"\n')
    assert main(["check", str(path)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_internal_error(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError as exc:
        code = _internal_error(exc)
    assert code == 1
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0] == "internal error: RuntimeError: boom"
    assert len(lines) == 2 and lines[1].startswith("this is a bug in surgery")
    path = Path(lines[1].rsplit(" ", 1)[-1])
    trace = path.read_text(encoding="utf-8")
    path.unlink()
    assert trace.startswith(f"surgery {__version__}\n")
    assert "Traceback" in trace and "RuntimeError: boom" in trace


def test_internal_error_through_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import surgery.fmt

    def broken(source: str) -> str:
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(surgery.fmt, "format_source", broken)
    assert main(["fmt", OK_RECIPE]) == 1
    err = capsys.readouterr().err
    assert err.startswith("internal error: ZeroDivisionError: simulated bug\n")
    assert "Traceback" not in err
    Path(err.rsplit(" ", 1)[-1].strip()).unlink()
