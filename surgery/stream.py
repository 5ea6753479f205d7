"""Surgery of a model larger than memory: stream it from its safetensors shards, layer by layer.

For a recipe whose passes decide each layer alone (``decompose`` with a fraction, an absolute
rank or an energy threshold and a data-free method; ``split``), :func:`stream_apply` never
holds the model:

1. the Hugging Face architecture is built on the ``meta`` device from its config (no weight
   is allocated) and analysed there (:func:`surgery.graph.analyze` on meta example inputs:
   the same shapes, calls and FLOPs as on real tensors, so selectors match the same modules);
2. each *unit* (an outermost module that owns weights: a ``Linear``, a norm, an embedding) is
   materialised from its shard (``safe_open``, one tensor at a time, converted to the dtype
   ``from_pretrained`` would give it), the statement's own pass runs on a shell module that
   holds only that unit under its full path, the unit's resulting tensors are appended to a
   scratch file, and the unit goes back to ``meta``;
3. after the last statement ``model.safetensors`` is laid out by safetensors itself
   (``serialize_file`` reading the never-touched zero pages of an anonymous mapping, so the
   header, order and alignment are exactly what ``surgery apply`` writes) and the real bytes
   are copied into place from the scratch file, a chunk at a time.

Peak memory is the largest unit and its factors, not the model. The passes are reused
unchanged, so for these recipes the tensors (and ``model.safetensors``, byte for byte, when
the model has no tied weights: safetensors orders the metadata naming tied aliases
arbitrarily) equal an in-memory ``surgery apply``; ``surgery.json`` is the same and
``surgery load`` rebuilds the same model. Drift and timing need the whole model and are not
measured (a warning says so, and ``expect drift`` / ``expect speedup`` are "not measured").
Statements that read calibration data, the whole model or train it are refused up front,
each with a located error naming it (:func:`streaming_refusals`).

``OUT`` is written inside :func:`surgery.save.atomic_directory`: a failure or an interrupt
leaves no ``OUT`` and no temporary (the scratch files live inside the temporary directory).
"""

from __future__ import annotations

import json
import mmap
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from surgery import __version__, ast
from surgery.diagnostics import Diagnostic, first_line
from surgery.load import (
    LoadedModel,
    ModelLoadError,
    _hf_class,
    _jsonable,
    _offline,
    _refuse_remote_code,
    save_base_files,
)
from surgery.manager import Manager, Run, Step
from surgery.passes import PassContext, PassError, StepPlan, pass_for
from surgery.program import PassStep, lower

__all__ = [
    "StreamError",
    "open_meta_model",
    "stream_apply",
    "streaming_refusals",
]

Progress = Callable[[str, int, int], None]

#: What a streamed run cannot measure, said once in its warnings.
NOT_MEASURED = (
    "streamed run: drift and speed were not measured (they need the whole model in memory); "
    "run `surgery apply` without `--stream` on a machine that holds it to measure them"
)
_NO_MATCH_NOTE = "the selector matched no module"  # what each pass notes for an empty selection
_COPY_CHUNK = 64 << 20  # bytes copied from the scratch file into the output at a time


