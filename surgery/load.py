"""Load a trained model from any of the supported formats, without surprises.

Formats (see ``ARCHITECTURE.md`` → *Model formats*):

* a Hugging Face model directory (``config.json`` + ``model.safetensors``, sharded safetensors,
  or weights-only ``pytorch_model.bin``), loaded offline with eager attention;
* a ``torch.export`` program (``.pt2``), unflattened back into its submodule hierarchy;
* a state dict (``.safetensors`` or weights-only ``.pt``) plus ``arch="module:factory"``;
* a pickled whole module (``.pt``), only with ``trust_pickle=True`` because unpickling runs
  arbitrary code from the file.

Every failure on bad input is a :class:`ModelLoadError` whose message is a full sentence naming
the path; no raw exception escapes :func:`load_model`. Input files are only ever read.

>>> import tempfile, torch
>>> from pathlib import Path
>>> from safetensors.torch import save_file
>>> d = Path(tempfile.mkdtemp())
>>> save_file({"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, d / "w.safetensors")
>>> load_model(d / "w.safetensors")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
surgery.load.ModelLoadError: ... is a state dict: pass `--arch module:factory` ...
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.diagnostics import first_line

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "rebuild_base", "save_base_files"]

# Files that make a saved directory still usable as a model directory (tokenizers, image
# processors, generation defaults, sentence-transformers pipeline). Weights and config.json
# are written by whoever saves the surgered model, never here.
_SIDE_FILES = (
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")


class ModelLoadError(Exception):
    """A model could not be loaded; ``str(err)`` is a user-facing sentence, ``help`` the fix."""

    def __init__(self, message: str, help: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.help = help


@dataclass
class LoadedModel:
    """A loaded model in ``eval()`` mode and what is needed to rebuild and describe it."""

    model: nn.Module
    kind: str  # "hf" | "export" | "state_dict" | "pickle"
    source: Path  # the path given to load_model
    base: dict[str, Any]  # JSON data that rebuild_base() turns back into the architecture
    model_dir: Path | None = None  # HF directory (tokenizer files), else None
    config: Any | None = None  # HF config, else None
    example_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None  # (args, kwargs) of a .pt2


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Make transformers / huggingface_hub refuse the network (and stay quiet) while loading."""
    from transformers.utils import logging as hf_logging

    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    # Library code does not draw progress bars on the user's terminal.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fail(
    message: str, help: str | None = None, cause: BaseException | None = None
) -> ModelLoadError:
    err = ModelLoadError(message, help)
    if cause is not None:
        err.__cause__ = cause
    return err


