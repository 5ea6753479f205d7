"""What this build implements: per verb, its implemented options (and values) and types.

Each verb's module declares its own entry (``surgery/verbs/<verb>.py``, ``VERB.support``);
this module gathers them, so ``surgery check`` knows what is implemented without importing a
pass, and the passes, the manager and the heal loop read their entries from here.
``options[option]`` is the set of implemented values of that option (names, rank kinds), or
None when every valid value is implemented; an option missing from the map is not
implemented. ``types`` are the module types a verb's selector may name (empty: any).

>>> sorted(SUPPORT["sparsify"].options), SUPPORT["sparsify"].types
(['m', 'n'], ('Linear', 'Conv1D'))
"""

from __future__ import annotations

from surgery.verbs import VERBS
from surgery.verbs.base import VerbSupport

__all__ = ["PASS_VERBS", "RUN_VERBS", "SUPPORT", "VerbSupport"]

# Verbs carried out by a pass (`surgery.passes.PASSES` has exactly these).
PASS_VERBS: dict[str, VerbSupport] = {v.keyword: v.support for v in VERBS if v.pass_path}

# Verbs the manager (and its heal loop) carries out itself.
RUN_VERBS: dict[str, VerbSupport] = {v.keyword: v.support for v in VERBS if not v.pass_path}

SUPPORT: dict[str, VerbSupport] = {v.keyword: v.support for v in VERBS}