class StreamError(Exception):
    """A recipe or a model that cannot be streamed; carries located diagnostics."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        super().__init__(diagnostics[0].message)
        self.diagnostics = diagnostics
        self.diagnostic = diagnostics[0]


# --- which recipes stream -------------------------------------------------------------------

_NOT_LOCAL = {
    "group": "rewrites whole attentions (their heads across q/k/v/o) and the model's config",
    "skip": "changes the model's forward (token skipping between blocks)",
    "drop": "chooses sublayers by comparing whole blocks on calibration data",
    "truncate": "removes whole blocks and changes the model's config",
    "factorize": "fits its dense×sparse basis shared across layers",
    "sparsify": (
        "scores weights by the calibration inputs' activation norms (Wanda), which need "
        "forward passes through the whole model"
    ),
    "heal": "fine-tunes the whole model",
    "freeze": "applies while healing, which needs the whole model",
    "regularize": "applies while healing, which needs the whole model",
}


# Statements a streamed run carries out or accepts (`decompose` under conditions).
_STREAMED = {"decompose", "split", "calibrate", "target", "expect"}


def _refusal(stmt: Any, why: str, node: Any = None) -> Diagnostic:
    span = (node if node is not None else stmt).span
    return Diagnostic(
        code="S0380",
        message=f"`{stmt.verb}` cannot be streamed: it {why}",
        span=span,
        help="run `surgery apply` without `--stream` (the whole model in memory), or leave "
        "this statement out of the streamed recipe",
    )


def streaming_refusals(recipe: ast.Recipe) -> list[Diagnostic]:
    """One located error for each statement of ``recipe`` that streaming cannot carry out.

    Streaming runs a statement layer by layer, so it takes only statements that decide each
    layer from that layer's weights alone: ``decompose`` with ``rank = fraction | absolute |
    energy E`` and a data-free method (``svd``, ``tucker``), and ``split``. ``calibrate``,
    ``target`` and ``expect`` are accepted (nothing is measured that needs the whole model).

    >>> from surgery.parse import parse
    >>> streaming_refusals(parse("decompose Linear rank = 0.25"))
    []
    >>> [d.message for d in streaming_refusals(parse("decompose Linear rank = 0.5 method asvd"))]
    ['`decompose` cannot be streamed: it uses `method asvd`, which reads calibration activations through the whole model']
    """
    found: list[Diagnostic] = []
    for stmt in recipe.statements:
        verb = stmt.verb
        if isinstance(stmt, ast.Decompose):
            found += _decompose_refusals(stmt)
        elif verb not in _STREAMED:
            found.append(_refusal(stmt, _NOT_LOCAL.get(verb, "is not decided layer by layer")))
    return found


def _decompose_refusals(stmt: ast.Decompose) -> list[Diagnostic]:
    from surgery.select import uses_speedup

    found = []
    if stmt.rank_auto is not None:
        found.append(_refusal(stmt, "chooses ranks across layers (`rank = auto`)", stmt.rank_auto))
    if stmt.method is not None and stmt.method.value in ("asvd", "svd-llm"):
        found.append(
            _refusal(
                stmt,
                f"uses `method {stmt.method.value}`, which reads calibration activations "
                "through the whole model",
                stmt.method,
            )
        )
    if stmt.budget is not None:
        found.append(
            _refusal(
                stmt,
                "shares a `budget` across layers, which needs every spectrum first",
                stmt.budget,
            )
        )
    if stmt.progressive is not None:
        found.append(
            _refusal(
                stmt,
                "builds a `progressive` family, whose members are whole models",
                stmt.progressive,
            )
        )
    if stmt.keep_if_faster is not None:
        found.append(
            _refusal(stmt, "times layers on a target (`keep if faster`)", stmt.keep_if_faster)
        )
    if uses_speedup(stmt.selector.where):
        found.append(
            _refusal(stmt, "selects by a measured `speedup`, which times layers", stmt.selector)
        )
    return found


# --- the model on the meta device -----------------------------------------------------------


def _model_error(message: str, help: str | None = None) -> StreamError:
    return StreamError([Diagnostic(code="S0381", message=message, help=help)])


class _ShardSource:
    """The tensors of a Hugging Face directory's safetensors files (one or sharded)."""

    def __init__(self, directory: Path) -> None:
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self.files = {str(k): directory / str(v) for k, v in weight_map.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise _model_error(
                    f"`{index}` is not a safetensors index: {first_line(exc)}"
                ) from exc
            for path in set(self.files.values()):
                if path.parent != directory or not path.is_file():
                    raise _model_error(f"the shard `{path}` named by `{index}` is missing")
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise _model_error(
                f"`{directory}` has no safetensors weights (`model.safetensors` or "
                "`model.safetensors.index.json`) to stream from",
                help="save the model with `save_pretrained(..., safe_serialization=True)`",
            )

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        # Lazy: the tensor is backed by the file's mapping until it is converted or used.
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)

    def first_float_dtype(self) -> torch.dtype | None:
        for name in self.files:
            t = self.read(name)
            if t.is_floating_point():
                return t.dtype
        return None

    def close(self) -> None:
        return None


