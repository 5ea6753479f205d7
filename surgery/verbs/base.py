"""What a verb module declares (:class:`Verb`), and the helpers its checks and formatting use.

A verb module (``surgery/verbs/<verb>.py``) holds its statement's AST node, its range rules and
cross-field checks (``check(c, stmt)`` over a :class:`Checker`), its canonical text
(``format(stmt)``), the one list of what this build implements of it (:class:`VerbSupport`)
and, for a verb that changes the model, the name of its pass. ``surgery.verbs.VERBS`` lists
them; the parser's builder, the checker, the formatter, the pass table and the support table
are all generated from that one tuple.

>>> from surgery.verbs import BY_KEYWORD
>>> v = BY_KEYWORD["group"]
>>> v.keyword, v.node.__name__, v.pass_path, sorted(v.support.options)
('group', 'Group', 'surgery.passes.group:GroupPass', ['kv', 'q'])
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from surgery import nodes
from surgery.diagnostics import Diagnostic, clip, nearest

__all__ = [
    "COUNT_LIMITS",
    "Checker",
    "Support",
    "Verb",
    "VerbSupport",
    "format_number",
    "format_rank",
    "format_selector",
    "format_string",
]


class VerbSupport(NamedTuple):
    """What this build implements of one verb.

    ``options[option]`` is the set of implemented values of that option (names, rank kinds),
    or None when every valid value is implemented; an option missing from the map is not
    implemented. ``types`` are the module types a verb's selector may name (empty: any).
    """

    options: dict[str, set[str] | None]
    types: tuple[str, ...] = ()


def _one_member(statement: Any) -> int:
    return 1


@dataclass(frozen=True)
class Verb:
    """One verb of the language, as its module declares it."""

    keyword: str  # the statement's first word, and its AST node's `verb`
    node: type[nodes.StatementNode]
    # The node's fields filled by the grammar rule's children in order (the rest are options,
    # which the grammar builds as `opt_<field>`); a missing trailing child leaves a field None.
    positional: tuple[str, ...]
    check: Callable[[Checker, Any], None]
    format: Callable[[Any], str]
    support: VerbSupport
    # What the language allows where a NAME stands (the grammar accepts any name there).
    language: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # `module:Class` of the pass that carries the verb out; None when the manager does.
    pass_path: str | None = None
    # How many models the statement builds (a progressive family: one per step).
    members: Callable[[Any], int] = _one_member


# The largest value of each count that costs memory or time per unit at run time. Without a
# bound a typo (an extra zero, or six) passes `check` and then fails after the model is loaded:
# out of memory, or hours later. Each limit is far above what a real recipe uses; the help of
# the diagnostic states it and why. Counts bounded at run time by the model itself (blocks to
# drop or keep, heads to group, an absolute rank, which is capped at the full rank) are not here.
COUNT_LIMITS: dict[str, tuple[int, str]] = {
    "trials": (100_000, "tuning trials per task; a few thousand tune a model well"),
    "samples": (100_000, "every calibration sample is held in memory"),
    "batch": (4_096, "a batch runs through the model at once; use more samples instead"),
    "progressive": (64, "each step is a copy of the model, kept and saved as `OUT/step-k`"),
    "heal steps": (1_000_000, "each step trains on a calibration batch and is logged"),
    "basis": (65_536, "each layer gets a dense basis of this many vectors"),
}


class Support:
    """What this build of surgery implements: verbs, and per verb the options and values.

    ``options[verb][option]`` is the set of implemented values of that option (names, rank
    kinds) or None when every valid value is implemented. An option missing from the map is
    not implemented.
    """

    def __init__(self) -> None:
        self.options: dict[str, dict[str, set[str] | None]] = {}
        self.types: dict[str, set[str]] = {}

    def add(
        self, verb: str, options: dict[str, set[str] | None], types: Iterable[str] = ()
    ) -> None:
        self.options[verb] = dict(options)
        self.types[verb] = set(types)


# --- canonical text ---------------------------------------------------------------------


def format_number(number: nodes.Number) -> str:
    """A number as ``surgery fmt`` writes it: shortest exact text plus its unit."""
    return _num(number.value) + number.unit


def _num(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    text = repr(value)
    if "e" in text:  # `1e-05` → `1e-5`
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def format_string(s: nodes.Str) -> str:
    return '"' + s.value.replace("\\", "\\\\").replace('"', '\\"') + '"'


_PRECEDENCE = {"or": 1, "and": 2, "not": 3, "compare": 4, "match": 4}


def _pred(p: nodes.Predicate, parent: int = 0) -> str:
    if isinstance(p, nodes.Compare):
        text = f"{p.field.value} {p.op} {format_number(p.value)}"
    elif isinstance(p, nodes.Match):
        text = f"name ~ {format_string(p.pattern)}"
    elif isinstance(p, nodes.Not):
        text = "not " + _pred(p.item, _PRECEDENCE["not"])
    elif isinstance(p, nodes.And):
        text = " and ".join(_pred(i, _PRECEDENCE["and"]) for i in p.items)
    else:
        text = " or ".join(_pred(i, _PRECEDENCE["or"]) for i in p.items)
    # Nested and/or of the same kind would flatten on re-parse, so always bracket them.
    if _PRECEDENCE[p.kind] < parent or (p.kind in ("and", "or") and parent == _PRECEDENCE[p.kind]):
        return f"({text})"
    return text


def format_selector(s: nodes.Selector) -> str:
    parts = []
    if s.type is not None:
        parts.append(s.type.value)
    if s.where is not None:
        parts.append("where " + _pred(s.where))
    return " ".join(parts)


def format_rank(r: nodes.Rank) -> str:
    if r.kind == "energy":
        return f"rank = energy {format_number(r.value)}"
    if r.kind == "absolute":
        # Always digits: `_num` writes 1e15 and above with an exponent, which reads back as a
        # fraction (an absolute rank is exactly "an integer without point, exponent or unit").
        return f"rank = {int(r.value.value)}"
    text = format_number(r.value)
    if r.value.unit == "" and re.fullmatch(r"-?[0-9]+", text):
        text += ".0"  # keep it a fraction: `rank = 1` would be the absolute rank 1
    return f"rank = {text}"


# --- checks -----------------------------------------------------------------------------


class Checker:
    """Collects the diagnostics of one recipe; the range rules verbs' checks are made of."""

    def __init__(self, table: Support, language: dict[str, dict[str, tuple[str, ...]]]) -> None:
        self.table = table
        self.language = language
        self.diags: list[Diagnostic] = []

    def error(
        self, code: str, message: str, node: nodes.Node | None, help: str | None = None
    ) -> None:
        span = node.span if node else None
        self.diags.append(Diagnostic(code=code, message=message, span=span, help=help))

    def name_in(
        self, node: nodes.Name | None, valid: Iterable[str], what: str, where: str | None = None
    ) -> bool:
        """Report ``node`` (a `what` [for `where`]) unless it is one of ``valid``."""
        if node is None:
            return True
        valid = tuple(valid)
        if node.value in valid:
            return True
        guess = nearest(node.value, valid)
        listed = ", ".join(f"`{v}`" for v in valid)
        context = f" for `{where}`" if where else ""
        self.error(
            "S0201",
            f"unknown {what} `{clip(node.value)}`{context}",
            node,
            f"did you mean `{guess}`?" if guess else f"expected one of {listed}",
        )
        return False

    def index(self, node: nodes.Int | None, what: str) -> None:
        if node is not None and node.value < 0:
            self.error(
                "S0203",
                f"{what} must be 0 or more, found {node.value}",
                node,
                "blocks are numbered from 0",
            )

    def positive(self, node: nodes.Int | None, what: str, help: str | None = None) -> None:
        if node is not None and node.value <= 0:
            self.error(
                "S0203", f"{what} must be a positive integer, found {node.value}", node, help
            )

    def count(self, node: nodes.Int | None, what: str, limit: str) -> None:
        """A positive count of at most ``COUNT_LIMITS[limit]``."""
        self.positive(node, what)
        most, why = COUNT_LIMITS[limit]
        if node is not None and node.value > most:
            self.error(
                "S0203",
                f"{what} must be at most {most:,}, found {node.value:,}",
                node,
                f"the limit is {most:,}: {why}",
            )

    def fraction(
        self,
        node: nodes.Number | None,
        what: str,
        *,
        allow_zero: bool = False,
        allow_one: bool = True,
    ) -> None:
        if node is None:
            return
        if node.unit in ("K", "M", "G"):
            self.error(
                "S0203",
                f"{what} takes a fraction or a percentage, found `{format_number(node)}`",
                node,
                "write e.g. `0.5` or `50%`",
            )
            return
        v = node.magnitude
        low_ok = v >= 0 if allow_zero else v > 0
        high_ok = v <= 1 if allow_one else v < 1
        if not (low_ok and high_ok):
            lo = "[0" if allow_zero else "(0"
            hi = "1]" if allow_one else "1)"
            pct = "100%]" if allow_one else "100%)"
            self.error(
                "S0203",
                f"{what} must be in {lo}, {hi}, found `{format_number(node)}`",
                node,
                f"write a fraction in {lo}, {hi} or a percentage in {lo[0]}0%, {pct}",
            )

    def implemented(self, verb: str, stmt: nodes.Node) -> bool:
        if verb not in self.table.options:
            self.error(
                "S0209",
                f"`{verb}` is not implemented yet",
                stmt,
                "remove the statement; this version of surgery cannot carry it out",
            )
            return False
        return True

    def option_implemented(
        self,
        verb: str,
        option: str,
        node: nodes.Node | None,
        value: str | None = None,
        shown: str | None = None,
    ) -> None:
        """Report ``option`` (written as ``shown``) if this build does not implement it."""
        if node is None or verb not in self.table.options:
            return
        options = self.table.options[verb]
        label = shown or option
        what = f"`{label}`" if label.startswith(verb) else f"`{label}` in `{verb}`"
        if option not in options:
            self.error("S0209", f"{what} is not implemented yet", node, f"remove `{label}`")
            return
        allowed = options[option]
        if allowed is not None and value is not None and value not in allowed:
            choices = ", ".join(f"`{a}`" for a in sorted(allowed))
            self.error("S0209", f"{what} is not implemented yet", node, f"implemented: {choices}")

    def selector(self, verb: str, sel: nodes.Selector) -> None:
        valid = self.language.get(verb, {}).get("type", ())
        if sel.type is not None and self.name_in(sel.type, valid, "module type", verb):
            implemented = self.table.types.get(verb)
            if (
                implemented is not None
                and verb in self.table.options
                and sel.type.value not in implemented
            ):
                choices = ", ".join(f"`{t}`" for t in sorted(implemented))
                self.error(
                    "S0209",
                    f"`{verb} {sel.type.value}` is not implemented yet",
                    sel.type,
                    f"implemented types: {choices}",
                )
        if sel.where is not None:
            self.predicate(verb, sel.where)

    def predicate(self, verb: str, p: nodes.Predicate) -> None:
        if isinstance(p, nodes.And | nodes.Or):
            for item in p.items:
                self.predicate(verb, item)
        elif isinstance(p, nodes.Not):
            self.predicate(verb, p.item)
        elif isinstance(p, nodes.Match):
            if not p.pattern.value:
                self.error(
                    "S0203", "empty name pattern", p.pattern, 'use e.g. `name ~ "encoder.*"`'
                )
        else:
            if p.field.value == "speedup":
                self.option_implemented(verb, "where speedup", p.field, shown="where speedup")
            if p.value.unit == "%":
                self.error(
                    "S0203",
                    f"`{p.field.value}` is a count, not a percentage",
                    p.value,
                    "compare with a number such as `1M` or `3`",
                )

    def rank(self, r: nodes.Rank) -> None:
        v = r.value.magnitude
        if r.kind == "absolute":
            if v <= 0:
                self.error(
                    "S0203",
                    f"rank must be positive, found {int(v)}",
                    r.value,
                    "write an absolute rank like `128` or a fraction like `0.25`",
                )
        elif r.kind == "energy":
            self.fraction(r.value, "an energy threshold")
        elif r.value.unit in ("K", "M", "G") or not 0 < v <= 1:
            self.error(
                "S0203",
                f"a rank fraction must be in (0, 1], found `{format_number(r.value)}`",
                r.value,
                "write a fraction like `0.25` or `25%`, or an integer for an absolute rank",
            )
