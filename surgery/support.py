"""What this build implements: per verb, its implemented options (and values) and types.

A leaf module (no torch), so ``surgery check`` knows what is implemented without importing a
pass. The passes, the manager and the heal loop read their entries from here: one home.
``options[option]`` is the set of implemented values of that option (names, rank kinds), or
None when every valid value is implemented; an option missing from the map is not
implemented. ``types`` are the module types a verb's selector may name (empty: any).

>>> sorted(SUPPORT["sparsify"].options), SUPPORT["sparsify"].types
(['m', 'n'], ('Linear',))
"""

from __future__ import annotations

from typing import NamedTuple

from surgery.targets import EXPECT_ON, TARGET_SUPPORT

__all__ = ["PASS_VERBS", "RUN_VERBS", "SUPPORT", "VerbSupport"]


class VerbSupport(NamedTuple):
    options: dict[str, set[str] | None]
    types: tuple[str, ...] = ()


_RANKS = {"fraction", "absolute", "energy"}

# Verbs carried out by a pass (`surgery.passes.PASSES` has exactly these).
PASS_VERBS: dict[str, VerbSupport] = {
    "decompose": VerbSupport(
        {
            "rank": set(_RANKS),
            "method": {"svd", "asvd", "svd-llm", "tucker"},
            "round": None,
            "progressive": None,
            "budget": None,
            "budget by": {"sensitivity"},
            "keep_if_faster": None,
            "where speedup": None,
        },
        ("Linear", "Conv1D", "Conv2d"),
    ),
    "group": VerbSupport({"q": None, "kv": None}),
    "skip": VerbSupport({"ratio": None, "after": None, "until": None}),
    "drop": VerbSupport({"sublayer": {"attention", "mlp"}, "by": {"similarity"}}),
    "truncate": VerbSupport(
        {"keep": None, "strategy": {"uniform", "pseudo-uniform"}, "indices": None}
    ),
    "split": VerbSupport(
        {"mode": {"exact", "(2+1)d"}, "combine": {"add", "cat"}, "rank": set(_RANKS)},
        ("Conv3d",),
    ),
    "sparsify": VerbSupport({"n": None, "m": None}, ("Linear",)),
    "factorize": VerbSupport(
        {"method": {"dense-sparse"}, "basis": None, "nonzeros": None}, ("Linear",)
    ),
}

# Verbs the manager (and its heal loop) carries out itself.
RUN_VERBS: dict[str, VerbSupport] = {
    "calibrate": VerbSupport({"samples": None, "batch": None}),
    "target": VerbSupport(dict(TARGET_SUPPORT)),
    "expect": VerbSupport(
        {"metric": {"params", "flops", "drift", "speedup"}, "on": set(EXPECT_ON)}
    ),
    "regularize": VerbSupport({"every": None}),
    "heal": VerbSupport(
        {"lr": None, "distill": None, "subset": None, "by": {"importance"}, "every": None}
    ),
    "freeze": VerbSupport({"what": {"first-factor", "core", "alternate"}}),
}

SUPPORT: dict[str, VerbSupport] = {**PASS_VERBS, **RUN_VERBS}