@dataclass
class _Entry:
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class _Scratch:
    """An append-only file of raw tensor bytes with an index; a source for the next step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index: dict[str, _Entry] = {}
        self._file: Any = open(path, "wb")
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()
        self._file.write(raw.data)
        self.index[name] = _Entry(self._offset, raw.nbytes, t.dtype, tuple(t.shape))
        self._offset += raw.nbytes

    def finish(self) -> None:
        self._file.close()

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def read(self, name: str) -> torch.Tensor:
        e = self.index[name]
        with open(self.path, "rb") as f:
            f.seek(e.offset)
            raw = bytearray(e.nbytes)
            f.readinto(raw)
        return torch.frombuffer(raw, dtype=torch.uint8).view(e.dtype).reshape(e.shape)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def _config_dtype(config: Any, source: _ShardSource) -> torch.dtype:
    """The dtype ``from_pretrained`` gives the model (its default ``dtype="auto"``): the
    config's ``dtype``, else the checkpoint's first floating-point tensor's."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    return source.first_float_dtype() or torch.get_default_dtype()


def open_meta_model(directory: str | Path) -> tuple[LoadedModel, _ShardSource]:
    """The Hugging Face model in ``directory`` built on the ``meta`` device, as
    :func:`surgery.load.load_model` would load it (same class, config, dtype, eager
    attention), and the source of its weights."""
    import transformers

    d = Path(directory)
    cfg_file = d / "config.json"
    if not d.is_dir() or not cfg_file.is_file():
        raise _model_error(
            f"`{d}` is not a Hugging Face model directory (no `config.json`): streaming reads "
            "a model directory's safetensors shards",
            help="save the model with `save_pretrained`, or run `surgery apply` without `--stream`",
        )
    try:
        text = cfg_file.read_text(encoding="utf-8")
        raw = json.loads(text)
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"cannot read `{cfg_file}`: {first_line(exc)}") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"`{cfg_file}` must hold a JSON object")
    _refuse_remote_code(cfg_file, text, raw)
    source = _ShardSource(d)
    archs = raw.get("architectures")
    cls = _hf_class(archs[0] if isinstance(archs, list) and archs else None)
    try:
        with _offline():
            config = transformers.AutoConfig.from_pretrained(
                str(d), local_files_only=True, trust_remote_code=False
            )
            dtype = _config_dtype(config, source)
            with torch.device("meta"):
                if cls is transformers.AutoModel:
                    model = transformers.AutoModel.from_config(
                        config, attn_implementation="eager", dtype=dtype, trust_remote_code=False
                    )
                else:
                    model = cls._from_config(config, attn_implementation="eager", dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(
            f"could not build the Hugging Face model of `{d}` on the meta device: {first_line(exc)}"
        ) from exc
    model.eval()
    base = {
        "kind": "hf",
        "config": _jsonable(model.config.to_dict()),
        "class": type(model).__name__,
    }
    loaded = LoadedModel(
        model=model, kind="hf", source=d, base=base, model_dir=d, config=model.config
    )
    return loaded, source


# --- units: the modules that own weights ----------------------------------------------------


def _owns_state(m: nn.Module) -> bool:
    if any(True for _ in m.parameters(recurse=False)):
        return True
    return any(n not in m._non_persistent_buffers_set for n in m._buffers)


def _units(model: nn.Module) -> list[str]:
    """Paths of the outermost modules that own parameters or persistent buffers."""
    if _owns_state(model):
        raise _model_error(
            f"`{type(model).__name__}` holds weights at its root: it cannot be streamed by layer"
        )
    units: list[str] = []
    for path, m in model.named_modules():
        if path and _owns_state(m) and not any(path.startswith(u + ".") for u in units[-1:]):
            units.append(path)
    return units


def _slots(
    module: nn.Module, prefix: str
) -> Iterator[tuple[nn.Module, str, str, bool, torch.Tensor]]:
    """``(owner, attribute, full key, is_parameter, tensor)`` of every saved tensor under
    ``module`` (a tensor shared by two owners once per owner, as in a state dict)."""
    for sub_path, sub in module.named_modules(prefix=prefix, remove_duplicate=False):
        for name, p in sub._parameters.items():
            if p is not None:
                yield sub, name, f"{sub_path}.{name}", True, p
        for name, b in sub._buffers.items():
            if b is not None and name not in sub._non_persistent_buffers_set:
                yield sub, name, f"{sub_path}.{name}", False, b


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Each state-dict key → every key that names the same tensor (tied weights)."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return {n: names for names in groups.values() for n in names}


@contextmanager
def _materialized(
    module: nn.Module, prefix: str, read: Callable[[str], torch.Tensor]
) -> Iterator[None]:
    """Give ``module``'s meta tensors their values for the block, then put the meta ones back.

    Shared tensors inside the unit stay shared; modules a pass puts in place of these are
    the caller's to move back to ``meta``.
    """
    saved: list[tuple[nn.Module, str, bool, Any]] = []
    real: dict[int, Any] = {}
    try:
        for owner, name, key, is_param, meta in list(_slots(module, prefix)):
            if id(meta) not in real:
                value = read(key)
                if tuple(value.shape) != tuple(meta.shape):
                    raise _model_error(
                        f"the weight `{key}` has shape {list(value.shape)} in the checkpoint, "
                        f"the model expects {list(meta.shape)}"
                    )
                if value.dtype != meta.dtype:
                    value = value.to(meta.dtype)
                real[id(meta)] = (
                    nn.Parameter(value, requires_grad=meta.requires_grad) if is_param else value
                )
            saved.append((owner, name, is_param, meta))
            if is_param:
                owner._parameters[name] = real[id(meta)]
            else:
                owner._buffers[name] = real[id(meta)]
        yield
    finally:
        for owner, name, is_param, meta in saved:
            if is_param:
                owner._parameters[name] = meta
            else:
                owner._buffers[name] = meta


def _shell(path: str, module: nn.Module) -> nn.Module:
    """A module holding only ``module``, at ``path``: the same paths as in the whole model."""
    root = nn.Module()
    parent = root
    *outer, last = path.split(".")
    for part in outer:
        child = nn.Module()
        parent.add_module(part, child)
        parent = child
    parent.add_module(last, module)
    return root


# --- the output file ------------------------------------------------------------------------


def _write_weights(model: nn.Module, scratch: _Scratch, target: Path) -> None:
    """``target`` = what ``safetensors.torch.save_model(model_with_values)`` writes, with the
    values taken from ``scratch`` (``model`` is on ``meta``: only names, shapes, dtypes)."""
    from safetensors import TensorSpec, serialize_file

    state = model.state_dict(keep_vars=True)
    metadata = {"format": "pt"}
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    for names in groups.values():  # tied weights: save_model keeps the first name in order
        keep = sorted(names)[0]
        for name in sorted(names):
            if name != keep:
                metadata[name] = keep
                del state[name]
    for name, t in state.items():
        e = scratch.index.get(name)
        if e is None or e.dtype != t.dtype or e.shape != tuple(t.shape):
            raise RuntimeError(f"streamed tensor `{name}` is missing or does not fit the model")
    largest = max((scratch.index[n].nbytes for n in state), default=0)
    # Never-touched pages of a private anonymous mapping read as zeros and stay out of RSS.
    zeros = mmap.mmap(-1, max(largest, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        pointer = np.frombuffer(zeros, dtype=np.uint8).ctypes.data
        specs = {
            name: TensorSpec(
                dtype=str(t.dtype).split(".")[-1],
                shape=list(t.shape),
                data_ptr=pointer,
                data_len=scratch.index[name].nbytes,
            )
            for name, t in state.items()
        }
        serialize_file(specs, str(target), metadata=metadata)
    finally:
        del specs
        zeros.close()
    with open(target, "r+b") as out, open(scratch.path, "rb") as src:
        (length,) = struct.unpack("<Q", out.read(8))
        header = json.loads(out.read(length))
        start = 8 + length
        for name in state:
            e = scratch.index[name]
            begin, end = header[name]["data_offsets"]
            assert end - begin == e.nbytes
            src.seek(e.offset)
            out.seek(start + begin)
            left = e.nbytes
            while left:
                chunk = src.read(min(left, _COPY_CHUNK))
                out.write(chunk)
                left -= len(chunk)


def _write_manifest(
    model: nn.Module, base: dict[str, Any], directory: Path, changes: list[dict[str, Any]]
) -> None:
    """``surgery.json`` and ``config.json`` as :func:`surgery.save.write_model` writes them."""
    from surgery.save import FORMAT, _model_dtype, surgery_modules

    base = dict(base)
    config = getattr(model, "config", None)
    if base.get("kind") == "hf" and config is not None:
        base["config"] = config.to_dict()
        config.to_json_file(str(directory / "config.json"))
    manifest = {
        "format": FORMAT,
        "surgery_version": __version__,
        "torch_version": torch.__version__,
        "base": base,
        "dtype": _model_dtype(model),
        "modules": surgery_modules(model),
        "changes": changes,
    }
    (directory / "surgery.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")


# --- the run --------------------------------------------------------------------------------


@dataclass
class _Streamed:
    """One statement streamed over every unit."""

    plan: StepPlan
    changes: list[Any] = field(default_factory=list)


def _stream_statement(
    stmt: Any,
    model: nn.Module,
    units: list[str],
    context: PassContext,
    read: Callable[[str], torch.Tensor],
    scratch: _Scratch,
    progress: Progress | None,
) -> _Streamed:
    """Run ``stmt``'s pass on each unit alone; append every unit's tensors to ``scratch``."""
    from surgery.memory import release_free_memory
    from surgery.select import select

    probe = pass_for(stmt, context)
    selector = getattr(stmt, "selector", None)
    matched = (
        select(model, context.analysis, selector, types=probe.supported_types)
        if selector is not None
        else []
    )
    merged = probe.new_plan()
    changes: list[Any] = []
    notes: list[str] = []
    what = f"line {stmt.span.line}: {stmt.verb}"
    for i, unit in enumerate(units):
        module = model.get_submodule(unit)
        with _materialized(module, unit, read):
            shell = _shell(unit, module)
            plan, made = pass_for(stmt, context).run(shell)
            result = shell.get_submodule(unit)
            for _, _, key, _, tensor in _slots(result, unit):
                scratch.add(key, tensor)
        if result is not module:
            result.to("meta")
            model.set_submodule(unit, result)
        merged.rows += plan.rows
        changes += made
        notes += [n for n in plan.notes if n != _NO_MATCH_NOTE and n not in notes]
        del shell, result, plan, made
        release_free_memory()
        if progress is not None:
            progress(what, i + 1, len(units))
    if selector is not None and not matched:
        notes.append(_NO_MATCH_NOTE)
    merged.notes = notes
    return _Streamed(merged, changes)


def stream_apply(
    recipe: ast.Recipe,
    model_dir: str | Path,
    out: str | Path,
    *,
    recipe_source: str | None = None,
    recipe_name: str = "recipe.surg",
    model_name: str = "model",
    force: bool = False,
    strict: bool = False,
    progress: Progress | None = None,
    seed: int = 0,
    protect: list[Path] | None = None,
) -> Run:
    """Run ``recipe`` on the Hugging Face model in ``model_dir`` layer by layer and write
    ``out`` atomically, as ``surgery apply`` writes it; returns the run (its ``model`` is the
    surgered architecture on the ``meta`` device: the weights are only in ``out``).

    ``protect`` adds paths ``out`` may not be, hold or lie in (the recipe), besides the model.
    Raises :class:`StreamError` for a statement or a model that cannot be streamed (nothing
    is written), :class:`~surgery.passes.PassError` when a statement fails, and the errors of
    :func:`surgery.save.atomic_directory` for ``out``.
    """
    from surgery.contracts import Measured
    from surgery.fmt import format_recipe
    from surgery.graph import analyze
    from surgery.inputs import InputError, example_inputs
    from surgery.report import plan_dict, report_markdown
    from surgery.report_html import write_report_html
    from surgery.save import atomic_directory

    refusals = streaming_refusals(recipe)
    if refusals:
        raise StreamError(refusals)
    program = lower(recipe)
    emit = progress or (lambda what, done, total: None)
    emit("building the model on the meta device", 0, 1)
    loaded, source = open_meta_model(model_dir)
    model = loaded.model
    try:
        example = example_inputs(loaded, seed=seed)
    except InputError as exc:
        raise _model_error(f"cannot make example inputs for streaming: {exc}") from exc
    on_meta = example.to("meta")
    try:
        on_meta.call(model)
    except Exception as exc:
        raise _model_error(
            f"`{type(model).__name__}` does not run on the meta device ({first_line(exc)}), "
            "so its layers cannot be analysed without loading it",
            help="run `surgery apply` without `--stream`",
        ) from exc
    aliases = _aliases(model)
    missing = [k for k in aliases if not any(a in source for a in aliases[k])]
    if missing:
        raise ModelLoadError(
            f"the weights in `{model_dir}` do not cover the `{type(model).__name__}` model: "
            f"{len(missing)} missing (e.g. `{missing[0]}`); streaming reads each weight by "
            "its name in the model",
            help="re-save the complete model with `save_pretrained`",
        )
    emit("analysing the model", 0, 1)
    # Shapes, calls and FLOPs as on real tensors; no torch.export trace (its data edges are
    # read by no statement that streams, and tracing a large model takes minutes).
    before = analyze(model, on_meta, trace=False)
    units = _units(model)
    run = Run(
        recipe=recipe,
        original=model,
        model=model,
        loaded=loaded,
        example=example,
        calibration=[],
        before=before,
        after=before,
    )
    run.warnings.append(Diagnostic(code="S0382", message=NOT_MEASURED, severity="warning"))
    run.warnings += [
        Diagnostic(code="S0382", message=f"analysis on the meta device: {w}", severity="warning")
        for w in before.warnings
    ]
    manager = Manager(recipe, model, strict=strict)  # its selector check, as `apply` runs it
    analysis = before
    with atomic_directory(out, force=force, protect=[Path(model_dir), *(protect or [])]) as tmp:
        current: Any = source
        for index, step in enumerate(program.steps):
            assert isinstance(step, PassStep), "streaming_refusals keeps healing out"
            stmt = step.statement
            started = time.perf_counter()
            scratch = _Scratch(tmp / f".stream-{index}.bin")
            context = PassContext(analysis=analysis, strict=strict)
            reader = current

            def read(key: str, reader: Any = reader, aliases: Any = aliases) -> torch.Tensor:
                name = next((a for a in aliases.get(key, [key]) if a in reader), key)
                return reader.read(name)

            try:
                streamed = _stream_statement(stmt, model, units, context, read, scratch, progress)
            except (PassError, StreamError, ModelLoadError):
                raise
            except Exception as exc:  # a pass bug must still name the recipe line
                raise PassError.crashed(
                    stmt, exc, "nothing was written; see the plan with `surgery plan`"
                ) from exc
            finally:
                scratch.finish()
            manager._check_matches(stmt, streamed.plan, model, analysis, run)
            run.warnings.extend(context.warnings)
            if streamed.changes:
                analysis = analyze(model, on_meta, trace=False)
                aliases = _aliases(model)
            run.steps.append(
                Step(
                    statement=stmt,
                    plan=streamed.plan,
                    changes=streamed.changes,
                    drift=None,
                    seconds=time.perf_counter() - started,
                    params=analysis.total_params,
                )
            )
            current.close()
            current = scratch
        if not program.steps:  # nothing to run: the weights pass through unchanged
            scratch = _Scratch(tmp / ".stream-0.bin")
            for unit in units:
                module = model.get_submodule(unit)
                with _materialized(
                    module,
                    unit,
                    lambda k: source.read(next((a for a in aliases[k] if a in source), k)),
                ):
                    for _, _, key, _, tensor in _slots(module, unit):
                        scratch.add(key, tensor)
            scratch.finish()
            current = scratch
        run.after = analysis if run.steps else before
        measured = Measured(
            run.params_before, run.params_after, run.flops_before, run.flops_after, None, None, []
        )
        run.contracts = [_contract(s, measured) for s in program.contracts]
        emit("writing the output", 0, 1)
        _write_weights(model, current, tmp / "model.safetensors")
        current.close()
        _write_manifest(model, loaded.base, tmp, [c.as_dict() for c in run.changes])
        save_base_files(loaded, tmp)
        source_text = recipe_source if recipe_source is not None else format_recipe(recipe)
        plan = plan_dict(run, recipe=recipe_name, model=model_name)
        report = report_markdown(
            run, recipe=recipe_name, model=model_name, recipe_source=source_text
        )
        (tmp / "recipe.surg").write_text(source_text, encoding="utf-8")
        (tmp / "plan.json").write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(report, encoding="utf-8")
        # The page without per-layer timings: the weights are only in the output's file.
        write_report_html(
            run,
            tmp / "report.html",
            recipe=recipe_name,
            model=model_name,
            recipe_source=source_text,
            measure_layers=False,
        )
    return run


def _contract(stmt: ast.Expect, measured: Any) -> Any:
    """A contract of a streamed run: parameters and FLOPs are known; anything measured on the
    model's outputs or speed is "not measured", never "not met"."""
    from surgery.contracts import Contract, evaluate
    from surgery.fmt import format_statement

    metric = stmt.metric.value
    if metric in ("params", "flops"):
        return evaluate(stmt, measured)
    detail = f"{metric} not measured (streamed run)"
    return Contract(stmt, format_statement(stmt), None, None, None, detail)
