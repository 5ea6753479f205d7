"""A ``heal`` statement with every option resolved to its value (defaults filled in).

>>> from surgery.parse import parse
>>> c = HealConfig.of(parse('heal steps 10 on "d.txt" loss kl 1 task 0.5').statements[0])
>>> (c.steps, c.batch, c.max_length, c.mse, c.kl, c.temperature, c.task, c.clip, c.seed)
(10, 8, 128, 0.0, 1.0, 1.0, 0.5, 1.0, 0)
>>> HealConfig.of(parse("heal steps 3").statements[0]).mse  # no `loss`: distillation alone
1.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_FIELD",
    "DEFAULT_LR",
    "DEFAULT_MAX_LENGTH",
    "GRAD_CLIP",
    "HealConfig",
]

#: Learning rate when the recipe gives no ``lr`` (see `surgery.heal`).
DEFAULT_LR = 1e-4
#: Gradient-norm clip when the recipe gives no ``clip``: one bad batch must not undo a
#: decomposition.
GRAD_CLIP = 1.0
#: Examples per micro-batch of a training set when the recipe gives no ``batch``.
DEFAULT_BATCH = 8
#: Tokens per example (or packed block) when the recipe gives no ``max length``.
DEFAULT_MAX_LENGTH = 128
#: The column of JSONL, CSV, Parquet and saved data sets that holds the text.
DEFAULT_FIELD = "text"


@dataclass(frozen=True)
class HealConfig:
    """Every knob of one ``heal``."""

    steps: int
    lr: float = DEFAULT_LR
    batch: int = DEFAULT_BATCH
    max_length: int = DEFAULT_MAX_LENGTH
    field: str = DEFAULT_FIELD
    accumulate: int = 1
    warmup: int = 0
    clip: float = GRAD_CLIP
    mse: float = 1.0
    kl: float = 0.0
    temperature: float = 1.0
    task: float = 0.0
    eval_every: int | None = None
    checkpoint_every: int | None = None
    keep_best: bool = False
    stop_early: bool = False
    seed: int = 0
    gradient_checkpointing: bool = False
    subset: float | None = None
    every: int | None = None

    @classmethod
    def of(cls, s: Any) -> HealConfig:
        """The configuration a (checked) ``heal`` statement asks for."""
        terms = (s.mse, s.kl, s.task)
        given = any(t is not None for t in terms)
        weight = lambda t: t.magnitude if t is not None else 0.0  # noqa: E731
        return cls(
            steps=s.steps.value,
            lr=s.lr.magnitude if s.lr is not None else DEFAULT_LR,
            batch=s.batch.value if s.batch is not None else DEFAULT_BATCH,
            max_length=s.max_length.value if s.max_length is not None else DEFAULT_MAX_LENGTH,
            field=s.field.value if s.field is not None else DEFAULT_FIELD,
            accumulate=s.accumulate.value if s.accumulate is not None else 1,
            warmup=s.warmup.value if s.warmup is not None else 0,
            clip=s.clip.magnitude if s.clip is not None else GRAD_CLIP,
            mse=weight(s.mse) if given else 1.0,
            kl=weight(s.kl),
            temperature=s.temperature.magnitude if s.temperature is not None else 1.0,
            task=weight(s.task),
            eval_every=s.eval_every.value if s.eval_every is not None else None,
            checkpoint_every=s.checkpoint_every.value if s.checkpoint_every is not None else None,
            keep_best=s.keep_best is not None,
            stop_early=s.stop_early is not None,
            seed=s.seed.value if s.seed is not None else 0,
            gradient_checkpointing=s.gradient_checkpointing is not None,
            subset=s.subset.magnitude if s.subset is not None else None,
            every=s.every.value if s.every is not None else None,
        )
