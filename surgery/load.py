"""Load a trained model from any of the supported formats, without surprises.

Formats (see ``ARCHITECTURE.md`` → *Model formats*):

* a Hugging Face model directory (``config.json`` + ``model.safetensors``, sharded safetensors,
  or weights-only ``pytorch_model.bin``), loaded offline with eager attention;
* a ``torch.export`` program (``.pt2``), unflattened back into its submodule hierarchy, only
  with ``trust_pickle=True`` because ``torch.export.load`` unpickles parts of the file;
* a state dict (``.safetensors`` or weights-only ``.pt``) plus ``arch="module:factory"``;
* a pickled whole module (``.pt``), only with ``trust_pickle=True`` because unpickling runs
  arbitrary code from the file.

Nothing named by a file runs unless the caller says so: a Hugging Face config whose ``auto_map``
names its own Python classes needs ``trust_remote_code=True``, and a saved output built from a
user factory calls it only when the caller passes ``arch`` again or ``trust_code=True``.

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
import re
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


# Sentences torch adds to its loading errors that advise re-running with `weights_only=False`
# or allow-listing globals: wrong advice for this tool, whose opt-in is `--trust-pickle`.
_TORCH_ADVICE = re.compile(
    r"Weights only load failed|weights_only`? set to `?False|weights_only=False|In PyTorch 2\.6|"
    r"two options|trust(ed)? (the )?source|(add_)?safe_globals|file an issue|"
    r"Check the documentation|following error message|WeightsUnpickler error:?\s*$",
    re.IGNORECASE,
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _reason(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc`` that says what is wrong, without torch's loading advice.

    >>> _reason(RuntimeError("Weights only load failed. Re-running `torch.load` with "
    ...     "`weights_only` set to `False` will likely succeed.\\n\\nUnsupported operand 149"))
    'Unsupported operand 149'
    """
    for line in _ANSI.sub("", str(exc)).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        kept = [s for s in re.split(r"(?<=\.)\s+", line) if s and not _TORCH_ADVICE.search(s)]
        if kept:
            text = " ".join(kept)
            if not re.search(r"[A-Za-z]{3}", text):  # `KeyError: 54` says more than `54`
                text = f"{type(exc).__name__}: {text}"
            return text[:limit]
    return type(exc).__name__