def load_model(
    path: str | Path, *, arch: str | None = None, trust_pickle: bool = False
) -> LoadedModel:
    """Load ``path`` (HF dir, ``.pt2``, state dict + ``arch``, or trusted pickle) in eval mode."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(
            f"model path `{p}` does not exist",
            help="give a Hugging Face model directory, a `.pt2` program, or a state dict with `--arch`",
        )
    try:
        if p.is_dir() or p.name == "config.json":
            loaded = _load_hf(p.parent if p.is_file() else p)
        elif p.suffix == ".pt2":
            loaded = _load_export(p)
        elif p.suffix == ".safetensors":
            loaded = _load_state_dict(p, _read_safetensors(p), arch)
        elif p.suffix in _STATE_DICT_SUFFIXES:
            loaded = _load_torch_file(p, arch, trust_pickle)
        else:
            raise ModelLoadError(
                f"cannot load `{p}`: unknown model format `{p.suffix or p.name}`",
                help="supported: a Hugging Face directory, `.pt2`, `.safetensors`, `.pt`",
            )
    except ModelLoadError:
        raise
    except Exception as exc:  # bad input must never surface as a raw traceback
        raise _fail(f"could not load `{p}`: {first_line(exc)}", cause=exc) from exc
    loaded.model.eval()
    return loaded


# --- Hugging Face -------------------------------------------------------------------------


def _hf_class(class_name: str | None) -> Any:
    import transformers

    cls = getattr(transformers, class_name, None) if class_name else None
    if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
        return cls
    return transformers.AutoModel


def _load_hf(d: Path) -> LoadedModel:
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(
            f"directory `{d}` has no `config.json`, so it is not a Hugging Face model directory",
            help="save the model with `save_pretrained`, or pass a `.pt2` / state dict file",
        )
    if not any((d / w).is_file() for w in _WEIGHT_FILES):
        raise ModelLoadError(
            f"directory `{d}` has a `config.json` but no weights (`model.safetensors`)",
            help="save the weights with `save_pretrained(..., safe_serialization=True)`",
        )
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _fail(f"cannot read `{cfg_file}`: {first_line(exc)}", cause=exc) from exc
    archs = raw.get("architectures") if isinstance(raw, dict) else None
    class_name = archs[0] if isinstance(archs, list) and archs else None
    cls = _hf_class(class_name)
    try:
        with _offline():
            model = cls.from_pretrained(str(d), local_files_only=True, attn_implementation="eager")
    except Exception as exc:
        raise _fail(
            f"could not load the Hugging Face model in `{d}`: {first_line(exc)}", cause=exc
        ) from exc
    config = model.config
    base = {"kind": "hf", "config": _jsonable(config.to_dict()), "class": type(model).__name__}
    return LoadedModel(model=model, kind="hf", source=d, base=base, model_dir=d, config=config)


def _jsonable(obj: Any) -> Any:
    """A JSON-safe copy of a config dict (dtypes and other objects become strings)."""
    return json.loads(json.dumps(obj, default=lambda o: str(o).removeprefix("torch.")))


# --- torch.export -------------------------------------------------------------------------


def _load_export(p: Path) -> LoadedModel:
    if not zipfile.is_zipfile(p):
        raise ModelLoadError(f"`{p}` is not a valid `.pt2` program (not a zip archive)")
    try:
        ep = torch.export.load(str(p))
        model = torch.export.unflatten(ep)
    except Exception as exc:
        raise _fail(
            f"could not load the exported program `{p}`: {first_line(exc)}", cause=exc
        ) from exc
    example = None
    ex = getattr(ep, "example_inputs", None)
    if ex is not None:
        args, kwargs = ex
        example = (tuple(args), dict(kwargs))
    return LoadedModel(
        model=model,
        kind="export",
        source=p,
        base={"kind": "export", "program": "base.pt2"},
        example_inputs=example,
    )


# --- state dicts and pickles ----------------------------------------------------------------


def _read_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:
        raise _fail(
            f"`{p}` is not a readable safetensors file: {first_line(exc)}", cause=exc
        ) from exc


def _load_torch_file(p: Path, arch: str | None, trust_pickle: bool) -> LoadedModel:
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):
            raise _fail(
                f"`{p}` is not a readable torch file: {first_line(exc)}", cause=exc
            ) from exc
        if not trust_pickle:
            raise _fail(
                f"`{p}` holds pickled Python objects (a whole module), and unpickling runs "
                "arbitrary code from the file, so it is not loaded by default",
                help=(
                    "re-save it as a safetensors state dict and pass `--arch module:factory`, or "
                    "export it with `torch.export` to a `.pt2`; pass `--trust-pickle` only if you "
                    "trust the file"
                ),
                cause=exc,
            ) from exc
        return _load_pickle(p)
    except Exception as exc:
        raise _fail(f"`{p}` is not a readable torch file: {first_line(exc)}", cause=exc) from exc
    state = _as_state_dict(obj)
    if state is None:
        raise ModelLoadError(
            f"`{p}` holds a `{type(obj).__name__}`, not a state dict of tensors",
            help="save `model.state_dict()` and pass `--arch module:factory`",
        )
    return _load_state_dict(p, state, arch)


def _load_pickle(p: Path) -> LoadedModel:
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise _fail(f"could not unpickle `{p}`: {first_line(exc)}", cause=exc) from exc
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"`{p}` unpickles to a `{type(obj).__name__}`, not a torch module")
    return LoadedModel(model=obj, kind="pickle", source=p, base={"kind": "pickle"})


def _as_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # common training-checkpoint layout
    if (
        isinstance(obj, dict)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        return dict(obj)
    return None


def _call_factory(arch: str, where: str) -> nn.Module:
    mod_name, sep, fn_name = arch.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ModelLoadError(
            f"architecture `{arch}` for `{where}` is not of the form `module:factory`",
            help="e.g. `--arch mypkg.models:build_model` (a function taking no arguments)",
        )
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:
        raise _fail(
            f"cannot import module `{mod_name}` named by `--arch {arch}`: {first_line(exc)}",
            help="make sure the module is importable (installed or on PYTHONPATH)",
            cause=exc,
        ) from exc
    factory = getattr(module, fn_name, None)
    if factory is None or not callable(factory):
        raise ModelLoadError(
            f"module `{mod_name}` has no callable `{fn_name}` (from `--arch {arch}`)"
        )
    try:
        model = factory()
    except Exception as exc:
        raise _fail(f"factory `{arch}` failed: {first_line(exc)}", cause=exc) from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"factory `{arch}` returned a `{type(model).__name__}`, not a torch module"
        )
    return model


def _load_state_dict(p: Path, state: dict[str, torch.Tensor], arch: str | None) -> LoadedModel:
    if arch is None:
        raise ModelLoadError(
            f"`{p}` is a state dict: pass `--arch module:factory` so the architecture can be built",
            help="`factory` is a function taking no arguments that returns the untrained module",
        )
    model = _call_factory(arch, str(p))
    _strict_load(model, state, p)
    return LoadedModel(
        model=model, kind="state_dict", source=p, base={"kind": "factory", "arch": arch}
    )


def _strict_load(model: nn.Module, state: dict[str, torch.Tensor], where: Path | str) -> None:
    """``load_state_dict(strict=True)`` with a readable error and tied-weight aliases filled."""
    expected = model.state_dict(keep_vars=True)
    state = dict(state)
    # Tied weights (e.g. lm_head / embeddings) are saved once by safetensors: a missing name
    # whose tensor is shared with a present one is not really missing.
    by_storage: dict[int, list[str]] = {}
    for name, t in expected.items():
        by_storage.setdefault(id(t), []).append(name)
    for names in by_storage.values():
        present = [n for n in names if n in state]
        if present:
            for n in names:
                state.setdefault(n, state[present[0]])
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        raise ModelLoadError(
            f"the state dict in `{where}` does not match the architecture: " + "; ".join(parts),
            help="check that `--arch` builds the same model the weights were saved from",
        )
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise _fail(
            f"the state dict in `{where}` does not fit the architecture: {first_line(exc)}",
            cause=exc,
        ) from exc


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(f"`{k}`" for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


# --- rebuilding -----------------------------------------------------------------------------


def rebuild_base(base: dict[str, Any], directory: Path) -> nn.Module:
    """Build the unsurgered architecture described by ``base`` (weights are loaded afterwards).

    ``directory`` holds the files written by :func:`save_base_files` (for ``.pt2`` programs).
    """
    kind = base.get("kind")
    if kind == "hf":
        return _rebuild_hf(base)
    if kind == "factory":
        return _call_factory(str(base.get("arch")), str(directory)).eval()
    if kind == "export":
        prog = Path(directory) / str(base.get("program", "base.pt2"))
        if not prog.is_file():
            raise ModelLoadError(f"the base program `{prog}` is missing")
        try:
            return torch.export.unflatten(torch.export.load(str(prog))).eval()
        except Exception as exc:
            raise _fail(
                f"could not load the base program `{prog}`: {first_line(exc)}", cause=exc
            ) from exc
    if kind == "pickle":
        raise ModelLoadError(
            "the base model was a pickled module, which cannot be rebuilt without unpickling",
            help="load the original `.pt` with `--trust-pickle`, or save it as a state dict with `--arch`",
        )
    raise ModelLoadError(f"unknown base model kind `{kind}`")


def _rebuild_hf(base: dict[str, Any]) -> nn.Module:
    import transformers
    from transformers import CONFIG_MAPPING

    cfg = dict(base.get("config") or {})
    model_type = str(cfg.get("model_type"))
    if model_type not in CONFIG_MAPPING:
        raise ModelLoadError(f"transformers does not know the model type `{model_type}`")
    try:
        config = CONFIG_MAPPING[model_type].from_dict(cfg)
        cls = getattr(transformers, str(base.get("class")), None)
        with _offline():
            if isinstance(cls, type) and hasattr(cls, "_from_config"):
                model = cls._from_config(config, attn_implementation="eager")
            else:
                model = transformers.AutoModel.from_config(config, attn_implementation="eager")
    except Exception as exc:
        raise _fail(
            f"could not rebuild the `{base.get('class')}` model: {first_line(exc)}", cause=exc
        ) from exc
    return model.eval()


def save_base_files(loaded: LoadedModel, directory: Path) -> None:
    """Write the files :func:`rebuild_base` needs besides the JSON, and tokenizer side files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if loaded.kind == "export":
        _copy(loaded.source, directory / "base.pt2")
    elif loaded.kind == "hf" and loaded.model_dir is not None:
        src = loaded.model_dir
        for name in _SIDE_FILES:
            if (src / name).is_file():
                _copy(src / name, directory / name)
        # sentence-transformers pipeline stages live in folders like `1_Pooling`, `2_Normalize`
        for sub in sorted(src.iterdir()):
            if sub.is_dir() and sub.name.split("_", 1)[0].isdigit() and "_" in sub.name:
                dest = directory / sub.name
                if dest.resolve() != sub.resolve():
                    shutil.copytree(sub, dest, dirs_exist_ok=True)


def _copy(src: Path, dest: Path) -> None:
    if dest.exists() and dest.resolve() == src.resolve():
        return
    shutil.copy2(src, dest)
