"""``expect METRIC [FUNCTION] OP VALUE [k N] [on BACKEND | on "DATA"]``: a contract on the result.

Counted on the model: ``params``, ``flops`` (``50%`` is relative to the original). Timed on a
backend: ``speedup`` (``on onnx``). Measured on data -- the calibration data, or held-out data
the recipe names with ``on "FILE"`` (``.txt``, ``.jsonl``, ``.pt``, ``.safetensors``, relative
to the recipe): ``drift``, ``perplexity`` (decoders), ``accuracy`` (labelled data),
``agreement`` (share of unchanged top-1 predictions), ``similarity`` (mean cosine of pooled
embeddings), ``neighbours`` (overlap of each item's ``k`` nearest neighbours, ``k 10`` unless
given) and ``metric "module:function"`` (a user function ``(model, batch) -> float``).
``perplexity``, ``accuracy`` and a user metric also take a ratio to the original model's own
value: ``expect perplexity <= 1.10x``. :mod:`surgery.quality` measures them.

>>> from surgery.parse import parse
>>> format(parse("expect speedup>=1.5 on onnx").statements[0])
'expect speedup >= 1.5 on onnx'
>>> format(parse('expect neighbours >= 0.8 on "held.txt" k 5').statements[0])
'expect neighbours >= 0.8 k 5 on "held.txt"'
>>> format(parse('expect perplexity <= 1.10x').statements[0])
'expect perplexity <= 1.1x'
"""

from __future__ import annotations

import re
from typing import Literal

from surgery.nodes import Int, Name, Number, StatementNode, Str
from surgery.targets import BACKENDS, EXPECT_ON
from surgery.verbs.base import Checker, Verb, VerbSupport, format_number, format_string

__all__ = [
    "DATA_METRICS",
    "DEFAULT_K",
    "METRICS",
    "QUALITY_METRICS",
    "RATIO_METRICS",
    "VERB",
    "Expect",
]

#: Every metric a contract may name, in the order the language lists them.
METRICS = (
    "params",
    "flops",
    "drift",
    "speedup",
    "perplexity",
    "accuracy",
    "agreement",
    "similarity",
    "neighbours",
    "metric",
)
#: Metrics measured by running both models on data (:mod:`surgery.quality`).
QUALITY_METRICS = frozenset(
    {"perplexity", "accuracy", "agreement", "similarity", "neighbours", "metric"}
)
#: Metrics that may name their data with ``on "FILE"``.
DATA_METRICS = QUALITY_METRICS | {"drift"}
#: Metrics that also have a ratio to the original model's own value (``1.10x``).
RATIO_METRICS = frozenset({"perplexity", "accuracy", "metric"})
#: Neighbours per item of ``expect neighbours`` without ``k``.
DEFAULT_K = 10

_SHARES = {"accuracy", "agreement", "neighbours"}  # in [0, 1]
_FILE_TYPES = (".txt", ".jsonl", ".pt", ".pth", ".safetensors")
_FUNCTION = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


class Expect(StatementNode):
    """``expect METRIC [FUNCTION] OP VALUE [k N] [on BACKEND | on "DATA"]``: a contract."""

    verb: Literal["expect"] = "expect"
    metric: Name
    op: Literal[">", ">=", "<", "<=", "==", "!="]
    value: Number
    on: Name | None = None  # the backend of `expect speedup`
    data: Str | None = None  # held-out data of a metric measured on data
    k: Int | None = None  # neighbours per item of `expect neighbours`
    function: Str | None = None  # `module:function` of `expect metric`


def _never(op: str, v: float, low: float | None, high: float | None) -> bool:
    """Whether ``x OP v`` can never hold for any x in ``[low, high]`` (None: unbounded)."""
    if low is not None and ((op == "<" and v <= low) or (op in ("<=", "==") and v < low)):
        return True
    return high is not None and ((op == ">" and v >= high) or (op in (">=", "==") and v > high))


def _bounds(metric: str, ratio: bool) -> tuple[float | None, float | None, str]:
    """The range a metric's value lies in, and why (for "can never hold")."""
    if ratio:
        return 0.0, None, "a ratio to the original is never negative"
    if metric == "perplexity":
        return 1.0, None, "a perplexity is at least 1"
    if metric in _SHARES:
        return 0.0, 1.0, f"`{metric}` is a share between 0 and 1"
    if metric == "similarity":
        return -1.0, 1.0, "a cosine similarity lies between -1 and 1"
    if metric == "metric":
        return None, None, ""
    return 0.0, None, f"`{metric}` is never negative"


