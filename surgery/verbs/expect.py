"""``expect params|flops|drift|speedup OP VALUE [on BACKEND]``: a contract on the result.

>>> from surgery.parse import parse
>>> format(parse("expect speedup>=1.5 on onnx").statements[0])
'expect speedup >= 1.5 on onnx'
"""

from __future__ import annotations

from typing import Literal

from surgery.nodes import Name, Number, StatementNode
from surgery.targets import BACKENDS, EXPECT_ON
from surgery.verbs.base import Checker, Verb, VerbSupport, format_number

__all__ = ["VERB", "Expect"]


class Expect(StatementNode):
    """``expect params|flops|drift|speedup OP VALUE [on BACKEND]``: a contract on the result."""

    verb: Literal["expect"] = "expect"
    metric: Name
    op: Literal[">", ">=", "<", "<=", "==", "!="]
    value: Number
    on: Name | None = None


def check(c: Checker, s: Expect) -> None:
    metric = s.metric.value
    v = s.value.magnitude
    if metric == "speedup":  # always positive
        never = s.op in ("<", "<=", "==") and v <= 0
    else:  # params, flops and drift are never negative
        never = (s.op == "<" and v <= 0) or (s.op in ("<=", "==") and v < 0)
    if metric == "drift" and s.value.unit in ("K", "M", "G"):
        c.error(
            "S0203",
            "drift is a relative error, not a count",
            s.value,
            "write e.g. `0.05` or `5%`",
        )
    if never:
        c.error(
            "S0208",
            f"contract `{format(s)}` can never hold",
            s,
            f"`{metric}` is never negative"
            if metric != "speedup"
            else "a speedup is always positive",
        )
    if s.on is not None:
        c.name_in(s.on, BACKENDS, "backend")
        if metric != "speedup":
            c.error("S0204", f"`on {s.on.value}` only applies to `expect speedup`", s.on)
    if c.implemented("expect", s):
        c.option_implemented("expect", "metric", s.metric, metric, f"expect {metric}")
        if s.on is not None:
            c.option_implemented("expect", "on", s.on, s.on.value, f"on {s.on.value}")


def format(s: Expect) -> str:
    out = ["expect", s.metric.value, s.op, format_number(s.value)]
    if s.on:
        out.append(f"on {s.on.value}")
    return " ".join(out)


VERB = Verb(
    keyword="expect",
    node=Expect,
    positional=("metric", "op", "value"),
    check=check,
    format=format,
    support=VerbSupport({"metric": {"params", "flops", "drift", "speedup"}, "on": set(EXPECT_ON)}),
)
