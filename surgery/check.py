"""Check a parsed recipe without a model: names, value ranges, contradictions, contracts.

Every problem of the recipe is reported in one run, sorted by position. Names get the
nearest valid spelling as help. A statement or option whose implementation does not exist
yet is an error that says so: a recipe never does silently less than it says.

>>> from surgery.parse import parse
>>> [d.message for d in check(parse("decompose Linear rank = 0\\nexpect drift <= -1"))]
['rank must be positive, found 0', 'contract `expect drift <= -1` can never hold']
"""

from __future__ import annotations

from collections.abc import Iterable

from surgery import ast
from surgery.diagnostics import Diagnostic, clip, collector_paused, nearest
from surgery.support import SUPPORT
from surgery.targets import BACKENDS

__all__ = ["BACKENDS", "COUNT_LIMITS", "LANGUAGE", "Support", "check", "support"]

# What the language allows where a NAME stands (the grammar accepts any name there).
LANGUAGE: dict[str, dict[str, tuple[str, ...]]] = {
    "decompose": {
        "type": ("Linear", "Conv1D", "Conv2d"),
        "method": ("svd", "asvd", "svd-llm", "tucker"),
        "budget by": ("sensitivity",),
    },
    "split": {"type": ("Conv3d",), "combine": ("add", "cat")},
    "sparsify": {"type": ("Linear",)},
    "factorize": {"type": ("Linear",), "method": ("dense-sparse",)},
    "regularize": {"method": ("nuclear",)},
    "drop": {"by": ("similarity",)},
    "truncate": {"strategy": ("uniform", "pseudo-uniform")},
    "freeze": {"what": ("first-factor", "core", "alternate")},
    "heal": {"by": ("importance",)},
}

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


def support() -> Support:
    """The support table of this build (`surgery.support`: passes and the manager's verbs)."""
    table = Support()
    for verb, (options, types) in SUPPORT.items():
        table.add(verb, options, types)
    return table


def _err(code: str, message: str, node: ast.Node | None, help: str | None = None) -> Diagnostic:
    return Diagnostic(code=code, message=message, span=node.span if node else None, help=help)


def _num_text(n: ast.Number) -> str:
    from surgery.fmt import format_number

    return format_number(n)


