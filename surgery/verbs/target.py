"""``target tvm llvm [trials 64]``: where the result is lowered, checked and timed.

>>> from surgery.parse import parse
>>> format(parse("target   tvm llvm trials 64").statements[0])
'target tvm llvm trials 64'
"""

from __future__ import annotations

from typing import Literal

from surgery.nodes import Int, Name, StatementNode
from surgery.targets import BACKENDS, TARGET_SUPPORT
from surgery.verbs.base import Checker, Verb, VerbSupport

__all__ = ["VERB", "Target"]


class Target(StatementNode):
    """``target tvm llvm [trials 64]``: where to lower and measure."""

    verb: Literal["target"] = "target"
    backend: Name
    device: Name | None = None
    trials: Int | None = None


def check(c: Checker, s: Target) -> None:
    if c.name_in(s.backend, BACKENDS, "backend") and s.device is not None:
        c.name_in(s.device, BACKENDS[s.backend.value], "device", s.backend.value)
    c.count(s.trials, "`trials`", "trials")
    if c.implemented("target", s):
        c.option_implemented(
            "target", "backend", s.backend, s.backend.value, f"target {s.backend.value}"
        )
        if s.device is not None:
            pair = f"{s.backend.value} {s.device.value}"
            c.option_implemented("target", "device", s.device, pair, f"target {pair}")
        c.option_implemented("target", "trials", s.trials)


def format(s: Target) -> str:
    out = ["target", s.backend.value]
    if s.device:
        out.append(s.device.value)
    if s.trials:
        out.append(f"trials {s.trials.value}")
    return " ".join(out)


VERB = Verb(
    keyword="target",
    node=Target,
    positional=("backend", "device"),
    check=check,
    format=format,
    # What the code implements, not what this machine has (an unavailable device is skipped
    # with a reason at run time).
    support=VerbSupport(dict(TARGET_SUPPORT)),
)
