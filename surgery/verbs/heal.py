"""``heal steps N [on "DATA" …] [eval …] [lr X] [loss …] …``: fine-tune the surgered model.

Without ``on``, healing distils on the calibration batches (as it always did); with it, on a
training set of its own (text, JSONL, CSV or Parquet files or folders, or a Hugging Face
``save_to_disk`` folder), tokenised with the model's tokenizer::

    heal steps 2000 on "corpus/" field "text" max length 128 batch 32 eval 5%
         eval every 200 steps lr 2e-4 warmup 100 steps accumulate 2 clip 1
         loss mse 1 kl 0.5 temperature 2 task 0.1 checkpoint every 500 steps keep best
         stop early seed 7 gradient checkpointing

>>> from surgery.parse import parse
>>> format(parse("heal steps 200 distill from original lr 1e-4").statements[0])
'heal steps 200 lr 0.0001 distill from original'
>>> text = 'heal steps 9 seed 3 loss task 0.5 kl 1 temperature 2 on "d.txt" eval 10% batch 4'
>>> format(parse(text).statements[0])
'heal steps 9 on "d.txt" batch 4 eval 10% loss kl 1 temperature 2 task 0.5 seed 3'
"""

from __future__ import annotations

from typing import Literal

from surgery.nodes import Flag, Int, Name, Number, StatementNode, Str
from surgery.verbs.base import Checker, Verb, VerbSupport, format_number, format_string

__all__ = ["VERB", "Heal"]

LANGUAGE: dict[str, tuple[str, ...]] = {"by": ("importance",)}

# Options that describe the training data named by `on` (meaningless without it).
_DATA_OPTIONS = ("field", "label", "max_length", "batch", "eval_split")
# Options that need a held-out split (`eval on "…"` or `eval P`).
_EVAL_OPTIONS = ("eval_every", "keep_best", "stop_early")
_SHOWN = {
    "field": "field",
    "label": "label",
    "max_length": "max length",
    "batch": "batch",
    "eval_split": "eval P",
    "eval_every": "eval every",
    "keep_best": "keep best",
    "stop_early": "stop early",
}
#: Every option of `heal`, in canonical order (the support table and the checks read it).
OPTIONS = (
    "on",
    "field",
    "label",
    "max_length",
    "batch",
    "eval_on",
    "eval_split",
    "eval_every",
    "lr",
    "warmup",
    "accumulate",
    "clip",
    "loss",
    "mse",
    "kl",
    "temperature",
    "task",
    "distill",
    "subset",
    "by",
    "every",
    "checkpoint_every",
    "keep_best",
    "stop_early",
    "seed",
    "gradient_checkpointing",
)
#: Longest sequence `max length` may ask for (tokens).
MAX_LENGTH_LIMIT = 65_536
#: Most micro-batches one optimizer step may accumulate.
ACCUMULATE_LIMIT = 1_024


class Heal(StatementNode):
    """``heal steps N`` and its options (see the module docstring)."""

    verb: Literal["heal"] = "heal"
    steps: Int
    lr: Number | None = None
    distill: Flag | None = None
    subset: Number | None = None
    by: Name | None = None
    every: Int | None = None
    on: Str | None = None
    field: Str | None = None
    label: Str | None = None
    max_length: Int | None = None
    batch: Int | None = None
    eval_on: Str | None = None
    eval_split: Number | None = None
    eval_every: Int | None = None
    warmup: Int | None = None
    accumulate: Int | None = None
    clip: Number | None = None
    loss: Flag | None = None
    mse: Number | None = None
    kl: Number | None = None
    temperature: Number | None = None
    task: Number | None = None
    checkpoint_every: Int | None = None
    keep_best: Flag | None = None
    stop_early: Flag | None = None
    seed: Int | None = None
    gradient_checkpointing: Flag | None = None


def _path(c: Checker, node: Str | None, what: str) -> None:
    if node is not None and not node.value.strip():
        c.error("S0203", f"empty {what}", node, 'write a file or folder, e.g. `"data/train.txt"`')


def _weight(c: Checker, node: Number | None, what: str) -> None:
    if node is None:
        return
    if node.unit in ("K", "M", "G") or node.magnitude < 0:
        c.error(
            "S0203",
            f"the weight of {what} must be 0 or more, found `{format_number(node)}`",
            node,
            "write e.g. `1` or `0.5`",
        )


def _positive_number(c: Checker, node: Number | None, what: str, example: str) -> None:
    if node is not None and (node.unit in ("K", "M", "G", "%") or node.magnitude <= 0):
        c.error(
            "S0203",
            f"{what} must be a positive number, found `{format_number(node)}`",
            node,
            f"write e.g. `{example}`",
        )


