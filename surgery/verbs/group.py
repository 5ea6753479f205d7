"""``group kv = G`` (GQA/MQA) or ``group q = Gq kv = Gkv`` (GQKVA): fewer attention heads.

>>> from surgery.parse import parse
>>> format(parse("group q=4 kv=2").statements[0])
'group q = 4 kv = 2'
"""

from __future__ import annotations

from typing import Literal

from surgery.nodes import Int, StatementNode
from surgery.verbs.base import Checker, Verb, VerbSupport

__all__ = ["VERB", "Group"]


class Group(StatementNode):
    """``group kv = G`` (GQA/MQA) or ``group q = Gq kv = Gkv`` (GQKVA)."""

    verb: Literal["group"] = "group"
    q: Int | None = None
    kv: Int


def check(c: Checker, s: Group) -> None:
    ok = c.implemented("group", s)
    c.positive(s.kv, "`kv`", "use `kv = 1` for multi-query attention")
    c.positive(s.q, "`q`")
    if ok:
        c.option_implemented("group", "q", s.q)


def format(s: Group) -> str:
    out = ["group"]
    if s.q:
        out.append(f"q = {s.q.value}")
    out.append(f"kv = {s.kv.value}")
    return " ".join(out)


VERB = Verb(
    keyword="group",
    node=Group,
    positional=("kv",),
    check=check,
    format=format,
    support=VerbSupport({"q": None, "kv": None}),
    pass_path="surgery.passes.group:GroupPass",
)