class _Checker:
    def __init__(self, table: Support) -> None:
        self.table = table
        self.diags: list[Diagnostic] = []

    def error(
        self, code: str, message: str, node: ast.Node | None, help: str | None = None
    ) -> None:
        self.diags.append(_err(code, message, node, help))

    # --- helpers ----------------------------------------------------------------------

    def name_in(
        self, node: ast.Name | None, valid: Iterable[str], what: str, where: str | None = None
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

    def index(self, node: ast.Int | None, what: str) -> None:
        if node is not None and node.value < 0:
            self.error(
                "S0203",
                f"{what} must be 0 or more, found {node.value}",
                node,
                "blocks are numbered from 0",
            )

    def positive(self, node: ast.Int | None, what: str, help: str | None = None) -> None:
        if node is not None and node.value <= 0:
            self.error(
                "S0203", f"{what} must be a positive integer, found {node.value}", node, help
            )

    def count(self, node: ast.Int | None, what: str, limit: str) -> None:
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
        node: ast.Number | None,
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
                f"{what} takes a fraction or a percentage, found `{_num_text(node)}`",
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
                f"{what} must be in {lo}, {hi}, found `{_num_text(node)}`",
                node,
                f"write a fraction in {lo}, {hi} or a percentage in {lo[0]}0%, {pct}",
            )

    def implemented(self, verb: str, stmt: ast.Node) -> bool:
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
        node: ast.Node | None,
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

    def selector(self, verb: str, sel: ast.Selector) -> None:
        valid = LANGUAGE.get(verb, {}).get("type", ())
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

    def predicate(self, verb: str, p: ast.Predicate) -> None:
        if isinstance(p, ast.And | ast.Or):
            for item in p.items:
                self.predicate(verb, item)
        elif isinstance(p, ast.Not):
            self.predicate(verb, p.item)
        elif isinstance(p, ast.Match):
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

    # --- statements -------------------------------------------------------------------

    def statement(self, s: ast.Statement) -> None:
        verb = s.verb
        language = LANGUAGE.get(verb, {})
        if isinstance(s, ast.Target):
            if self.name_in(s.backend, BACKENDS, "backend") and s.device is not None:
                self.name_in(s.device, BACKENDS[s.backend.value], "device", s.backend.value)
            self.count(s.trials, "`trials`", "trials")
            if self.implemented(verb, s):
                self.option_implemented(
                    verb, "backend", s.backend, s.backend.value, f"target {s.backend.value}"
                )
                if s.device is not None:
                    pair = f"{s.backend.value} {s.device.value}"
                    self.option_implemented(verb, "device", s.device, pair, f"target {pair}")
                self.option_implemented(verb, "trials", s.trials)
            return
        if isinstance(s, ast.Calibrate):
            if not s.source.value:
                self.error("S0203", "empty calibration file name", s.source)
            self.count(s.samples, "`samples`", "samples")
            self.count(s.batch, "`batch`", "batch")
            if self.implemented(verb, s):
                self.option_implemented(verb, "samples", s.samples)
                self.option_implemented(verb, "batch", s.batch)
            return
        if isinstance(s, ast.Expect):
            self.expect(s)
            return

        ok = self.implemented(verb, s)
        if isinstance(s, ast.Decompose):
            self.selector(verb, s.selector)
            if s.rank is not None:
                self.rank(s.rank)
            self.name_in(s.method, language["method"], "decomposition method")
            self.positive(s.round, "`round`")
            self.count(s.progressive, "`progressive` steps", "progressive")
            if s.budget is not None:
                self.fraction(s.budget.value, "a budget")
                self.name_in(s.budget.by, LANGUAGE[verb]["budget by"], "budget weighing", verb)
            if s.rank is not None and s.budget is not None:
                self.error(
                    "S0204",
                    "`rank` and `budget` contradict each other",
                    s.budget,
                    "a budget chooses the rank of every layer: remove `rank` or `budget`",
                )
            if s.rank is None and s.budget is None:
                self.error(
                    "S0204",
                    "`decompose` needs a `rank` or a `budget`",
                    s,
                    "add e.g. `rank = 0.25` or `budget params 50%`",
                )
            if ok:
                if s.rank is not None:
                    from surgery.fmt import _rank

                    self.option_implemented(verb, "rank", s.rank, s.rank.kind, _rank(s.rank))
                if s.method is not None:
                    self.option_implemented(
                        verb, "method", s.method, s.method.value, f"method {s.method.value}"
                    )
                self.option_implemented(verb, "round", s.round)
                self.option_implemented(verb, "progressive", s.progressive)
                self.option_implemented(
                    verb, "keep_if_faster", s.keep_if_faster, shown="keep if faster"
                )
                self.option_implemented(verb, "budget", s.budget)
                by = s.budget.by if s.budget is not None else None
                if by is not None and by.value in LANGUAGE[verb]["budget by"]:
                    self.option_implemented(
                        verb, "budget by", by, by.value, f"budget ... by {by.value}"
                    )
        elif isinstance(s, ast.Group):
            self.positive(s.kv, "`kv`", "use `kv = 1` for multi-query attention")
            self.positive(s.q, "`q`")
            if ok:
                self.option_implemented(verb, "q", s.q)
        elif isinstance(s, ast.SkipTokens):
            self.fraction(s.ratio, "the share of skipped tokens", allow_zero=True, allow_one=False)
            self.index(s.after, "a block index")
            self.index(s.until, "a block index")
            if s.until is not None and s.until.value <= s.after.value:
                self.error(
                    "S0204",
                    f"`until block {s.until.value}` is not after `after block {s.after.value}`",
                    s.until,
                    f"use a block after {s.after.value}, or drop `until`",
                )
            if ok:
                self.option_implemented(verb, "until", s.until)
        elif isinstance(s, ast.Split):
            self.selector(verb, s.selector)
            if s.mode.value == "exact" and (s.combine is not None or s.rank is not None):
                extra = s.combine if s.combine is not None else s.rank
                self.error(
                    "S0204",
                    "`exact` takes no `add`/`cat` or `rank`",
                    extra,
                    "these options belong to `(2+1)d`",
                )
            if s.rank is not None:
                self.rank(s.rank)
            if ok:
                self.option_implemented(verb, "mode", s.mode, s.mode.value, s.mode.value)
                self.option_implemented(
                    verb, "combine", s.combine, s.combine.value if s.combine else None
                )
                self.option_implemented(verb, "rank", s.rank, s.rank.kind if s.rank else None)
        elif isinstance(s, ast.Sparsify):
            self.selector(verb, s.selector)
            self.positive(s.n, "`N` of `N:M`")
            self.positive(s.m, "`M` of `N:M`")
            if 0 < s.m.value <= s.n.value:
                self.error(
                    "S0203",
                    f"`{s.n.value}:{s.m.value}` keeps every weight",
                    s.n,
                    "N must be smaller than M, e.g. `2:4`",
                )
        elif isinstance(s, ast.Factorize):
            self.selector(verb, s.selector)
            self.name_in(s.method, language["method"], "factorization")
            self.count(s.basis, "`basis`", "basis")
            self.positive(s.nonzeros, "`nonzeros`")
            if s.nonzeros.value > s.basis.value > 0:
                self.error(
                    "S0203",
                    f"`nonzeros {s.nonzeros.value}` exceeds `basis {s.basis.value}`",
                    s.nonzeros,
                    f"use at most {s.basis.value} non-zeros",
                )
        elif isinstance(s, ast.Regularize):
            self.name_in(s.method, language["method"], "regularizer")
            if s.strength.magnitude <= 0:
                self.error("S0203", "regularization strength must be positive", s.strength)
            self.positive(s.every, "`every`")
            if ok:
                self.option_implemented(verb, "every", s.every)
        elif isinstance(s, ast.Drop):
            if s.count.value < 0:
                self.error("S0203", "cannot drop a negative number of sublayers", s.count)
            self.name_in(s.by, language["by"], "importance score")
        elif isinstance(s, ast.Truncate):
            self.positive(s.keep, "`keep`")
            self.name_in(s.strategy, language["strategy"], "truncation strategy")
            if s.indices is not None:
                for i in s.indices:
                    self.index(i, "a block index")
                values = [i.value for i in s.indices]
                if len(values) != s.keep.value:
                    self.error(
                        "S0204",
                        f"`keep {s.keep.value}` but {len(values)} block indices listed",
                        s.indices[0] if s.indices else s.keep,
                        f"list exactly {s.keep.value} indices",
                    )
                if len(set(values)) != len(values):
                    self.error("S0203", "a block index is listed twice", s.indices[0])
        elif isinstance(s, ast.Freeze):
            self.name_in(s.what, language["what"], "factor to freeze")
            if ok:
                self.option_implemented(
                    verb, "what", s.what, s.what.value, f"freeze {s.what.value}"
                )
        elif isinstance(s, ast.Heal):
            self.count(s.steps, "`steps`", "heal steps")
            if s.lr is not None and s.lr.magnitude <= 0:
                self.error("S0203", "learning rate must be positive", s.lr)
            self.fraction(s.subset, "`subset`")
            self.name_in(s.by, language["by"], "data-selection score")
            self.positive(s.every, "`every`")
            if ok:
                for option in ("lr", "distill", "subset", "by", "every"):
                    self.option_implemented(verb, option, getattr(s, option))

    def rank(self, r: ast.Rank) -> None:
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
        else:
            if r.value.unit in ("K", "M", "G") or not 0 < v <= 1:
                self.error(
                    "S0203",
                    f"a rank fraction must be in (0, 1], found `{_num_text(r.value)}`",
                    r.value,
                    "write a fraction like `0.25` or `25%`, or an integer for an absolute rank",
                )

    def expect(self, s: ast.Expect) -> None:
        metric = s.metric.value
        v = s.value.magnitude
        if metric == "speedup":  # always positive
            never = s.op in ("<", "<=", "==") and v <= 0
        else:  # params, flops and drift are never negative
            never = (s.op == "<" and v <= 0) or (s.op in ("<=", "==") and v < 0)
        if metric == "drift" and s.value.unit in ("K", "M", "G"):
            self.error(
                "S0203",
                "drift is a relative error, not a count",
                s.value,
                "write e.g. `0.05` or `5%`",
            )
        if never:
            from surgery.fmt import format_statement

            self.error(
                "S0208",
                f"contract `{format_statement(s)}` can never hold",
                s,
                f"`{metric}` is never negative"
                if metric != "speedup"
                else "a speedup is always positive",
            )
        if s.on is not None:
            self.name_in(s.on, BACKENDS, "backend")
            if metric != "speedup":
                self.error("S0204", f"`on {s.on.value}` only applies to `expect speedup`", s.on)
        if self.implemented("expect", s):
            self.option_implemented("expect", "metric", s.metric, metric, f"expect {metric}")
            if s.on is not None:
                self.option_implemented("expect", "on", s.on, s.on.value, f"on {s.on.value}")

    def recipe(self, recipe: ast.Recipe) -> None:
        seen_calibrate: ast.Calibrate | None = None
        targets = {"torch"}
        last_heal = -1  # index of the last `heal` (found once: asking per statement is O(n²))
        for index, s in enumerate(recipe.statements):
            if isinstance(s, ast.Target):
                targets.add(s.backend.value)
            elif isinstance(s, ast.Heal):
                last_heal = index
        for index, s in enumerate(recipe.statements):
            self.statement(s)
            if isinstance(s, ast.Calibrate):
                if seen_calibrate is not None:
                    self.error(
                        "S0205",
                        "a second `calibrate` statement",
                        s,
                        f"keep the one on line {seen_calibrate.span.line}",
                    )
                seen_calibrate = s
            if isinstance(s, ast.Freeze | ast.Regularize):
                if last_heal < index:
                    self.error(
                        "S0206",
                        f"`{s.verb}` has no effect without a later `heal`",
                        s,
                        "add e.g. `heal steps 200 distill from original` after it",
                    )
            if (
                isinstance(s, ast.Expect)
                and s.on is not None
                and s.on.value in BACKENDS
                and s.on.value not in targets
            ):
                self.error(
                    "S0207",
                    f"`expect speedup on {s.on.value}` but no `target {s.on.value}`",
                    s.on,
                    f"add `target {s.on.value}` to the recipe",
                )


def check(recipe: ast.Recipe, table: Support | None = None) -> list[Diagnostic]:
    """All problems of ``recipe`` (sorted by position); empty when it is valid."""
    checker = _Checker(table or support())
    with collector_paused():
        checker.recipe(recipe)
        return sorted(checker.diags, key=Diagnostic.sort_key)