def check(c: Checker, s: Heal) -> None:
    ok = c.implemented("heal", s)
    c.count(s.steps, "`steps`", "heal steps")
    if s.lr is not None and s.lr.magnitude <= 0:
        c.error("S0203", "learning rate must be positive", s.lr)
    c.fraction(s.subset, "`subset`")
    c.name_in(s.by, LANGUAGE["by"], "data-selection score")
    c.positive(s.every, "`every`")
    _path(c, s.on, "training data path")
    _path(c, s.eval_on, "held-out data path")
    for node, what in ((s.field, "`field`"), (s.label, "`label`")):
        if node is not None and not node.value:
            c.error("S0203", f"empty {what} name", node, 'name a column, e.g. `field "text"`')
    c.positive(s.max_length, "`max length`")
    if s.max_length is not None and s.max_length.value > MAX_LENGTH_LIMIT:
        c.error(
            "S0203",
            f"`max length` must be at most {MAX_LENGTH_LIMIT:,}, found {s.max_length.value:,}",
            s.max_length,
            "longer sequences do not fit in memory; most models take 512 to 8192 tokens",
        )
    c.count(s.batch, "`batch`", "batch")
    c.fraction(s.eval_split, "the held-out share `eval`", allow_one=False)
    c.positive(s.eval_every, "`eval every`")
    if s.warmup is not None and s.warmup.value < 0:
        c.error("S0203", f"`warmup` must be 0 or more, found {s.warmup.value}", s.warmup)
    if s.warmup is not None and s.warmup.value >= s.steps.value > 0:
        c.error(
            "S0204",
            f"`warmup {s.warmup.value} steps` is not shorter than `steps {s.steps.value}`",
            s.warmup,
            "warm up for a small part of the run, e.g. a tenth of its steps",
        )
    c.positive(s.accumulate, "`accumulate`")
    if s.accumulate is not None and s.accumulate.value > ACCUMULATE_LIMIT:
        c.error(
            "S0203",
            f"`accumulate` must be at most {ACCUMULATE_LIMIT:,}, found {s.accumulate.value:,}",
            s.accumulate,
            "a larger `batch` accumulates less",
        )
    _positive_number(c, s.clip, "`clip`", "clip 1")
    _positive_number(c, s.temperature, "`temperature`", "temperature 2")
    _weight(c, s.mse, "`mse`")
    _weight(c, s.kl, "`kl`")
    _weight(c, s.task, "`task`")
    weights = [w for w in (s.mse, s.kl, s.task) if w is not None]
    if s.loss is not None and weights and all(w.magnitude == 0 for w in weights):
        c.error(
            "S0204", "every loss weight is 0: nothing would be trained", s.loss, "give one a weight"
        )
    c.positive(s.checkpoint_every, "`checkpoint every`")
    if s.seed is not None and s.seed.value < 0:
        c.error("S0203", f"`seed` must be 0 or more, found {s.seed.value}", s.seed)
    if s.on is None:
        for option in _DATA_OPTIONS:
            node = getattr(s, option)
            if node is not None:
                c.error(
                    "S0204",
                    f"`{_SHOWN[option]}` describes training data, but `heal` names none",
                    node,
                    'add `on "DATA"` (a file or folder of training text), or remove it',
                )
    if s.eval_on is not None and s.eval_split is not None:
        c.error(
            "S0204",
            "`eval on` and `eval P` both name the held-out data",
            s.eval_split,
            "keep one: a file of its own, or a share of the training data",
        )
    if s.eval_on is None and s.eval_split is None:
        for option in _EVAL_OPTIONS:
            node = getattr(s, option)
            if node is not None:
                c.error(
                    "S0204",
                    f"`{_SHOWN[option]}` needs held-out data",
                    node,
                    'add `eval on "FILE"` or a share of the training data such as `eval 5%`',
                )
    if ok:
        for option in OPTIONS:
            c.option_implemented("heal", option, getattr(s, option), shown=option.replace("_", " "))


def format(s: Heal) -> str:
    out = ["heal steps", str(s.steps.value)]
    if s.on:
        out.append(f"on {format_string(s.on)}")
    if s.field:
        out.append(f"field {format_string(s.field)}")
    if s.label:
        out.append(f"label {format_string(s.label)}")
    if s.max_length:
        out.append(f"max length {s.max_length.value}")
    if s.batch:
        out.append(f"batch {s.batch.value}")
    if s.eval_on:
        out.append(f"eval on {format_string(s.eval_on)}")
    if s.eval_split:
        out.append(f"eval {format_number(s.eval_split)}")
    if s.eval_every:
        out.append(f"eval every {s.eval_every.value} steps")
    if s.lr:
        out.append(f"lr {format_number(s.lr)}")
    if s.warmup:
        out.append(f"warmup {s.warmup.value} steps")
    if s.accumulate:
        out.append(f"accumulate {s.accumulate.value}")
    if s.clip:
        out.append(f"clip {format_number(s.clip)}")
    terms = []
    if s.mse:
        terms.append(f"mse {format_number(s.mse)}")
    if s.kl:
        terms.append(f"kl {format_number(s.kl)}")
        if s.temperature:
            terms.append(f"temperature {format_number(s.temperature)}")
    if s.task:
        terms.append(f"task {format_number(s.task)}")
    if terms:
        out.append("loss " + " ".join(terms))
    if s.distill:
        out.append("distill from original")
    if s.subset:
        out.append(f"subset {format_number(s.subset)}")
        if s.by:
            out.append(f"by {s.by.value}")
    if s.every:
        out.append(f"every {s.every.value} steps")
    if s.checkpoint_every:
        out.append(f"checkpoint every {s.checkpoint_every.value} steps")
    if s.keep_best:
        out.append("keep best")
    if s.stop_early:
        out.append("stop early")
    if s.seed:
        out.append(f"seed {s.seed.value}")
    if s.gradient_checkpointing:
        out.append("gradient checkpointing")
    return " ".join(out)


VERB = Verb(
    keyword="heal",
    node=Heal,
    positional=("steps",),
    check=check,
    format=format,
    support=VerbSupport(
        {option: (set(LANGUAGE["by"]) if option == "by" else None) for option in OPTIONS}
    ),
    language=LANGUAGE,
)