def _shown(value: object, limit: int = 120) -> str:
    """``value`` as inert text for a message: escapes instead of control characters, cut short.

    >>> _shown("os:abort\\x1b[2J\\n")
    'os:abort\\\\x1b[2J\\\\n'
    """
    text = repr(value)[1:-1] if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_type(value: object) -> str:
    """The JSON name of ``value``'s type, for messages about malformed files."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), f"a `{type(value).__name__}`")


_PICKLE_HELP = (
    "`--trust-pickle` (API: `trust_pickle=True`) unpickles the file, which runs any code it "
    "contains: use it only for a file you made yourself or fully trust. Safer: save "
    "`model.state_dict()` with safetensors and pass `--arch module:factory`, or save a Hugging "
    "Face model with `save_pretrained`"
)


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load ``path`` (HF dir, ``.pt2``, state dict + ``arch``, or trusted pickle) in eval mode.

    ``trust_pickle`` allows what unpickles the file (a pickled module, a ``.pt2`` program);
    ``trust_remote_code`` allows a Hugging Face config whose ``auto_map`` names Python classes
    shipped with the model, which transformers then imports and runs (still offline).
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(
            f"model path `{p}` does not exist",
            help="give a Hugging Face model directory, a `.pt2` program, or a state dict with `--arch`",
        )
    try:
        if p.is_dir() or p.name == "config.json":
            loaded = _load_hf(p.parent if p.is_file() else p, trust_remote_code)
        elif p.suffix == ".pt2":
            loaded = _load_export(p, trust_pickle)
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
        raise _fail(f"could not load `{p}`: {_reason(exc)}", cause=exc) from exc
    loaded.model.eval()
    return loaded


# --- Hugging Face -------------------------------------------------------------------------


def _hf_class(class_name: str | None) -> Any:
    import transformers

    cls = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    return transformers.AutoModel


def _refuse_remote_code(cfg_file: Path, text: str, raw: dict[str, Any]) -> None:
    """Raise if the config names Python classes shipped with the model (``auto_map``).

    transformers imports those modules from the model directory and runs them; with
    ``trust_remote_code=False`` it refuses only some of them and may prompt for others, so the
    key itself is refused here, before transformers sees the directory.
    """
    if "auto_map" not in raw:
        return
    at = text.find('"auto_map"')
    line = text.count("\n", 0, at) + 1 if at >= 0 else 1
    auto_map = raw["auto_map"]
    names = list(auto_map.values()) if isinstance(auto_map, dict) else [auto_map]
    shown = ", ".join(f"`{_shown(n, 60)}`" for n in names[:3])
    raise ModelLoadError(
        f"`{cfg_file}` line {line}: key `auto_map` names Python code shipped with the model "
        f"({shown}), which loading it would import and run",
        help=(
            "pass `--trust-remote-code` (API: `trust_remote_code=True`) only if you have read "
            f"and trust the Python files in `{cfg_file.parent}`: transformers imports and runs "
            "them while loading (still offline); otherwise use a model whose architecture ships "
            "with transformers"
        ),
    )


def _load_hf(d: Path, trust_remote_code: bool = False) -> LoadedModel:
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
        text = cfg_file.read_text(encoding="utf-8")
        raw = json.loads(text)
    except (OSError, ValueError, RecursionError) as exc:
        raise _fail(f"cannot read `{cfg_file}`: {first_line(exc)}", cause=exc) from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"`{cfg_file}` must hold a JSON object, not {_json_type(raw)}")
    if not trust_remote_code:
        _refuse_remote_code(cfg_file, text, raw)
    archs = raw.get("architectures")
    class_name = archs[0] if isinstance(archs, list) and archs else None
    cls = _hf_class(class_name)
    try:
        with _offline():
            model, info = cls.from_pretrained(
                str(d),
                local_files_only=True,
                attn_implementation="eager",
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )
    except Exception as exc:
        raise _fail(
            f"could not load the Hugging Face model in `{d}`: {_reason(exc)}", cause=exc
        ) from exc
    # transformers initialises parameters the checkpoint lacks at random and only logs it; a
    # model that silently is not the trained one is worse than an error. Its list already
    # leaves out what the class ties or declares optional (`_keys_to_ignore_on_load_missing`).
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelLoadError(
            f"the weights in `{d}` do not cover the `{type(model).__name__}` model: "
            f"{len(missing)} missing key{'s' if len(missing) != 1 else ''} ({_few(missing)}) "
            "would be left randomly initialised",
            help=(
                "re-save the complete model with `save_pretrained`, or make `architectures` in "
                "`config.json` name the class the weights were saved from"
            ),
        )
    config = model.config
    base = {"kind": "hf", "config": _jsonable(config.to_dict()), "class": type(model).__name__}
    return LoadedModel(model=model, kind="hf", source=d, base=base, model_dir=d, config=config)


def _jsonable(obj: Any) -> Any:
    """A JSON-safe copy of a config dict (dtypes and other objects become strings)."""
    return json.loads(json.dumps(obj, default=lambda o: str(o).removeprefix("torch.")))


# --- torch.export -------------------------------------------------------------------------


# Why a `.pt2` needs `trust_pickle` (torch 2.13; checked against its source): loading one
# runs code the file chooses, by several roads besides the `use_pickle` weights —
#   * `pt2_archive/_package.py` `_load_state_dict` / `_load_constants`: `torch.load(...,
#     weights_only=False)` for weights and constants flagged `use_pickle`, `pickle.loads` for
#     opaque-object constants;
#   * `_export/serde/serialize.py` `deserialize_torch_artifact` (the saved example inputs):
#     `torch.load(weights_only=True)`, and on *any* failure again with `weights_only=False`;
#   * `_parse_sym_expr`: `sympy.sympify` (an `eval`) on shape expressions from the JSON graph;
#   * `deserialize_operator`: a node target `torch.a.b.c` is resolved by `getattr` from the
#     `torch` module and called when the model runs, so `torch.os.system` is reachable;
#   * `load_pt2` loads the AOTInductor shared libraries an archive carries.
# torch.export.load has no `weights_only` switch. Rejected: rejecting `use_pickle` entries
# before calling it, which leaves the other roads open (a test builds the example-input one).
_PT2_HELP = (
    "pass `--trust-pickle` (API: `trust_pickle=True`) only for a program you exported yourself "
    "or fully trust, because loading it runs code from the file; otherwise give the model as a "
    "Hugging Face directory, or its weights as a `.safetensors` state dict with "
    "`--arch module:factory`"
)


def _load_export(p: Path, trust_pickle: bool = False) -> LoadedModel:
    if not trust_pickle:
        raise ModelLoadError(
            f"`{p}` is a `torch.export` program, and `torch.export.load` unpickles parts of it "
            "and evaluates expressions stored in it, so loading it can run code from the file; "
            "it is not loaded without `--trust-pickle`",
            help=_PT2_HELP,
        )
    if not zipfile.is_zipfile(p):
        raise ModelLoadError(f"`{p}` is not a valid `.pt2` program (not a zip archive)")
    try:
        ep = torch.export.load(str(p))
        model = torch.export.unflatten(ep)
        _drop_symbolic_meta(model)
    except Exception as exc:
        raise _fail(
            f"could not load the exported program `{p}`: {_reason(exc)}", cause=exc
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


def _symbolic(value: Any) -> bool:
    """Whether ``value`` holds a tensor whose sizes or strides are symbolic (dynamic dims)."""
    if isinstance(value, torch.Tensor):
        return any(not isinstance(d, int) for d in (*value.shape, *value.stride()))
    if isinstance(value, (tuple, list)):
        return any(_symbolic(v) for v in value)
    if isinstance(value, dict):
        return any(_symbolic(v) for v in value.values())
    return False


def _drop_symbolic_meta(model: nn.Module) -> None:
    """Remove fake tensors with symbolic sizes from the graphs of an unflattened program.

    A program exported with a dynamic dimension keeps, in each node's ``meta["val"]``, a fake
    tensor of symbolic shape. Nothing runs on it (the unflattened modules are interpreted), but
    ``copy.deepcopy`` of the module then fails with "Cannot call numel() on tensor with
    symbolic sizes", and the tool copies the model before it changes it. Static fake tensors
    stay.
    """
    for module in model.modules():
        graphs = [getattr(module, "graph", None)]
        inner = getattr(module, "graph_module", None)
        if isinstance(inner, torch.fx.GraphModule):
            graphs.append(inner.graph)
        for graph in graphs:
            if not isinstance(graph, torch.fx.Graph):
                continue
            for node in graph.nodes:
                for key in ("val", "example_value"):
                    if key in node.meta and _symbolic(node.meta[key]):
                        del node.meta[key]


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
        # torch's weights-only unpickler names the first Python object it refused to build
        # (`GLOBAL mod.name`, allowed or blocked) or points at `add_safe_globals`; anything
        # else it refuses is a damaged file, not pickled objects.
        text = str(exc)
        found = re.search(r"GLOBAL (\S+)", text)
        if found is None and "add_safe_globals" not in text:
            raise _fail(f"`{p}` is not a readable torch file: {_reason(exc)}", cause=exc) from exc
        if not trust_pickle:
            named = f" (it refers to `{_shown(found.group(1), 80)}`)" if found else ""
            raise _fail(
                f"`{p}` holds pickled Python objects{named}, not only tensors, and unpickling "
                "runs arbitrary code from the file, so it is not loaded without `--trust-pickle`",
                help=_PICKLE_HELP,
                cause=exc,
            ) from exc
        return _load_pickle(p)
    except Exception as exc:
        raise _fail(f"`{p}` is not a readable torch file: {_reason(exc)}", cause=exc) from exc
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
        raise _fail(f"could not unpickle `{p}`: {_reason(exc)}", cause=exc) from exc
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"`{p}` unpickles to a `{type(obj).__name__}`, not a torch module")
    config = _hf_config_of(obj)
    if config is not None:
        # A pickled transformers model is rebuilt from its class and config, like a model
        # directory: its output then loads without unpickling anything.
        base = {"kind": "hf", "config": _jsonable(config.to_dict()), "class": type(obj).__name__}
        return LoadedModel(model=obj, kind="pickle", source=p, base=base, config=config)
    return LoadedModel(
        model=obj, kind="pickle", source=p, base={"kind": "pickle", "file": _PICKLED_BASE}
    )


# The name under which an output keeps a copy of the pickled module it was made from.
_PICKLED_BASE = "base.pt"


def _hf_config_of(module: nn.Module) -> Any | None:
    """The config of a transformers model whose class transformers itself exports, else None."""
    import sys

    transformers = sys.modules.get("transformers")  # unpickling such a model imported it
    if transformers is None:
        return None
    cls = getattr(transformers, type(module).__name__, None)
    config = getattr(module, "config", None)
    if (
        cls is type(module)
        and issubclass(cls, transformers.PreTrainedModel)
        and isinstance(config, transformers.PretrainedConfig)
    ):
        return config
    return None


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
    shown = _shown(arch)
    if not sep or not mod_name or not fn_name:
        raise ModelLoadError(
            f"architecture `{shown}` for `{where}` is not of the form `module:factory`",
            help="e.g. `--arch mypkg.models:build_model` (a function taking no arguments)",
        )
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:
        raise _fail(
            f"cannot import module `{_shown(mod_name)}` named by `--arch {shown}`: {_reason(exc)}",
            help="make sure the module is importable (installed or on PYTHONPATH)",
            cause=exc,
        ) from exc
    factory = getattr(module, fn_name, None)
    if factory is None or not callable(factory):
        raise ModelLoadError(
            f"module `{_shown(mod_name)}` has no callable `{_shown(fn_name)}` (from `--arch {shown}`)"
        )
    try:
        model = factory()
    except Exception as exc:
        raise _fail(f"factory `{shown}` failed: {_reason(exc)}", cause=exc) from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"factory `{shown}` returned a `{type(model).__name__}`, not a torch module"
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


def rebuild_base(
    base: dict[str, Any],
    directory: Path,
    *,
    arch: str | None = None,
    trust_code: bool = False,
    trust_pickle: bool = False,
) -> nn.Module:
    """Build the unsurgered architecture described by ``base`` (weights are loaded afterwards).

    ``base`` comes from a file (``surgery.json``), so it only selects among what this tool
    builds itself: a transformers class from its config, or — only when the caller says so
    again — a user factory (``arch``, or the recorded one with ``trust_code=True``) or the
    ``.pt2`` program in ``directory`` (``trust_pickle=True``, see :func:`load_model`).

    >>> rebuild_base({"kind": "factory", "arch": "os:abort"}, Path("out"))
    Traceback (most recent call last):
    ...
    surgery.load.ModelLoadError: `out` was built from the user factory `os:abort`, which is not called unless you ask for it
    """
    if not isinstance(base, dict):
        raise ModelLoadError(
            f"the base model of `{directory}` must be a JSON object, not {_json_type(base)}"
        )
    kind = base.get("kind")
    if arch is not None and kind != "factory":
        raise ModelLoadError(
            f"`--arch` applies only to an output built from a user factory, and `{directory}` "
            f"was built from a base of kind `{_shown(kind)}`",
            help="leave out `--arch`",
        )
    if kind == "hf":
        return _rebuild_hf(base, directory)
    if kind == "factory":
        return _rebuild_factory(base, directory, arch, trust_code)
    if kind == "export":
        return _rebuild_export(base, directory, trust_pickle)
    if kind == "pickle":
        return _rebuild_pickle(base, directory, trust_pickle)
    raise ModelLoadError(f"`{directory}` names an unknown base model kind `{_shown(kind)}`")


def _rebuild_factory(
    base: dict[str, Any], directory: Path, arch: str | None, trust_code: bool
) -> nn.Module:
    if arch is not None:  # the caller's own choice, whatever the file says
        return _call_factory(arch, str(directory)).eval()
    recorded = base.get("arch")
    if not isinstance(recorded, str) or not recorded:
        raise ModelLoadError(
            f"`{directory}` was built from a user factory but does not record which one",
            help="pass `--arch module:factory` (API: `arch=...`) to build the architecture",
        )
    if not trust_code:
        # Importing and calling a `module:function` named by a file is running code the file
        # chooses (`code:interact`, `os:abort`, a module shipped beside it): only on request.
        shown = _shown(recorded)
        raise ModelLoadError(
            f"`{directory}` was built from the user factory `{shown}`, which is not called "
            "unless you ask for it",
            help=(
                f"if you trust it, pass `--arch {shown}` (API: `trust_code=True`, or "
                f'`arch="{shown}"`); it imports that module and calls the function'
            ),
        )
    return _call_factory(recorded, str(directory)).eval()


def _rebuild_export(base: dict[str, Any], directory: Path, trust_pickle: bool) -> nn.Module:
    prog = _base_file(base, "program", "base.pt2", directory)
    name = prog.name
    if not trust_pickle:
        raise ModelLoadError(
            f"`{directory}` was built from a `torch.export` program (`{_shown(name)}`), and "
            "rebuilding it runs `torch.export.load`, which unpickles parts of the file and "
            "evaluates expressions stored in it, so it is not loaded without `--trust-pickle`",
            help=(
                "pass `--trust-pickle` (API: `trust_pickle=True`) only for an output you made "
                "yourself or fully trust"
            ),
        )
    if prog.is_symlink() or not prog.is_file():
        raise ModelLoadError(f"the base program `{prog}` is missing (or not a regular file)")
    try:
        ep = torch.export.load(str(prog))
        model = torch.export.unflatten(ep)
        _drop_symbolic_meta(model)
    except Exception as exc:
        raise _fail(f"could not load the base program `{prog}`: {_reason(exc)}", cause=exc) from exc
    saved = getattr(ep, "example_inputs", None)
    if saved is not None:  # what `surgery load` runs the rebuilt model on (`inputs._attr_inputs`)
        args, kwargs = saved
        model.example_inputs = (tuple(args), dict(kwargs))  # type: ignore[assignment]
    return model.eval()


def _base_file(base: dict[str, Any], key: str, default: str | None, directory: Path) -> Path:
    """The file ``base[key]`` names inside ``directory``: a plain name, never a path elsewhere."""
    name = base.get(key, default)
    if not isinstance(name, str) or not name or name in (".", "..") or re.search(r"[/\\]", name):
        raise ModelLoadError(
            f"`{directory}` names its base model file `{_shown(name)}`, which is not a file name "
            "inside the directory"
        )
    return Path(directory) / name


def _rebuild_pickle(base: dict[str, Any], directory: Path, trust_pickle: bool) -> nn.Module:
    if "file" not in base:  # written before outputs kept a copy of the pickled module
        raise ModelLoadError(
            f"`{directory}` was made from a pickled module and holds no copy of it, so its "
            "architecture cannot be rebuilt",
            help="apply the recipe again to write a complete output, or give the model as a "
            "state dict with `--arch module:factory`",
        )
    path = _base_file(base, "file", None, directory)
    if not trust_pickle:
        raise ModelLoadError(
            f"`{directory}` was made from a pickled module (`{path.name}`), and rebuilding it "
            "unpickles that copy, which runs code from the file, so it is not loaded without "
            "`--trust-pickle`",
            help=(
                "pass `--trust-pickle` (API: `trust_pickle=True`) only for an output you made "
                "yourself from a model you trust"
            ),
        )
    if path.is_symlink() or not path.is_file():
        raise ModelLoadError(f"the base model `{path}` is missing (or not a regular file)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise _fail(
            f"could not unpickle the base model `{path}`: {_reason(exc)}", cause=exc
        ) from exc
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(
            f"the base model `{path}` unpickles to a `{type(obj).__name__}`, not a torch module"
        )
    return obj.eval()


def _rebuild_hf(base: dict[str, Any], directory: Path) -> nn.Module:
    import transformers
    from transformers import CONFIG_MAPPING

    cfg = base.get("config")
    class_name = base.get("class")
    if not isinstance(cfg, dict) or not isinstance(class_name, str):
        raise ModelLoadError(
            f"the Hugging Face base model of `{directory}` needs a `config` object and a "
            f"`class` name (found {_json_type(cfg)} and {_json_type(class_name)})"
        )
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ModelLoadError(f"transformers does not know the model type `{_shown(model_type)}`")
    cls = getattr(transformers, class_name, None)
    try:
        config = CONFIG_MAPPING[model_type].from_dict(dict(cfg))
        with _offline():
            if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
                model = cls._from_config(config, attn_implementation="eager")
            else:
                model = transformers.AutoModel.from_config(
                    config, attn_implementation="eager", trust_remote_code=False
                )
    except Exception as exc:
        raise _fail(
            f"could not rebuild the `{_shown(class_name)}` model: {_reason(exc)}", cause=exc
        ) from exc
    return model.eval()


def save_base_files(loaded: LoadedModel, directory: Path) -> list[Path]:
    """Write the files :func:`rebuild_base` needs besides the JSON, and tokenizer side files.

    Only regular files that really lie in the model directory are copied: a side file or a
    sentence-transformers folder that is a symbolic link (to ``/etc/passwd``, say) would put a
    file from elsewhere into the output. The exception is the Hugging Face hub cache, whose
    ``snapshots/REV/`` files are links into the same repository's ``blobs/``. Returns the
    paths that were skipped.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    skipped: list[Path] = []
    if loaded.kind == "export":
        _copy(loaded.source, directory / "base.pt2")
    elif loaded.kind == "pickle" and loaded.base.get("kind") == "pickle":
        _copy(loaded.source, directory / _PICKLED_BASE)
    elif loaded.kind == "hf" and loaded.model_dir is not None:
        src = loaded.model_dir
        roots = _side_file_roots(src)
        for name in _SIDE_FILES:
            if (src / name).exists() or (src / name).is_symlink():
                if _inside(src / name, roots):
                    _copy(src / name, directory / name)
                else:
                    skipped.append(src / name)
        # sentence-transformers pipeline stages live in folders like `1_Pooling`, `2_Normalize`
        for sub in sorted(src.iterdir()):
            if not (sub.name.split("_", 1)[0].isdigit() and "_" in sub.name):
                continue
            if sub.is_symlink() or not sub.is_dir():
                skipped.append(sub)
                continue
            skipped += _copy_tree(sub, directory / sub.name, roots)
    return skipped


