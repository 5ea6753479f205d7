"""Single-process healing checkpoints: safetensors and JSON, no pickle.

A checkpoint is one directory::

    model.safetensors      the student's parameters and buffers
    optimizer.safetensors  the optimizer's tensors (``<param index>/<name>``)
    state.json             the trainer's state, the optimizer's hyperparameters and its
                           non-tensor state; written last, so a directory without it is an
                           unfinished checkpoint

It is written into ``<dir>.tmp`` and renamed, so a kill leaves the previous checkpoint whole.

>>> import tempfile, torch
>>> from pathlib import Path
>>> m = torch.nn.Linear(3, 2); opt = torch.optim.AdamW(m.parameters())
>>> m(torch.ones(1, 3)).sum().backward(); opt.step()
>>> d = Path(tempfile.mkdtemp()) / "step-1"
>>> save_checkpoint(d, m, opt, {"step": 1})
>>> m2 = torch.nn.Linear(3, 2); opt2 = torch.optim.AdamW(m2.parameters())
>>> load_checkpoint(d, m2, opt2)["step"], torch.equal(m.weight, m2.weight)
(1, True)
>>> torch.equal(opt.state[m.weight]["exp_avg"], opt2.state[m2.weight]["exp_avg"])
True
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint cannot be used (missing files, another model, another recipe)."""


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        raise TypeError("tensor in JSON state")
    return value


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Write one checkpoint into ``directory`` (replacing it), atomically."""
    from safetensors.torch import save_file, save_model

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = _plain(value)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    groups = [{k: _plain(v) for k, v in g.items()} for g in sd["param_groups"]]
    document = {
        "format": FORMAT,
        "trainer": state,
        "optimizer": {"param_groups": groups, "scalars": scalars},
    }
    with (tmp / "state.json").open("w", encoding="utf-8") as f:
        json.dump(document, f)
        f.flush()
        os.fsync(f.fileno())
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def load_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``model`` and ``optimizer``; return the
    trainer's state."""
    from safetensors.torch import load_file, load_model

    directory = Path(directory)
    try:
        document = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"`{directory}` is not a whole checkpoint: {exc}") from exc
    if document.get("format") != FORMAT:
        raise CheckpointError(f"`{directory}` was written by another version of surgery")
    try:
        missing, unexpected = load_model(model, str(directory / "model.safetensors"), strict=False)
    except Exception as exc:
        raise CheckpointError(
            f"the checkpoint `{directory}` does not fit the model: {exc}"
        ) from exc
    if missing or unexpected:
        raise CheckpointError(
            f"the checkpoint `{directory}` does not fit the model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    tensors = load_file(str(directory / "optimizer.safetensors"))
    opt = document["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entry in opt["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"the checkpoint `{directory}` does not fit the optimizer: {exc}"
        ) from exc
    trainer: dict[str, Any] = document["trainer"]
    return trainer


def latest_checkpoint(directory: Path) -> Path | None:
    """The whole checkpoint ``directory/step-K`` with the largest ``K``, if any."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = []
    for p in directory.iterdir():
        if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file():
            tail = p.name.removeprefix("step-")
            if tail.isdigit():
                found.append((int(tail), p))
    return max(found)[1] if found else None
