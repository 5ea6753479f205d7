"""Write a surgered model to a directory atomically, and rebuild it without pickle.

A saved model directory holds:

* ``surgery.json`` — the base architecture (for a Hugging Face model: its class and its
  *final* config), the replacement modules as ``(path, class, spec)`` records, the dtype,
  and the provenance of every change;
* ``model.safetensors`` — all weights;
* for Hugging Face models, ``config.json`` and the tokenizer files of the input directory.

:func:`load` rebuilds the base architecture, puts each recorded replacement module at its
path (a wrapper gets the rebuilt module it wraps), then loads the weights strictly. Nothing
is unpickled and no code named by ``surgery.json`` runs unless the caller asks for it: a
model built from a user factory needs ``arch=`` or ``trust_code=True``.

>>> import tempfile, torch
>>> from surgery.modules import LowRankLinear
>>> def tiny(): return torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> import sys; sys.modules[__name__].tiny = tiny  # a factory importable by name
>>> model = tiny(); model[0] = LowRankLinear(8, 8, rank=2)
>>> d = tempfile.mkdtemp()
>>> write_model(model, {"kind": "factory", "arch": f"{__name__}:tiny"}, d)
>>> type(load(d, trust_code=True)[0]).__name__
'LowRankLinear'
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from torch import nn

from surgery import __version__
from surgery.load import ModelLoadError, _json_type, _reason, _shown, rebuild_base
from surgery.modules import SurgeryModule, build

if TYPE_CHECKING:
    from surgery.manager import Run

__all__ = [
    "FORMAT",
    "OutputError",
    "atomic_directory",
    "load",
    "remove_stale_temporaries",
    "save_run",
    "surgery_modules",
    "write_model",
    "write_run",
]

FORMAT = "surgery/1"


class OutputError(Exception):
    """The output directory cannot be written; ``str(err)`` is a user-facing sentence."""

    def __init__(self, message: str, help: str | None = None) -> None:
        super().__init__(message)
        self.help = help


def surgery_modules(model: nn.Module) -> list[dict[str, Any]]:
    """``{"path", "class", "spec"}`` of every replacement module, parents before children.

    A module built from its parent's spec is not listed again; a module inside a wrapper's
    wrapped child is (the wrapped child comes from the base architecture), and so is a
    replacement inside a replacement that its parent's spec would not build (a factor of a
    low-rank layer that a later ``sparsify`` made N:M).
    """
    records: list[dict[str, Any]] = []
    built: list[tuple[str, str | None, SurgeryModule]] = []  # recorded: (path, wrapped, module)

    def owner(path: str) -> tuple[str, SurgeryModule] | None:
        for prefix, wrapped, module in built:
            if path.startswith(prefix + "."):
                inner = f"{prefix}.{wrapped}" if wrapped else None
                if inner is None or not (path == inner or path.startswith(inner + ".")):
                    return prefix, module
        return None

    for path, module in model.named_modules():
        if not path or not isinstance(module, SurgeryModule):
            continue
        found = owner(path)
        if found is not None and _builds(found[1], path[len(found[0]) + 1 :], module):
            continue
        records.append({"path": path, "class": module.registry_name(), "spec": module.spec()})
        built.append((path, module.wraps, module))
    return records


def _builds(parent: SurgeryModule, rel: str, module: SurgeryModule) -> bool:
    """Whether ``parent``'s spec alone builds, at ``rel``, a module like ``module``.

    The parent is rebuilt on the meta device (no memory, no initialisation cost) and its
    child compared by class and spec; a parent that cannot be rebuilt so counts as building
    it, as before nested replacements were recorded.
    """
    try:
        with torch.device("meta"):
            fresh = build(parent.registry_name(), parent.spec())
        child = fresh.get_submodule(rel)
    except Exception:
        return True
    return type(child) is type(module) and child.spec() == module.spec()


def _model_dtype(model: nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def write_model(
    model: nn.Module,
    base: dict[str, Any],
    directory: str | Path,
    *,
    changes: list[dict[str, Any]] | None = None,
) -> None:
    """Write ``model`` (weights, base description, replacement modules) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = dict(base)
    config = getattr(model, "config", None)
    if base.get("kind") == "hf" and config is not None:
        base["config"] = config.to_dict()  # the *final* config: passes may have changed it
        config.to_json_file(str(directory / "config.json"))
    manifest = {
        "format": FORMAT,
        "surgery_version": __version__,
        "torch_version": torch.__version__,
        "base": base,
        "dtype": _model_dtype(model),
        "modules": surgery_modules(model),
        "changes": changes or [],
    }
    weights = directory / "model.safetensors"
    try:
        st_save_model(model, str(weights), metadata={"format": "pt"})
    except OSError:
        raise
    except Exception as exc:
        # safetensors reports a full or read-only disk as its own error type carrying the OS
        # error number; surface it as the OSError it is, so callers treat it as one.
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(weights)) from exc
    (directory / "surgery.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def load(
    directory: str | Path,
    *,
    arch: str | None = None,
    trust_code: bool = False,
    trust_pickle: bool = False,
) -> nn.Module:
    """Rebuild a model saved by ``surgery apply`` (or :func:`write_model`), in eval mode.

    ``surgery.json`` only selects among what this tool builds itself (transformers classes
    from their config, the registered replacement modules). A model built from a user factory
    is rebuilt by ``arch`` (``module:factory``, the caller's choice), or by the recorded
    factory only with ``trust_code=True``; one built from a ``.pt2`` program needs
    ``trust_pickle=True``. Any malformed file is a :class:`~surgery.load.ModelLoadError`.
    """
    directory = Path(directory)
    manifest_path = directory / "surgery.json"
    if not manifest_path.is_file():
        raise ModelLoadError(
            f"`{directory}` is not a surgered model directory (no `surgery.json`)",
            help="give the directory written by `surgery apply ... -o DIR`",
        )
    base, dtype, records = _read_manifest(manifest_path)
    model = rebuild_base(
        base, directory, arch=arch, trust_code=trust_code, trust_pickle=trust_pickle
    )
    try:
        model.to(dtype)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot convert the model of `{directory}` to `{dtype}`: {_reason(exc)}"
        ) from exc
    for i, record in enumerate(records):
        path = record["path"]
        try:
            module = build(record["class"], record["spec"])
            if module.wraps:
                setattr(module, module.wraps, model.get_submodule(path))
            module.to(dtype)
            model.set_submodule(path, module)
        except Exception as exc:  # a spec from a file: any failure is the file's fault
            raise ModelLoadError(
                f"cannot rebuild module `{_shown(path)}` (record {i} of `modules` in "
                f"`{manifest_path}`): {_reason(exc)}"
            ) from exc
    weights = directory / "model.safetensors"
    try:
        missing, unexpected = st_load_model(model, str(weights), strict=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the weights `{weights}`: {_reason(exc)}") from exc
    missing = [k for k in missing if not _is_tied_alias(model, k)]
    if missing or unexpected:
        raise ModelLoadError(
            f"the weights in `{weights}` do not fit the rebuilt model "
            f"(missing: {missing[:5]}, unexpected: {list(unexpected)[:5]})"
        )
    return model.eval()


def _read_manifest(
    path: Path,
) -> tuple[dict[str, Any], torch.dtype, list[dict[str, Any]]]:
    """``(base, dtype, module records)`` of a ``surgery.json``, each checked for its shape."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"`{path}` is not valid JSON: {_reason(exc)}") from exc
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"`{path}` must hold a JSON object, not {_json_type(manifest)}")
    if manifest.get("format") != FORMAT:
        raise ModelLoadError(
            f"`{path}` has format `{_shown(manifest.get('format'))}`, expected `{FORMAT}`"
        )
    base = manifest.get("base")
    if not isinstance(base, dict):
        raise ModelLoadError(
            f"`{path}` has no `base` object describing the architecture (found {_json_type(base)})"
        )
    name = manifest.get("dtype", "float32")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelLoadError(
            f"`{path}` has `dtype` `{_shown(name)}`, which is not a floating-point torch dtype",
            help="e.g. `float32`, `float16` or `bfloat16`",
        )
    records = manifest.get("modules", [])
    if not isinstance(records, list):
        raise ModelLoadError(
            f"`{path}` must list its replacement modules in `modules`, not {_json_type(records)}"
        )
    for i, record in enumerate(records):
        fields = (("path", str), ("class", str), ("spec", dict))
        if not isinstance(record, dict):
            raise ModelLoadError(
                f"record {i} of `modules` in `{path}` must be an object, not {_json_type(record)}"
            )
        for key, kind in fields:
            if not isinstance(record.get(key), kind):
                raise ModelLoadError(
                    f"record {i} of `modules` in `{path}` needs `{key}` as "
                    f"{_json_type(kind())}, found {_json_type(record.get(key))}"
                )
    return base, dtype, records


def _is_tied_alias(model: nn.Module, key: str) -> bool:
    """``key`` names a parameter that shares storage with another saved parameter."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tensor = params.get(key)
    if tensor is None:
        return False
    return any(other is tensor and name != key for name, other in params.items())


def _same_or_nested(a: Path, b: Path) -> bool:
    """``a`` and ``b`` (resolved) are one path, or one lies inside the other."""
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


# Temporaries of an output `OUT` are siblings named `.OUT.<token>.tmp` (the run being written),
# `.OUT.<token>.old` (the previous OUT while it is swapped out) and `.OUT.<token>.lock`, a file
# the writing process holds an exclusive `flock` on from before the first is made until after
# the last is gone. The kernel drops the lock when the process dies, even by SIGKILL, so a lock
# that can be taken proves its temporaries are stale. (A PID in the name proves nothing: PIDs
# are reused, and the name cannot tell a live writer on another host of a shared disk.)
_TEMP_KINDS = (".tmp", ".old")


def _temp_names(out: Path, token: str) -> tuple[Path, Path, Path]:
    stem = f".{out.name}.{token}"
    return (
        out.with_name(stem + ".lock"),
        out.with_name(stem + ".tmp"),
        out.with_name(stem + ".old"),
    )


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(out: str | Path) -> list[Path]:
    """Remove the temporaries an earlier, killed write of ``out`` left; returns what went.

    Only temporaries whose lock file can be locked are removed: their writer is dead. A live
    writer's temporaries, and anything whose staleness cannot be proven (no lock file), stay.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> (d / ".out.abc.tmp").mkdir(); (d / ".out.abc.lock").touch()  # a writer killed by SIGKILL
    >>> [p.name for p in remove_stale_temporaries(d / "out")]
    ['.out.abc.lock', '.out.abc.tmp']
    """
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return []
    prefix = f".{out.name}."
    removed: list[Path] = []
    for lock in sorted(parent.glob(f"{glob.escape(prefix)}*.lock")):
        token = lock.name[len(prefix) : -len(".lock")]
        if not token or "." in token or not lock.is_file() or lock.is_symlink():
            continue
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            _, tmp, old = _temp_names(out, token)
            for path in (tmp, old):
                if path.exists() or path.is_symlink():
                    _remove_tree(path)
                    removed.append(path)
            lock.unlink(missing_ok=True)
            removed.insert(0, lock)
        finally:
            os.close(fd)
    return sorted(removed)


@contextmanager
def atomic_directory(
    out: str | Path,
    *,
    force: bool = False,
    protect: list[Path] | None = None,
) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block succeeds.

    ``out`` is created by one rename of a sibling temporary directory: readers never see a
    half-written output, and an error, an interrupt or SIGTERM leaves no ``out`` behind and no
    temporary. An existing ``out`` is refused unless ``force``; ``protect`` lists paths (the
    input model) that ``out`` must not be, contain or lie inside. Paths are compared after
    resolving symbolic links and ``..``, so no spelling of the input can be replaced. A
    temporary left by a killed earlier write of the same ``out`` is removed first.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> with atomic_directory(d / "out") as tmp:
    ...     _ = (tmp / "f").write_text("x")
    >>> sorted(p.name for p in d.iterdir())
    ['out']
    """
    out = Path(out).resolve()
    for p in protect or []:
        p = Path(p).resolve()
        if _same_or_nested(out, p):
            raise OutputError(
                f"refusing to write `{out}`: it is, holds or lies inside the input `{p}`",
                help="choose an output directory outside the input model",
            )
    if Path.cwd().resolve().is_relative_to(out):
        raise OutputError(
            f"refusing to write `{out}`: it is or holds the current directory",
            help="choose an output directory below the current one, or elsewhere",
        )
    if out.exists() and not force:
        raise OutputError(f"`{out}` already exists", help="pass `--force` to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"`{out}` exists and is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise OutputError(
            f"cannot create the output `{out}`: a parent `{exc.filename}` is not a directory"
        ) from exc
    remove_stale_temporaries(out)
    token = os.urandom(6).hex()
    lock, tmp, old = _temp_names(out, token)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        tmp.mkdir()
        try:
            yield tmp
            if out.exists():
                out.rename(old)
                tmp.rename(out)
                _remove_tree(old)
            else:
                tmp.rename(out)
        except BaseException:
            _remove_tree(tmp)
            if old.exists() and not out.exists():
                old.rename(out)  # put the previous output back
            raise
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


# --- a whole run: what `surgery apply` writes, and what the Python API writes the same way ---


def write_run(
    run: Run,
    directory: str | Path,
    *,
    recipe_source: str | None = None,
    recipe: str = "recipe.surg",
    model: str = "model",
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write every file of a run's output into ``directory`` (which exists); return the plan.

    ``OUT/`` holds the surgered model (``model.safetensors``, ``surgery.json``, the base
    model's side files), ``step-K/`` for each member of a progressive family (its
    ``surgery.json`` records only the changes made before that member was kept),
    ``recipe.surg`` (the source as written; canonical text when not given), ``plan.json``,
    ``report.md``, ``report.html`` (one self-contained page with plots) and, after healing,
    ``heal-losses.jsonl`` / ``heal-evals.jsonl``. ``recipe`` and ``model`` are how the plan and report name their inputs.
    ``base`` describes the base architecture when the run's model was not loaded by
    :func:`surgery.load_model` (e.g. ``{"kind": "factory", "arch": "pkg.mod:factory"}``).
    """
    from surgery.fmt import format_recipe
    from surgery.heal import write_curves
    from surgery.load import save_base_files
    from surgery.report import plan_dict, report_markdown
    from surgery.report_html import write_report_html

    directory = Path(directory)
    loaded = run.loaded
    if base is None:
        if loaded is None:
            raise OutputError(
                "the run's model was not loaded by `surgery.load_model`, so nothing says how "
                "to rebuild its architecture",
                help='pass `base={"kind": "factory", "arch": "package.module:factory"}`',
            )
        base = loaded.base
    source = recipe_source if recipe_source is not None else format_recipe(run.recipe)
    plan = plan_dict(run, recipe=recipe, model=model)
    report = report_markdown(run, recipe=recipe, model=model, recipe_source=source)
    write_model(run.model, base, directory, changes=[c.as_dict() for c in run.changes])
    if loaded is not None:
        save_base_files(loaded, directory)
    for member in run.family:
        member_dir = directory / f"step-{member.step}"
        write_model(member.model, base, member_dir, changes=[c.as_dict() for c in member.changes])
        if loaded is not None:
            save_base_files(loaded, member_dir)
    (directory / "recipe.surg").write_text(source, encoding="utf-8")
    (directory / "plan.json").write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
    (directory / "report.md").write_text(report, encoding="utf-8")
    write_curves(run.heals, directory)
    explored = [
        p
        for step in run.steps
        for p in (step.plan.data.get("auto") or {}).get("frontier", [])
        if isinstance(p, dict)
    ]
    write_report_html(
        run,
        directory / "report.html",
        recipe=recipe,
        model=model,
        recipe_source=source,
        explored=explored or None,
    )
    return plan


def save_run(
    run: Run,
    out: str | Path,
    *,
    force: bool = False,
    recipe_source: str | None = None,
    recipe: str = "recipe.surg",
    model: str = "model",
    base: dict[str, Any] | None = None,
) -> Path:
    """Write a run's output to ``out`` atomically, as ``surgery apply`` does (:func:`write_run`
    into :func:`atomic_directory`); ``out`` may not be the input model. Returns ``out``.

    >>> import tempfile, torch, surgery
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> model.example_inputs = (torch.randn(2, 8),)  # what the run feeds it
    >>> run = surgery.Manager(surgery.parse("decompose Linear rank = 2"), model).run(measure=False)
    >>> out = save_run(run, Path(tempfile.mkdtemp()) / "out",
    ...                base={"kind": "factory", "arch": "pkg:tiny"})
    >>> sorted(p.name for p in out.iterdir())
    ['model.safetensors', 'plan.json', 'recipe.surg', 'report.html', 'report.md', 'surgery.json']
    """
    protect = [run.loaded.source] if run.loaded is not None else []
    with atomic_directory(out, force=force, protect=protect) as tmp:
        write_run(run, tmp, recipe_source=recipe_source, recipe=recipe, model=model, base=base)
    return Path(out)