def _side_file_roots(src: Path) -> tuple[Path, ...]:
    """Where a side file of ``src`` may really live: the directory, or its hub-cache blobs."""
    real = src.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        roots.append((real.parent.parent / "blobs").resolve())
    return tuple(roots)


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    """``path`` is a regular file (a link only into a hub cache's blobs) under ``roots``."""
    real = path.resolve()
    if not real.is_file():
        return False
    if path.is_symlink():
        return len(roots) > 1 and real.is_relative_to(roots[1])
    return real.is_relative_to(roots[0])


def _copy_tree(src: Path, dest: Path, roots: tuple[Path, ...]) -> list[Path]:
    """Copy the regular files under ``src`` (links only into hub-cache blobs); return skipped."""
    if dest.exists() and dest.resolve() == src.resolve():
        return []
    skipped: list[Path] = []
    for here, dirs, files in os.walk(src):  # does not descend into linked folders
        base = Path(here)
        for d in list(dirs):
            if (base / d).is_symlink():
                dirs.remove(d)
                skipped.append(base / d)
        for f in files:
            path = base / f
            if _inside(path, roots):
                target = dest / path.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                _copy(path, target)
            else:
                skipped.append(path)
    return skipped


def _copy(src: Path, dest: Path) -> None:
    if dest.exists() and dest.resolve() == src.resolve():
        return
    shutil.copy2(src, dest)