def _check_value(c: Checker, s: Expect, metric: str) -> None:
    value, unit = s.value, s.value.unit
    ratio = unit == "x"
    if ratio and metric not in RATIO_METRICS:
        hint = {
            "params": "write a share of the original, e.g. `90%`",
            "flops": "write a share of the original, e.g. `90%`",
            "speedup": "a speedup is already a ratio to the original: write e.g. `1.5`",
        }.get(metric, f"`{metric}` already compares with the original: write e.g. `0.95`")
        c.error("S0203", f"`expect {metric}` has no ratio to the original", value, hint)
        return
    if unit in ("K", "M", "G") and metric not in ("params", "flops", "metric"):
        if metric == "drift":
            c.error(
                "S0203",
                "drift is a relative error, not a count",
                value,
                "write e.g. `0.05` or `5%`",
            )
        else:
            hint = "`1.10x` for a ratio to the original" if metric == "perplexity" else "`0.9`"
            c.error("S0203", f"`{metric}` is not a count", value, f"write e.g. {hint}")
        return
    if unit == "%" and metric == "perplexity":
        c.error(
            "S0203",
            "a perplexity is not a percentage",
            value,
            "write a perplexity such as `25`, or a ratio to the original such as `1.10x`",
        )
        return
    v = value.magnitude
    if metric == "speedup":  # always positive
        never, why = s.op in ("<", "<=", "==") and v <= 0, "a speedup is always positive"
    else:
        low, high, why = _bounds(metric, ratio)
        never = _never(s.op, v, low, high)
    if never:
        c.error("S0208", f"contract `{format(s)}` can never hold", s, why)


def _check_where(c: Checker, s: Expect, metric: str) -> None:
    """``on BACKEND`` / ``on "DATA"``, ``k`` and the function, each with its own metric."""
    if s.on is not None:
        name = s.on.value
        if metric in DATA_METRICS:
            help = (
                f"`{metric}` is measured on data, not on a backend: name a file, "
                '`on "held-out.jsonl"`, or leave `on` out for the calibration data'
                if name in BACKENDS
                else f'to measure `{metric}` on a file, quote its name: `on "{name}"`'
            )
            c.error("S0204", f"`on {name}` only applies to `expect speedup`", s.on, help)
        else:
            c.name_in(s.on, BACKENDS, "backend")
            if metric != "speedup":
                c.error("S0204", f"`on {name}` only applies to `expect speedup`", s.on)
    if s.data is not None:
        if metric == "speedup":
            c.error(
                "S0204",
                "`expect speedup` is timed on a backend, not on a file",
                s.data,
                "write a backend (`on onnx`); speed is timed on the calibration data",
            )
        elif metric not in DATA_METRICS:
            c.error(
                "S0204",
                f"`{metric}` is counted on the model, not measured on data",
                s.data,
                f"remove `on {format_string(s.data)}`",
            )
        elif not s.data.value.strip():
            c.error("S0203", "empty file name", s.data, 'write e.g. `on "held-out.jsonl"`')
        elif not s.data.value.lower().endswith(_FILE_TYPES):
            c.error(
                "S0203",
                f"`{s.data.value}` is not a data file surgery reads",
                s.data,
                'use `.txt` (one text per line), `.jsonl` (objects with a "text" field, and '
                '"label" for accuracy) or `.pt`/`.safetensors` tensors',
            )
    if s.k is not None:
        if metric != "neighbours":
            c.error("S0204", "`k` only applies to `expect neighbours`", s.k, "remove `k`")
        else:
            c.positive(s.k, "`k` (neighbours per item)")
    if metric == "metric":
        if s.function is None:
            c.error(
                "S0204",
                "`expect metric` needs the function it calls",
                s.metric,
                'write e.g. `expect metric "mypkg.quality:score" >= 0.9` (a function taking '
                "the model and a batch and returning a float)",
            )
        elif not _FUNCTION.fullmatch(s.function.value):
            c.error(
                "S0203",
                f"`{s.function.value}` is not of the form `module:function`",
                s.function,
                'e.g. `"mypkg.quality:score"`: an importable module, a colon, a function name',
            )
    elif s.function is not None:
        c.error(
            "S0204",
            f"a function only goes with `expect metric`, not `expect {metric}`",
            s.function,
            f"write `expect metric {format_string(s.function)} ...`, or remove the string",
        )


def check(c: Checker, s: Expect) -> None:
    metric = s.metric.value
    _check_value(c, s, metric)
    _check_where(c, s, metric)
    if c.implemented("expect", s):
        c.option_implemented("expect", "metric", s.metric, metric, f"expect {metric}")
        if s.on is not None and metric not in DATA_METRICS:
            c.option_implemented("expect", "on", s.on, s.on.value, f"on {s.on.value}")


def format(s: Expect) -> str:
    out = ["expect", s.metric.value]
    if s.function is not None:
        out.append(format_string(s.function))
    out += [s.op, format_number(s.value)]
    if s.k is not None:
        out.append(f"k {s.k.value}")
    if s.on is not None:
        out.append(f"on {s.on.value}")
    if s.data is not None:
        out.append(f"on {format_string(s.data)}")
    return " ".join(out)


VERB = Verb(
    keyword="expect",
    node=Expect,
    positional=("metric", "op", "value"),
    check=check,
    format=format,
    support=VerbSupport(
        {
            "metric": set(METRICS),
            "on": set(EXPECT_ON),
            "data": None,
            "k": None,
            "function": None,
        }
    ),
)
