"""``calibrate with "calib.pt" [samples 128] [batch 8]``: the data passes and healing see.

The source, relative to the recipe, is a tensor file (``.pt``/``.safetensors``), text
(``.txt``/``.jsonl``), audio (``.wav``/``.flac``/``.ogg``) or a folder of images or audio clips;
``surgery.inputs.calibration_inputs`` turns it into what the model takes.

>>> from surgery.parse import parse
>>> format(parse('calibrate  with "c.jsonl" batch 4').statements[0])
'calibrate with "c.jsonl" batch 4'
"""

from __future__ import annotations

from typing import Literal

from surgery.nodes import Int, StatementNode, Str
from surgery.verbs.base import Checker, Verb, VerbSupport, format_string

__all__ = ["VERB", "Calibrate"]


class Calibrate(StatementNode):
    """``calibrate with "calib.pt" [samples 128] [batch 8]``."""

    verb: Literal["calibrate"] = "calibrate"
    source: Str
    samples: Int | None = None
    batch: Int | None = None


def check(c: Checker, s: Calibrate) -> None:
    if not s.source.value:
        c.error("S0203", "empty calibration file name", s.source)
    c.count(s.samples, "`samples`", "samples")
    c.count(s.batch, "`batch`", "batch")
    if c.implemented("calibrate", s):
        c.option_implemented("calibrate", "samples", s.samples)
        c.option_implemented("calibrate", "batch", s.batch)


def format(s: Calibrate) -> str:
    out = ["calibrate with", format_string(s.source)]
    if s.samples:
        out.append(f"samples {s.samples.value}")
    if s.batch:
        out.append(f"batch {s.batch.value}")
    return " ".join(out)


VERB = Verb(
    keyword="calibrate",
    node=Calibrate,
    positional=("source",),
    check=check,
    format=format,
    support=VerbSupport({"samples": None, "batch": None}),
)
