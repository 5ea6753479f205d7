"""Write a surgered model to a directory atomically, and rebuild it without pickle.

A saved model directory holds:

* ``surgery.json`` — the base architecture (for a Hugging Face model: its class and its
  *final* config), the replacement modules as ``(path, class, spec)`` records, the dtype,
  and the provenance of every change;
* ``model.safetensors`` — all weights;
* for Hugging Face models, ``config.json`` and the tokenizer files of the input directory.

:func:`load` rebuilds the base architecture, puts each recorded replacement module at its
path (a wrapper gets the rebuilt module it wraps), then loads the weights strictly. Nothing
is unpickled.

>>> import tempfile, torch
>>> from surgery.modules import LowRankLinear
>>> def tiny(): return torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> import sys; sys.modules[__name__].tiny = tiny  # a factory importable by name
>>> model = tiny(); model[0] = LowRankLinear(8, 8, rank=2)
>>> d = tempfile.mkdtemp()
>>> write_model(model, {"kind": "factory", "arch": f"{__name__}:tiny"}, d)
>>> type(load(d)[0]).__name__
'LowRankLinear'
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from torch import nn

from surgery import __version__
from surgery.load import ModelLoadError, rebuild_base
from surgery.modules import SurgeryModule, build

__all__ = ["FORMAT", "OutputError", "atomic_directory", "load", "surgery_modules", "write_model"]

FORMAT = "surgery/1"


class OutputError(Exception):
    """The output directory cannot be written; ``str(err)`` is a user-facing sentence."""

    def __init__(self, message: str, help: str | None = None) -> None:
        super().__init__(message)
        self.help = help


def surgery_modules(model: nn.Module) -> list[dict[str, Any]]:
    """``{"path", "class", "spec"}`` of every replacement module, parents before children.

    A module built from its parent's spec is not listed again; a module inside a wrapper's
    wrapped child is (the wrapped child comes from the base architecture).
    """
    records: list[dict[str, Any]] = []
    built: list[tuple[str, str | None]] = []  # (path, wrapped attribute) of recorded modules

    def owned(path: str) -> bool:
        for prefix, wrapped in built:
            if path.startswith(prefix + "."):
                inner = f"{prefix}.{wrapped}" if wrapped else None
                if inner is None or not (path == inner or path.startswith(inner + ".")):
                    return True
        return False

    for path, module in model.named_modules():
        if not path or owned(path) or not isinstance(module, SurgeryModule):
            continue
        records.append({"path": path, "class": module.registry_name(), "spec": module.spec()})
        built.append((path, module.wraps))
    return records


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
    st_save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "surgery.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def load(directory: str | Path) -> nn.Module:
    """Rebuild a model saved by ``surgery apply`` (or :func:`write_model`), in eval mode."""
    directory = Path(directory)
    manifest_path = directory / "surgery.json"
    if not manifest_path.is_file():
        raise ModelLoadError(
            f"`{directory}` is not a surgered model directory (no `surgery.json`)",
            help="give the directory written by `surgery apply ... -o DIR`",
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"`{manifest_path}` is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise ModelLoadError(
            f"`{manifest_path}` has format `{manifest.get('format')}`, expected `{FORMAT}`"
        )
    model = rebuild_base(manifest["base"], directory)
    dtype = getattr(torch, str(manifest.get("dtype", "float32")), torch.float32)
    model.to(dtype)
    for record in manifest.get("modules", []):
        try:
            module = build(record["class"], record["spec"])
            if module.wraps:
                setattr(module, module.wraps, model.get_submodule(record["path"]))
            module.to(dtype)
            model.set_submodule(record["path"], module)
        except (KeyError, AttributeError, TypeError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot rebuild module `{record.get('path')}` of `{directory}`: {exc}"
            ) from exc
    weights = directory / "model.safetensors"
    try:
        missing, unexpected = st_load_model(model, str(weights), strict=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the weights `{weights}`: {exc}") from exc
    missing = [k for k in missing if not _is_tied_alias(model, k)]
    if missing or unexpected:
        raise ModelLoadError(
            f"the weights in `{weights}` do not fit the rebuilt model "
            f"(missing: {missing[:5]}, unexpected: {list(unexpected)[:5]})"
        )
    return model.eval()


def _is_tied_alias(model: nn.Module, key: str) -> bool:
    """``key`` names a parameter that shares storage with another saved parameter."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tensor = params.get(key)
    if tensor is None:
        return False
    return any(other is tensor and name != key for name, other in params.items())


@contextmanager
def atomic_directory(
    out: str | Path,
    *,
    force: bool = False,
    protect: list[Path] | None = None,
) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block succeeds.

    ``out`` is created by one rename of a sibling temporary directory: readers never see a
    half-written output, and an error (or interrupt) leaves no ``out`` behind. An existing
    ``out`` is refused unless ``force``; ``protect`` lists paths (the input model) that
    ``out`` must not be or contain.
    """
    out = Path(out).absolute()
    for p in protect or []:
        p = Path(p).absolute()
        if out == p or p.is_relative_to(out) or (out.is_relative_to(p) and p.is_dir()):
            raise OutputError(
                f"refusing to write into `{out}`: it would overwrite the input `{p}`",
                help="choose an output directory outside the input model",
            )
    if out.exists() and not force:
        raise OutputError(f"`{out}` already exists", help="pass `--force` to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"`{out}` exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
