"""`truncate`: keep ``K`` of the ``n`` transformer blocks (layer truncation, 2110.08460).

``truncate blocks keep K uniform`` keeps blocks ``⌊i·n/K⌋`` for ``i = 0..K−1`` (12→6: 0,2,4,6,8,10);
``pseudo-uniform`` always keeps the first and the last block and spaces the rest evenly:
``⌊i·(n−1)/(K−1) + ½⌋`` (12→6: 0,2,4,7,9,11; ``K = 1`` keeps block 0);
``keep K [i, j, ...]`` keeps the listed blocks (sorted, without repeats). Without a strategy,
``uniform`` is used.

The kept block modules move, with their weights, into a shorter ``ModuleList``; the HF config's
``num_hidden_layers`` (GPT-2's ``n_layer`` is an alias) and a per-layer ``layer_types`` list
follow, and every ``layer_idx`` attribute inside block ``j`` of the result is reset to ``j`` so
that a key/value cache (``generate``) indexes the new layers.

>>> truncation_indices(12, 6, "pseudo-uniform"), truncation_indices(12, 6, "uniform")
([0, 2, 4, 7, 9, 11], [0, 2, 4, 6, 8, 10])
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from surgery import ast
from surgery.diagnostics import Diagnostic
from surgery.passes.base import Change, PassError, PlanRow, StepPlan, SurgeryPass
from surgery.transformer_arch import block_list, find_hf_config, get_module, set_module

__all__ = ["TruncatePass", "truncation_indices"]


def truncation_indices(n: int, k: int, strategy: str) -> list[int]:
    """Block indices kept by ``strategy`` (see the module docstring); ``1 ≤ k ≤ n``."""
    if not 1 <= k <= n:
        raise ValueError(f"keep {k} of {n} blocks")
    if strategy == "uniform":
        return [i * n // k for i in range(k)]
    if strategy == "pseudo-uniform":
        if k == 1:
            return [0]
        # Integer round-half-up of i·(n−1)/(k−1), free of float rounding.
        return [(2 * i * (n - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k)]
    raise ValueError(f"unknown strategy `{strategy}`")


class TruncatePass(SurgeryPass[ast.Truncate]):
    """``truncate blocks keep K uniform|pseudo-uniform|[i, j, ...]``."""

    keyword: ClassVar[str] = "truncate"

    def _fail(self, code: str, message: str, node: ast.Node, help: str) -> PassError:
        return PassError(Diagnostic(code=code, message=message, span=node.span, help=help))

    def plan(self, model: nn.Module) -> StepPlan:
        ctx = self.ensure_context(model)
        stmt = self.statement
        assert isinstance(stmt, ast.Truncate)
        plan = self.new_plan()
        try:  # the module list whose items hold the attentions of the dependency graph
            path, blocks = block_list(model, ctx.analysis.attentions)
        except LookupError:
            raise self._fail(
                "S0340",
                "`truncate` found no repeated transformer blocks in this model",
                stmt,
                "`truncate` works on models with a ModuleList of attention blocks",
            ) from None
        n, k = len(blocks), stmt.keep.value
        if not 1 <= k <= n:
            raise self._fail(
                "S0341",
                f"cannot keep {k} of the {n} blocks of `{path}`",
                stmt.keep,
                f"valid range: 1..{n}",
            )
        if stmt.indices is not None:
            for node in stmt.indices:
                if not 0 <= node.value < n:
                    raise self._fail(
                        "S0342",
                        f"block index {node.value} is out of range for {n} blocks",
                        node,
                        f"valid block indices: 0..{n - 1}",
                    )
            # `check` rejects a list of other than `keep` distinct indices (S0204, S0203).
            kept = sorted({node.value for node in stmt.indices})
            strategy = "indices"
        else:
            # `check` rejects an unknown strategy (S0201).
            strategy = stmt.strategy.value if stmt.strategy is not None else "uniform"
            kept = truncation_indices(n, k, strategy)
        for i, blk in enumerate(blocks):
            bpath = f"{path}.{i}"
            params = sum(p.numel() for p in blk.parameters())
            info = ctx.analysis.modules.get(bpath)
            flops = info.flops if info is not None else 0
            keep = i in kept
            plan.rows.append(
                PlanRow(
                    path=bpath,
                    type=type(blk).__name__,
                    shape=f"block {i} of {n}" + (f" → {kept.index(i)}" if keep else ""),
                    action="skip" if keep else "remove",
                    params_before=params,
                    params_after=params if keep else 0,
                    flops_before=flops,
                    flops_after=flops if keep else 0,
                    detail={"block": i, "new_index": kept.index(i) if keep else None},
                    note="kept" if keep else "",
                )
            )
        plan.data.update({"path": path, "kept": kept, "n": n, "strategy": strategy})
        plan.notes.append(f"keep blocks {kept} of {n} ({strategy})")
        return plan

    def apply(self, model: nn.Module, plan: StepPlan) -> list[Change]:
        path: str = plan.data["path"]
        kept: list[int] = plan.data["kept"]
        n: int = plan.data["n"]
        if kept == list(range(n)):
            return []
        blocks = get_module(model, path)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) != n:
            raise PassError(
                Diagnostic(
                    code="S0410",
                    message=f"`{path}` no longer holds the {n} planned blocks",
                    span=self.statement.span,
                    help="an earlier statement changed the blocks; reorder the recipe",
                )
            )
        new = nn.ModuleList([blocks[i] for i in kept])
        for j, blk in enumerate(new):
            m: Any
            for m in blk.modules():  # caches and masks index layers by their new position
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = j
        set_module(model, path, new)
        cfg = find_hf_config(model)
        if cfg is not None:
            if isinstance(getattr(cfg, "num_hidden_layers", None), int):
                cfg.num_hidden_layers = len(kept)
            types = getattr(cfg, "layer_types", None)
            if isinstance(types, list) and len(types) == n:
                cfg.layer_types = [types[i] for i in kept]
        return [
            self.change(
                path,
                "truncate",
                kept=kept,
                removed=[i for i in range(n) if i not in kept],
                blocks_before=n,
            )
        ]
