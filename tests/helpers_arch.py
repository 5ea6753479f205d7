"""One cell of the architecture coverage matrix: a recipe line on a tiny model, end to end.

``run_cell(family, line, workdir)`` saves the family's tiny random-weight model as a Hugging
Face directory, loads it as ``surgery apply`` does (:func:`surgery.load_model`), runs the line
(:class:`surgery.Manager`, no timing), writes ``OUT/`` (:func:`surgery.save_run`), rebuilds it
with :func:`surgery.load` (what ``surgery load`` runs) and checks that the rebuilt model gives
outputs of the surgered model's shapes; a decoder must also ``generate`` after the reload.
The result is ``ok``, ``refused`` (a located diagnostic from the pass: the message says why),
``inputs`` (no example inputs could be made for the model) or ``crash`` (anything else: a bug).
Used by ``tests/test_arch_matrix.py`` and ``bench/arch_matrix.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tests.helpers_models import ARCHS

__all__ = ["LINES", "Cell", "run_cell"]

LINES: dict[str, str] = {
    "R1": "decompose Linear rank = 0.25",
    "R3": "group kv = 2",
    "R4": "skip tokens 50% after block 1",
    "R5": "truncate blocks keep 1 uniform",
    "R5s": "truncate blocks keep 3 uniform",
    "R6": "drop attention 1 by similarity",
    "R8": "decompose Linear rank = 0.5 method svd-llm",
    "R9": "sparsify Linear 2:4",
}
"""The recipe lines of issue 16, by the names the issue gives them (``R5s``: a truncation that
leaves every stage of a hierarchical model a block; ``keep 1`` cannot)."""


@dataclass
class Cell:
    family: str
    line: str
    status: str  # ok | refused | inputs | crash
    message: str = ""
    changes: int = 0
    seconds: float = 0.0

    @property
    def mark(self) -> str:
        return {"ok": "✓", "refused": "refused", "inputs": "no inputs", "crash": "✗"}[self.status]


def _shapes(out: object) -> list[tuple[int, ...]]:
    from surgery.inputs import flatten_outputs

    return [tuple(t.shape) for t in flatten_outputs(out)]


def run_cell(family: str, line: str, workdir: Path) -> Cell:
    """Apply ``line`` to the tiny ``family`` model, save, reload, and compare (module docstring)."""
    import surgery
    from surgery.inputs import InputError
    from surgery.passes import PassError

    started = time.perf_counter()
    src, out = workdir / f"{family}-model", workdir / f"{family}-out"
    if not src.exists():
        built: Any = ARCHS[family]()
        built.save_pretrained(src)
    loaded = surgery.load_model(src)
    try:
        run = surgery.Manager(surgery.parse(line + "\n"), loaded).run(measure=False)
    except PassError as exc:
        d = exc.diagnostic
        text = (
            d.message + "".join(f"; {n}" for n in d.notes) + (f"; help: {d.help}" if d.help else "")
        )
        status = "crash" if d.code == "S0401" else "refused"
        return Cell(
            family, line, status, f"{d.code}: {text}", seconds=time.perf_counter() - started
        )
    except InputError as exc:
        return Cell(family, line, "inputs", str(exc), seconds=time.perf_counter() - started)
    surgery.save_run(run, out, force=True)
    model: Any = surgery.load(out)
    with torch.no_grad():
        got = _shapes(run.example.call(model))
        want = _shapes(run.example.call(run.model))
    if got != want:
        return Cell(family, line, "crash", f"reloaded output shapes {got} != {want}")
    if hasattr(model, "generate") and getattr(model.config, "is_decoder", False) is not None:
        from transformers import GenerationMixin

        if isinstance(model, GenerationMixin) and model.can_generate():
            ids = torch.tensor([[5, 6, 7]])
            kwargs = {"max_new_tokens": 3, "do_sample": False}
            if getattr(model.config, "is_encoder_decoder", False):
                kwargs["decoder_start_token_id"] = int(model.config.decoder_start_token_id or 0)
            gen = model.generate(ids, **kwargs)
            if gen.shape[-1] < 4:
                return Cell(family, line, "crash", f"generate gave shape {tuple(gen.shape)}")
    return Cell(family, line, "ok", changes=len(run.changes), seconds=time.perf_counter() - started)
