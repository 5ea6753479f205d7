"""The `surgery` command line.

Exit codes: 0 success; 1 internal error (a bug: one line on stderr and the path of the full
trace); 2 user error (bad recipe, bad arguments, bad model or inputs); 3 a contract
(``expect``) was not met.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from surgery import __version__

__all__ = ["main"]

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_CONTRACT = 0, 1, 2, 3

EPILOG = """\
examples:
  surgery check recipes/*.surg
  surgery fmt --check recipes/minilm-lowrank.surg
  surgery plan recipes/minilm-lowrank.surg path/to/hf-model-dir
  surgery apply recipes/minilm-lowrank.surg path/to/hf-model-dir -o out/minilm
  surgery load out/minilm

exit codes: 0 ok, 1 internal error, 2 user error, 3 an `expect` contract not met
"""


class UserError(Exception):
    """A problem with the user's input; rendered as diagnostics, exit code 2 (3 when the
    recipe's own contracts cannot be met, e.g. no ranks reach `expect speedup`)."""

    def __init__(
        self,
        diagnostics: list[Any],
        source: str | None,
        filename: str,
        exit_code: int = EXIT_USER,
    ) -> None:
        super().__init__(diagnostics[0].message if diagnostics else "error")
        self.diagnostics = diagnostics
        self.source = source
        self.filename = filename
        self.exit_code = exit_code


class Console:
    """Progress on stderr (redrawn in place on a terminal), results on stdout."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = ""
        self.started = time.perf_counter()
        self.printed = 0.0  # when the last line was written (not on a terminal)

    def progress(self, what: str, done: int, total: int) -> None:
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.started
        bar = ""
        if total > 1:
            filled = int(20 * done / total)
            bar = f" [{'#' * filled}{'.' * (20 - filled)}] {done}/{total}"
        line = f"{elapsed:6.1f}s {what}{bar}"
        # Healing says `healing · loss … · tok/s · ETA` at every step: off a terminal, a line
        # when the phase (the text before ` · `) changes, then at most one every 10 seconds.
        phase = what.split(" · ", 1)[0]
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        elif phase != self.last.split(" · ", 1)[0] or (
            what != self.last and elapsed - self.printed >= 10.0
        ):
            self.stream.write(line + "\n")
            self.stream.flush()
            self.printed = elapsed
        self.last = what

    def done(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\r\033[K")
            self.stream.flush()


# --- helpers ------------------------------------------------------------------------------


def _read_recipe(path: str) -> str:
    """The recipe's text: UTF-8 with a leading byte-order mark dropped; a file that is not
    UTF-8 is an error located at its first bad byte (rendered with that byte escaped)."""
    from surgery.diagnostics import Diagnostic, SourceDecodeError, decode_source

    try:
        return decode_source(Path(path).read_bytes(), path)
    except SourceDecodeError as exc:
        raise UserError(exc.diagnostics, exc.source, path) from None
    except FileNotFoundError:
        message = f"recipe file `{path}` does not exist"
    except IsADirectoryError:
        message = f"`{path}` is a directory, not a recipe file"
    except OSError as exc:
        message = f"cannot read recipe file `{path}`: {exc.strerror}"
    raise UserError([Diagnostic(code="S0001", message=message)], None, path)


def _parse_and_check(path: str) -> tuple[Any, str, list[Any]]:
    """(recipe, source, warnings); raises UserError with every error of the recipe."""
    from surgery import ast
    from surgery.check import check
    from surgery.diagnostics import span_of
    from surgery.parse import parse_statements

    source = _read_recipe(path)
    statements, diagnostics = parse_statements(source)

    recipe = ast.Recipe(statements=statements, span=span_of(source, 0, len(source)))
    diagnostics += check(recipe)
    errors = [d for d in diagnostics if d.severity == "error"]
    if errors:
        raise UserError(diagnostics, source, path)
    return recipe, source, diagnostics


def _emit_diagnostics(diags: list[Any], source: str | None, filename: str, fmt: str) -> None:
    from surgery.diagnostics import render_all, to_json

    if not diags:
        return
    if fmt == "json":
        print(json.dumps(to_json(diags, filename), indent=2))
    else:
        sys.stderr.write(render_all(diags, source, filename))


def _model_error(exc: Exception, code: str, filename: str) -> UserError:
    from surgery.diagnostics import Diagnostic

    return UserError(
        [Diagnostic(code=code, message=str(exc), help=getattr(exc, "help", None))], None, filename
    )


@contextlib.contextmanager
def _importable_cwd(enabled: bool) -> Iterator[None]:
    """Let an explicit ``--arch module:factory`` name a module of the current directory.

    The directory goes *last* on ``sys.path`` and only for that import, so a file there can
    never shadow an installed package (a planted ``transformers.py``); without ``--arch`` no
    code is imported from it at all.
    """
    cwd = os.getcwd()
    if not enabled or cwd in sys.path:
        yield
        return
    sys.path.append(cwd)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


def _load(args: argparse.Namespace) -> Any:
    from surgery.load import ModelLoadError, load_model

    try:
        with _importable_cwd(args.arch is not None):
            return load_model(
                args.model,
                arch=args.arch,
                trust_pickle=args.trust_pickle,
                trust_remote_code=args.trust_remote_code,
            )
    except ModelLoadError as exc:
        raise _model_error(exc, "S0310", args.model) from exc


def _targets(args: argparse.Namespace) -> list[tuple[str, str | None, int | None]]:
    """``--target B[:DEVICE]`` options as (backend, device, trials) like `target` statements.

    Each is checked by the very rule that checks a recipe's ``target B DEVICE`` line, so a
    target the recipe would reject (unknown, or not implemented in this build) is rejected on
    the command line too, with the same message.
    """
    from surgery import ast
    from surgery.check import check
    from surgery.diagnostics import Diagnostic
    from surgery.parse import parse_statements

    specs: list[tuple[str, str | None, int | None]] = []
    for text in getattr(args, "target", None) or []:
        names = text.split(":")
        backend, device = names[0], (names[1] if len(names) == 2 else "")
        if len(names) > 2 or not all(n and n.replace("-", "_").isidentifier() for n in names):
            raise UserError(
                [
                    Diagnostic(
                        code="S0002",
                        message=f"`--target {text}` is not of the form `BACKEND[:DEVICE]`",
                        help="e.g. `--target onnx:cpu` or `--target torch:inductor`",
                    )
                ],
                None,
                "--target",
            )
        source = "target " + " ".join(names)
        statements, diags = parse_statements(source)
        if not diags:
            diags = check(ast.Recipe(statements=statements, span=statements[0].span))
        errors = [d for d in diags if d.severity == "error"]
        if errors:
            raise UserError(errors, source, f"--target {text}")
        specs.append((backend, device or None, args.trials))
    return specs


def _metrics(args: argparse.Namespace) -> dict[str, Any]:
    """The user metrics ``--metric module:function`` allows, imported (the only way a recipe's
    ``expect metric "module:function"`` runs code; a module of the working directory may be
    named, as for ``--arch``)."""
    from surgery.diagnostics import Diagnostic
    from surgery.quality import QualityError, import_metric

    metrics: dict[str, Any] = {}
    for spec in getattr(args, "metric", None) or []:
        try:
            with _importable_cwd(True):
                metrics[spec] = import_metric(spec)
        except QualityError as exc:
            raise UserError(
                [Diagnostic(code="S0003", message=str(exc), help=exc.help)], None, "--metric"
            ) from exc
    return metrics


def _parallel(args: argparse.Namespace) -> Any:
    """This process's share of a torchrun launch (``surgery.distributed``), or None when it
    runs alone; ``--parallel`` without torchrun is an error."""
    from surgery.diagnostics import Diagnostic
    from surgery.distributed import parallel_from_env

    try:
        return parallel_from_env(getattr(args, "parallel", None))
    except (ValueError, RuntimeError) as exc:
        raise UserError(
            [
                Diagnostic(
                    code="S0004",
                    message=f"cannot run in parallel: {exc}",
                    help="launch with `torchrun --nproc_per_node N -m surgery apply ...`, "
                    "or drop `--parallel`",
                )
            ],
            None,
            "--parallel",
        ) from exc


def _run(
    args: argparse.Namespace,
    *,
    measure: bool,
    console: Console,
    workdir: Path | None = None,
    checkpoint_dir: Path | None = None,
    parallel: Any = None,
) -> tuple[Any, Any, str]:
    from surgery.diagnostics import Diagnostic
    from surgery.inputs import InputError
    from surgery.manager import Manager
    from surgery.passes import PassError

    recipe, source, warnings = _parse_and_check(args.recipe)
    metrics = _metrics(args)
    loaded = _load(args)
    manager = Manager(
        recipe,
        loaded,
        recipe_dir=Path(args.recipe).parent,
        strict=args.strict,
        progress=console.progress,
        max_heal_steps=args.max_heal_steps,
        checkpoint_dir=checkpoint_dir,
        resume=getattr(args, "resume", False),
        parallel=parallel,
        metrics=metrics,
    )
    try:
        run = manager.run(
            measure=measure,
            warmup=args.warmup,
            repeats=args.repeats,
            targets=_targets(args),
            workdir=workdir,
        )
    except PassError as exc:
        # S05xx: the recipe's own contracts cannot be met (e.g. no ranks reach them): exit 3
        code = EXIT_CONTRACT if exc.diagnostic.code.startswith("S05") else EXIT_USER
        raise UserError([exc.diagnostic], source, args.recipe, code) from exc
    except InputError as exc:
        raise UserError(
            [Diagnostic(code="S0320", message=str(exc), help=None)], None, args.recipe
        ) from exc
    finally:
        console.done()
    run.warnings[:0] = warnings
    return run, loaded, source


_WRITE_HELP = {
    errno.ENOSPC: "free some space on that disk, or write the output to another one",
    errno.EDQUOT: "free some space within your quota, or write the output elsewhere",
    errno.EROFS: "the file system is read-only: write the output to a writable directory",
    errno.EACCES: "you may not write there: choose a directory you own",
    errno.EPERM: "you may not write there: choose a directory you own",
    errno.ENOTDIR: "a parent of the output path is a file: choose another output path",
    errno.EEXIST: "a parent of the output path is a file: choose another output path",
}


def _write_error(exc: OSError, out: Path) -> Any:
    from surgery.diagnostics import Diagnostic, first_line

    what = exc.strerror or first_line(exc)
    where = f" (`{exc.filename}`)" if exc.filename else ""
    return Diagnostic(
        code="S0350",
        message=f"cannot write the output `{out}`: {what}{where}",
        help=_WRITE_HELP.get(exc.errno or 0, "check the output path and the disk"),
    )


def _contract_failures(run: Any, source: str, filename: str) -> list[Any]:
    from surgery.diagnostics import Diagnostic

    diags = []
    for c in run.failed_contracts:
        interval = f" [{c.interval[0]:.3g}, {c.interval[1]:.3g}]" if c.interval else ""
        diags.append(
            Diagnostic(
                code="S0501",
                message=f"contract not met: `{c.text}`",
                span=c.statement.span,
                notes=(f"measured {c.measured:.4g}{interval}: {c.detail}",),
                help="change the recipe (a milder rank, fewer statements) or relax the contract",
            )
        )
    return diags


def _heal_lines(reports: list[Any]) -> list[str]:
    """One line per `heal`: what it trained on and how the held-out drift moved (no timing:
    the line is part of the plan's golden text; progress shows tokens/s)."""
    lines = []
    for r in reports:
        text = f"healed {r.steps} steps on {r.source} ({r.examples:,} examples)"
        if r.losses:
            text += f": loss {r.losses[0]:.4g} -> {r.losses[-1]:.4g}"
        if len(r.evals) >= 2:
            first, last = r.evals[0], r.evals[-1]
            best = f", kept step {r.best_step}" if r.best_step is not None else ""
            text += f"; held-out drift {first['drift']:.4f} -> {last['drift']:.4f}{best}"
            for metric in ("perplexity", "accuracy"):
                if metric in last:
                    text += f", {metric} {first[metric]:.4g} -> {last[metric]:.4g}"
        if r.stopped_early:
            text += " (stopped early: the contracts held)"
        lines.append(text + "\n")
    return lines


# --- commands -----------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from surgery import ast
    from surgery.check import check
    from surgery.diagnostics import span_of
    from surgery.parse import parse_statements

    status = EXIT_OK
    report: list[dict[str, Any]] = []
    for path in args.recipes:
        try:
            source = _read_recipe(path)
        except UserError as exc:
            _emit_or_collect(exc.diagnostics, exc.source, path, args.format, report)
            status = EXIT_USER
            continue
        statements, diags = parse_statements(source)
        recipe = ast.Recipe(statements=statements, span=span_of(source, 0, len(source)))
        diags = diags + check(recipe)
        if any(d.severity == "error" for d in diags):
            status = EXIT_USER
        _emit_or_collect(diags, source, path, args.format, report)
        if not diags and args.format == "text":
            sys.stderr.write(
                f"ok: {path}: {len(statements)} statement{'s' if len(statements) != 1 else ''}\n"
            )
    if args.format == "json":
        print(json.dumps(report, indent=2))
    return status


def _emit_or_collect(
    diags: list[Any], source: str | None, path: str, fmt: str, report: list[dict[str, Any]]
) -> None:
    from surgery.diagnostics import render_all, to_json

    if fmt == "json":
        report.extend(to_json(diags, path))
    elif diags:
        sys.stderr.write(render_all(diags, source, path))


def cmd_fmt(args: argparse.Namespace) -> int:
    from surgery.diagnostics import DiagnosticError, render_all
    from surgery.fmt import format_source

    status = EXIT_OK
    for path in args.recipes:
        try:
            source = _read_recipe(path)
        except UserError as exc:  # like `check`: report it and go on with the other files
            sys.stderr.write(render_all(exc.diagnostics, exc.source, path))
            status = EXIT_USER
            continue
        try:
            formatted = format_source(source)
        except DiagnosticError as exc:
            sys.stderr.write(render_all(exc.diagnostics, source, path))
            status = EXIT_USER
            continue
        if args.check:
            if formatted != source:
                sys.stderr.write(f"would reformat: {path}\n")
                # Like black and ruff: 1 means "not formatted" (2 stays "does not parse").
                status = status or 1
        elif args.write:
            if formatted != source:
                tmp = Path(path).with_name(f".{Path(path).name}.fmt.tmp")
                tmp.write_text(formatted, encoding="utf-8")
                os.replace(tmp, path)
        else:
            sys.stdout.write(formatted)
    return status


def cmd_plan(args: argparse.Namespace) -> int:
    from surgery.distributed import shutdown

    parallel = _parallel(args)
    try:
        if parallel is not None and not parallel.is_writer:
            _run(args, measure=False, console=Console(quiet=True), parallel=parallel)
            status = EXIT_OK
        else:
            status = _plan(args, parallel)
        shutdown(wait=True)
        return status
    finally:
        shutdown()


def _plan(args: argparse.Namespace, parallel: Any) -> int:
    from surgery.report import plan_dict, plan_text

    console = Console(quiet=args.quiet)
    run, _, source = _run(args, measure=False, console=console, parallel=parallel)
    _emit_diagnostics(run.warnings, source, args.recipe, "text")
    if args.format == "json":
        print(json.dumps(plan_dict(run, recipe=args.recipe, model=args.model), indent=2))
    else:
        sys.stdout.write(plan_text(run))
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    """``surgery apply``: alone, or as one rank of ``torchrun ... -m surgery apply`` (every
    rank builds the same model and heals its share of each batch; only rank 0 prints and
    writes OUT)."""
    from surgery.distributed import shutdown

    out = Path(args.output)
    _refuse_existing(args, out)  # every rank sees the same answer, so all stop together
    if args.stream:
        return _apply_streamed(args, Console(quiet=args.quiet), out)
    parallel = _parallel(args)
    try:
        if parallel is not None and not parallel.is_writer:
            partial = _partial(out)
            _run(
                args,
                measure=False,
                console=Console(quiet=True),
                checkpoint_dir=partial,
                parallel=parallel,
            )
            status = EXIT_OK
        else:
            status = _apply(args, out, parallel)
        shutdown(wait=True)
        return status
    finally:
        shutdown()


def _partial(out: Path) -> Path:
    """Where healing checkpoints of ``OUT`` live: ``OUT.partial`` beside it (``-o .`` names
    the working directory, whose name the path itself does not hold)."""
    absolute = Path(os.path.abspath(out))
    return absolute.with_name(absolute.name + ".partial")


def _refuse_existing(args: argparse.Namespace, out: Path) -> None:
    from surgery.diagnostics import Diagnostic

    # Refuse a bad output before the (long) run, and again atomically when writing.
    if out.exists() and not args.force:
        raise UserError(
            [
                Diagnostic(
                    code="S0330",
                    message=f"`{out}` already exists",
                    help="pass `--force` to replace it",
                )
            ],
            None,
            args.output,
        )


def _apply(args: argparse.Namespace, out: Path, parallel: Any) -> int:
    from surgery.diagnostics import Diagnostic
    from surgery.heal import CURVES
    from surgery.report import plan_text
    from surgery.save import OutputError, atomic_directory, write_run

    console = Console(quiet=args.quiet)
    # Healing checkpoints live beside OUT (`OUT.partial/`), outside the temporary output, so
    # a killed run leaves them for `--resume`; a finished one removes them.
    partial = _partial(out)
    if partial.exists() and not args.resume:
        shutil.rmtree(partial, ignore_errors=True)
    elif args.resume and not partial.is_dir():
        sys.stderr.write(f"note: no checkpoints in `{partial}`: healing starts afresh\n")
    try:
        # The run happens inside the temporary output so lowered artifacts land in OUT too;
        # any failure removes it, and OUT appears only when everything is written.
        with atomic_directory(
            out, force=args.force, protect=[Path(args.model), Path(args.recipe)]
        ) as tmp:
            run, _loaded, source = _run(
                args,
                measure=not args.no_measure,
                console=console,
                workdir=tmp / "lowered",
                checkpoint_dir=partial,
                parallel=parallel,
            )
            _emit_diagnostics(run.warnings, source, args.recipe, "text")
            console.progress("writing output", 0, 1)
            plan = write_run(run, tmp, recipe_source=source, recipe=args.recipe, model=args.model)
            # `write_run` wrote the loss and held-out curves of any healing; name them.
            curves = [n for n in CURVES if (tmp / n).is_file()]
        shutil.rmtree(partial, ignore_errors=True)
    except OutputError as exc:
        raise UserError(
            [Diagnostic(code="S0330", message=str(exc), help=exc.help)], None, args.output
        ) from exc
    except OSError as exc:
        # The machine, not surgery: a read-only or full disk, no permission, a parent that is a
        # file. The output is not written (atomic_directory removed what was).
        raise UserError([_write_error(exc, out)], None, args.output) from exc
    finally:
        console.done()
    if args.format == "json":
        print(json.dumps(plan, indent=2))
    else:
        sys.stdout.write(plan_text(run))
        sys.stdout.write("".join(_heal_lines(run.heals)))
        files = ", ".join(
            ["model.safetensors", "surgery.json", "plan.json", "report.md", "report.html", *curves]
        )
        sys.stdout.write(f"wrote {out}/ ({files})\n")
    failures = _contract_failures(run, source, args.recipe)
    if failures:
        _emit_diagnostics(failures, source, args.recipe, "text")
        return EXIT_CONTRACT
    return EXIT_OK


def _apply_streamed(args: argparse.Namespace, console: Console, out: Path) -> int:
    """``surgery apply --stream``: the model is read layer by layer from its safetensors
    shards and OUT written as it goes (`surgery.stream`), for models larger than memory."""
    from surgery.diagnostics import Diagnostic
    from surgery.load import ModelLoadError
    from surgery.passes import PassError
    from surgery.report import plan_dict, plan_text
    from surgery.save import OutputError
    from surgery.stream import StreamError, stream_apply

    recipe, source, warnings = _parse_and_check(args.recipe)
    try:
        run = stream_apply(
            recipe,
            args.model,
            out,
            recipe_source=source,
            recipe_name=args.recipe,
            model_name=args.model,
            force=args.force,
            strict=args.strict,
            progress=console.progress,
            protect=[Path(args.recipe)],
        )
    except StreamError as exc:  # refusals carry recipe spans; model problems none
        raise UserError(exc.diagnostics, source, args.recipe) from exc
    except PassError as exc:
        raise UserError([exc.diagnostic], source, args.recipe) from exc
    except ModelLoadError as exc:
        raise _model_error(exc, "S0310", args.model) from exc
    except OutputError as exc:
        raise UserError(
            [Diagnostic(code="S0330", message=str(exc), help=exc.help)], None, args.output
        ) from exc
    except OSError as exc:
        raise UserError([_write_error(exc, out)], None, args.output) from exc
    finally:
        console.done()
    run.warnings[:0] = warnings
    _emit_diagnostics(run.warnings, source, args.recipe, "text")
    if args.format == "json":
        print(json.dumps(plan_dict(run, recipe=args.recipe, model=args.model), indent=2))
    else:
        sys.stdout.write(plan_text(run))
        sys.stdout.write(
            f"wrote {out}/ (model.safetensors, surgery.json, plan.json, report.md, report.html)\n"
        )
    failures = _contract_failures(run, source, args.recipe)
    if failures:
        _emit_diagnostics(failures, source, args.recipe, "text")
        return EXIT_CONTRACT
    return EXIT_OK


def cmd_load(args: argparse.Namespace) -> int:
    from surgery.inputs import InputError, example_inputs, flatten_outputs
    from surgery.load import ModelLoadError
    from surgery.save import load

    try:
        with _importable_cwd(args.arch is not None):
            model = load(
                args.directory,
                arch=args.arch,
                trust_pickle=args.trust_pickle,
            )
    except ModelLoadError as exc:
        raise _model_error(exc, "S0311", args.directory) from exc
    params = sum(p.numel() for p in model.parameters())
    print(f"loaded {type(model).__name__} from {args.directory}: {params:,} parameters")
    try:
        out = example_inputs(model).call(model)
        shapes = [tuple(t.shape) for t in flatten_outputs(out)]
        print(f"ran the example inputs: output shapes {shapes}")
    except InputError as exc:
        print(f"not run: {exc}")
    except Exception as exc:  # the rebuilt model itself fails: say so, never a traceback
        from surgery.diagnostics import Diagnostic, first_line

        raise UserError(
            [
                Diagnostic(
                    code="S0311",
                    message=f"the model rebuilt from `{args.directory}` does not run on its "
                    f"example inputs: {first_line(exc)}",
                    help="its saved architecture no longer matches its weights; apply the "
                    "recipe again to write a new output",
                )
            ],
            None,
            args.directory,
        ) from exc
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from surgery.ast import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))
    return EXIT_OK


# --- entry point --------------------------------------------------------------------------


def _count(minimum: int) -> Any:
    """An argparse type: an integer of at least ``minimum`` (argparse turns the error into exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"`{text}` is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"`{text}` must be {'positive' if minimum == 1 else f'at least {minimum}'}"
            )
        return value

    parse.__name__ = "count"
    return parse


def _trust_args(p: argparse.ArgumentParser, *, arch_help: str, remote_code: bool = True) -> None:
    p.add_argument("--arch", metavar="MODULE:FACTORY", help=arch_help)
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow unpickling a pickled module or program (runs code from the file; only for "
        "files you made or fully trust)",
    )
    if not remote_code:  # an output is rebuilt from transformers' own classes only
        return
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a Hugging Face config's `auto_map` to run the model code it names (only "
        "for repositories you fully trust)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surgery",
        description="Declarative model surgery for PyTorch: shrink a model by a recipe and "
        "measure that it got faster.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"surgery {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "check",
        help="check recipes without a model",
        epilog="example: surgery check recipes/*.surg",
    )
    p.add_argument("recipes", nargs="+", metavar="RECIPE")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "fmt",
        help="print recipes in canonical form",
        epilog="example: surgery fmt --check recipes/*.surg",
    )
    p.add_argument("recipes", nargs="+", metavar="RECIPE")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if a recipe is not formatted")
    mode.add_argument("--write", action="store_true", help="rewrite the files in place")
    p.set_defaults(func=cmd_fmt)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("recipe", metavar="RECIPE")
        p.add_argument(
            "model", metavar="MODEL", help="HF model dir, .pt2, or state dict with --arch"
        )
        _trust_args(p, arch_help="builds the architecture of a state dict")
        p.add_argument(
            "--strict", action="store_true", help="a selector that matches nothing is an error"
        )
        p.add_argument("--format", choices=("text", "json"), default="text")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress display")
        p.add_argument(
            "--warmup", type=_count(0), default=3, help="timing warm-up runs (default 3)"
        )
        p.add_argument(
            "--repeats", type=_count(1), default=20, help="timed A/B repeats (default 20)"
        )
        p.add_argument(
            "--target",
            action="append",
            metavar="BACKEND[:DEVICE]",
            help="also lower to and measure on this target (repeatable), e.g. onnx:cpu, tvm:llvm",
        )
        p.add_argument("--trials", type=_count(1), default=None, help="TVM tuning trials per task")
        p.add_argument(
            "--max-heal-steps",
            type=_count(0),
            default=None,
            metavar="N",
            help="cap every `heal` at N steps (a quick trial run of a recipe)",
        )
        p.add_argument(
            "--metric",
            action="append",
            metavar="MODULE:FUNCTION",
            help='allow the recipe\'s `expect metric "MODULE:FUNCTION"` to import and call '
            "that function (repeatable; the working directory may hold the module)",
        )
        p.add_argument(
            "--parallel",
            choices=("ddp", "fsdp2"),
            default=None,
            help="under torchrun: heal replicated (ddp, the default) or sharded per block "
            "(fsdp2); only rank 0 prints and writes OUT",
        )

    p = sub.add_parser(
        "plan",
        help="show what a recipe would do to a model",
        epilog="example: surgery plan recipes/minilm-lowrank.surg MODEL_DIR --format json",
    )
    model_args(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "apply",
        help="apply a recipe, measure, and write the surgered model",
        epilog="example: surgery apply recipes/minilm-lowrank.surg MODEL_DIR -o out/minilm",
    )
    model_args(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-measure", action="store_true", help="skip timing")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue healing from the checkpoints a killed run left in OUT.partial/ (the "
        "recipe's `heal … checkpoint every N steps`)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="read a Hugging Face model layer by layer from its safetensors shards and write "
        "OUT as it goes, for a model larger than memory (per-layer statements only: decompose "
        "with a fraction, absolute or energy rank and method svd/tucker, split); drift and "
        "speed are not measured",
    )
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser(
        "load",
        help="rebuild a surgered model and run it once",
        epilog="example: surgery load out/minilm",
    )
    p.add_argument("directory", metavar="OUT")
    _trust_args(
        p,
        arch_help="rebuild an output made from a state dict with this factory (the one "
        "`surgery.json` records is never imported on its own)",
        remote_code=False,
    )
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("schema", help="print the JSON schema of the recipe AST")
    p.set_defaults(func=cmd_schema)
    return parser


def _internal_error(exc: BaseException) -> int:
    fd, path = tempfile.mkstemp(prefix="surgery-crash-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(f"surgery {__version__}\n{' '.join(sys.argv)}\n\n")
        traceback.print_exception(exc, file=f)
    sys.stderr.write(
        f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
        f"this is a bug in surgery; the full trace was written to {path}\n"
    )
    return EXIT_INTERNAL


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every cleanup on the way out runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM (a scheduler's cancel, `kill`) unwinds like Ctrl-C: the temporary output and
    # anything else a `with` block holds is removed. Only the main thread may set handlers.
    previous = None
    with contextlib.suppress(ValueError):
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.func(args))
    except UserError as exc:
        _emit_diagnostics(
            exc.diagnostics, exc.source, exc.filename, getattr(args, "format", "text")
        )
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Terminated:
        sys.stderr.write("terminated\n")
        return 128 + signal.SIGTERM
    except OSError as exc:
        if exc.errno is None:  # raised by code, not by the operating system: a bug
            return _internal_error(exc)
        # The operating system refused a read or a write (permissions, a full or read-only
        # disk, a vanished file): the user's to fix, not a bug in surgery.
        from surgery.diagnostics import Diagnostic, render_all

        diag = Diagnostic(
            code="S0351",
            message=f"the system refused a file operation: {exc.strerror}",
            help=_WRITE_HELP.get(exc.errno, "check the path, its permissions and the disk"),
        )
        sys.stderr.write(render_all([diag], None, str(exc.filename or "surgery")))
        return EXIT_USER
    except Exception as exc:
        return _internal_error(exc)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def entry() -> NoReturn:
    # `python -m surgery` puts the current directory first on sys.path; a console script puts
    # its own bin directory there. Neither may import code from the working directory (a
    # planted `transformers.py` would run): only an explicit `--arch` names user code.
    # Only the entry Python itself put first is dropped: a PYTHONPATH the user set stays.
    if sys.path and sys.path[0] in ("", ".", os.getcwd()):
        del sys.path[0]
    if sys.argv[1:2] in (["check"], ["fmt"]):
        # One-shot, and parsing and checking build no reference cycles (see
        # `diagnostics.collector_paused`): the cyclic collector would only rescan the growing
        # heap, and re-enabling it at the end costs a full collection (0.25 s on 2 MB).
        gc.disable()
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
