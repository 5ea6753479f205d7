"""`truncate`: keep ``K`` of the ``n`` transformer blocks (layer truncation, 2110.08460).

``truncate blocks keep K uniform`` keeps blocks ``⌊i·n/K⌋`` for ``i = 0..K−1`` (12→6: 0,2,4,6,8,10);
``pseudo-uniform`` always keeps the first and the last block and spaces the rest evenly:
``⌊i·(n−1)/(K−1) + ½⌋`` (12→6: 0,2,4,7,9,11; ``K = 1`` keeps block 0);
``keep K [i, j, ...]`` keeps the listed blocks (sorted, without repeats). Without a strategy,
``uniform`` is used.

Blocks are the stacks of `surgery.transformer_arch.block_stacks`: one list of repeated blocks
(a transformer's layers; an encoder–decoder's encoder and decoder are two stacks, and each
keeps ``K``), or the stages of a hierarchical model (Swin, ConvNeXt, ResNet), where the ``K``
kept blocks are counted over all stages. A block that differs from its list's other blocks (a
stage's first, downsampling block; T5's block 0, which owns the relative-position bias) always
stays: ``K`` must leave room for those, and an index list must name them.

The kept block modules move, with their weights, into a shorter list; the HF config follows, so
that ``surgery load`` rebuilds the same architecture: ``num_hidden_layers`` (GPT-2's
``n_layer``, T5's ``num_layers``, DistilBERT's ``n_layers`` are aliases),
``encoder_layers``/``decoder_layers`` (BART, Whisper) or ``num_decoder_layers`` (T5) for an
encoder–decoder's stacks, a stage model's ``depths``, and a per-layer ``layer_types`` list. Every
``layer_idx`` attribute inside block ``j`` of the result is reset to ``j`` so that a key/value
cache (``generate``) indexes the new layers. ALBERT's blocks are one shared layer run
``num_hidden_layers`` times: keeping ``K`` of them is running it ``K`` times, which is what the
config then says.

>>> truncation_indices(12, 6, "pseudo-uniform"), truncation_indices(12, 6, "uniform")
([0, 2, 4, 7, 9, 11], [0, 2, 4, 6, 8, 10])
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from surgery import ast
from surgery.diagnostics import Diagnostic
from surgery.passes.base import Change, PassError, PlanRow, StepPlan, SurgeryPass
from surgery.transformer_arch import (
    Stack,
    block_stacks,
    config_of,
    get_module,
    graph_attention,
    set_module,
    traced_analysis,
)

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


def _layers_key(cfg: Any, path: str, n: int) -> str | None:
    """The config key holding the number of blocks of the list at ``path`` (currently ``n``)."""
    if getattr(cfg, "is_encoder_decoder", False):
        if "decoder" in path.split("."):
            names: tuple[str, ...] = ("decoder_layers", "num_decoder_layers")
        else:
            names = ("encoder_layers", "num_layers", "num_hidden_layers")
    else:
        names = ("num_hidden_layers", "num_layers", "n_layer")
    for name in names:
        if getattr(cfg, name, None) == n:
            return name
    return None


class TruncatePass(SurgeryPass[ast.Truncate]):
    """``truncate blocks keep K uniform|pseudo-uniform|[i, j, ...]``."""

    keyword: ClassVar[str] = "truncate"

    def _fail(self, code: str, message: str, node: ast.Node, help: str) -> PassError:
        return PassError(Diagnostic(code=code, message=message, span=node.span, help=help))

    def _kept(self, stack: Stack, name: str) -> tuple[list[int], str]:
        """Stack positions kept (sorted) and the strategy's name."""
        stmt = self.statement
        assert isinstance(stmt, ast.Truncate)
        n, k, fixed = stack.total, stmt.keep.value, sorted(stack.fixed)
        if not 1 <= k <= n:
            raise self._fail(
                "S0341",
                f"cannot keep {k} of the {n} blocks of `{name}`",
                stmt.keep,
                f"valid range: 1..{n}",
            )
        why = (
            "the first block of a stage (a stage downsamples there and cannot be empty)"
            if len(stack.lists) > 1
            else "a first block unlike the others (it owns what later blocks reuse)"
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
            missing = [i for i in fixed if i not in kept]
            if missing:
                raise self._fail(
                    "S0342",
                    f"blocks {missing} of `{name}` cannot be removed: each is {why}",
                    stmt,
                    f"include blocks {fixed} in the list",
                )
            return kept, "indices"
        # `check` rejects an unknown strategy (S0201).
        strategy = stmt.strategy.value if stmt.strategy is not None else "uniform"
        if k < len(fixed):
            raise self._fail(
                "S0341",
                f"cannot keep {k} of the {n} blocks of `{name}`: blocks {fixed} must stay, each "
                f"being {why}",
                stmt.keep,
                f"valid range: {len(fixed)}..{n}",
            )
        optional = [i for i in range(n) if i not in stack.fixed]
        chosen = (
            [optional[j] for j in truncation_indices(len(optional), k - len(fixed), strategy)]
            if k > len(fixed)
            else []
        )
        return sorted(set(fixed) | set(chosen)), strategy

    def _config_update(
        self, model: nn.Module, stack: Stack, kept: list[int]
    ) -> dict[str, Any] | None:
        """What the HF config must say after truncation: ``{"path", "key", "value"}``."""
        cfg = config_of(model, stack.lists[0])
        if cfg is None:
            return None
        counts = [0] * len(stack.lists)
        for i in kept:
            counts[stack.locate(i)[0]] += 1
        if len(stack.lists) > 1:
            depths = getattr(cfg, "depths", None)
            if isinstance(depths, (list, tuple)) and list(depths) == list(stack.sizes):
                return {"list": stack.lists[0], "key": "depths", "value": counts}
            return {"list": stack.lists[0], "key": None, "value": counts}
        key = _layers_key(cfg, stack.lists[0], stack.total)
        root = config_of(model, "")
        root_key = None
        if root is not None and root is not cfg and getattr(root, "is_encoder_decoder", False):
            # T5's stacks hold copies of the config: the saved (root) one must change too
            root_key = _layers_key(root, stack.lists[0], stack.total)
            key = key or root_key
        return {"list": stack.lists[0], "key": key, "value": len(kept), "root_key": root_key}

    def plan(self, model: nn.Module) -> StepPlan:
        ctx = self.ensure_context(model)
        stmt = self.statement
        assert isinstance(stmt, ast.Truncate)
        plan = self.new_plan()
        stacks = block_stacks(model, traced_analysis(model, ctx.analysis, ctx.example))
        if not stacks:
            return self._plan_shared(model, plan)
        data: list[dict[str, Any]] = []
        for stack in stacks:
            name = stack.lists[0] if len(stack.lists) == 1 else ", ".join(stack.lists)
            kept, strategy = self._kept(stack, name)
            update = self._config_update(model, stack, kept)
            if update is not None and update["key"] is None:
                raise self._fail(
                    "S0343",
                    f"`truncate` does not know which config key of `{type(model).__name__}` "
                    f"holds the number of blocks of `{name}`",
                    stmt,
                    "without updating it the output would not load; truncate this model by hand",
                )
            n = stack.total
            for i in range(n):
                li, j = stack.locate(i)
                bpath = f"{stack.lists[li]}.{j}"
                blk = get_module(model, bpath)
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
                        note=("kept (must stay)" if i in stack.fixed else "kept") if keep else "",
                    )
                )
            data.append(
                {
                    "lists": list(stack.lists),
                    "sizes": list(stack.sizes),
                    "kept": kept,
                    "config": update,
                }
            )
            plan.notes.append(
                f"keep blocks {kept} of {n} ({strategy})"
                + (f" in `{name}`" if len(stacks) > 1 else "")
            )
        plan.data.update({"stacks": data})
        return plan

    def _plan_shared(self, model: nn.Module, plan: StepPlan) -> StepPlan:
        """ALBERT: one layer whose weights every block shares, run ``num_hidden_layers`` times."""
        ctx = self.ensure_context(model)
        stmt = self.statement
        assert isinstance(stmt, ast.Truncate)
        matches, _ = graph_attention(model, ctx.analysis, ctx.example)
        shared = [m for m in matches or [] if m.calls > 1]
        cfg = config_of(model, shared[0].path) if shared else None
        n = getattr(cfg, "num_hidden_layers", None)
        if (
            not shared
            or not isinstance(n, int)
            or shared[0].calls != n
            or getattr(cfg, "num_hidden_groups", 1) != 1
        ):
            raise self._fail(
                "S0340",
                f"`truncate` found no repeated blocks in `{type(model).__name__}`",
                stmt,
                "`truncate` works on models with a list of repeated blocks (transformer layers, "
                "the stages of a CNN)",
            )
        stack = Stack(("",), (n,), frozenset())
        kept, _strategy = self._kept(stack, "the shared layer")
        path = shared[0].path.rsplit(".", 1)[0]
        for i in range(n):
            keep = i in kept
            plan.rows.append(
                PlanRow(
                    path=path,
                    type=type(get_module(model, path)).__name__,
                    shape=f"call {i} of {n} of the shared layer",
                    action="skip" if keep else "remove",
                    params_before=0,
                    params_after=0,
                    flops_before=0,
                    flops_after=0,
                    detail={"block": i, "shared": True},
                    note="kept" if keep else "",
                )
            )
        plan.data["shared"] = {"n": n, "k": len(kept), "path": path}
        plan.notes.append(
            f"the {n} blocks share one layer's weights: it runs {len(kept)} times instead of {n} "
            "(which blocks are kept makes no difference)"
        )
        return plan

    def apply(self, model: nn.Module, plan: StepPlan) -> list[Change]:
        shared = plan.data.get("shared")
        if shared is not None:
            if shared["k"] == shared["n"]:
                return []
            cfg = config_of(model, shared["path"])
            assert cfg is not None
            cfg.num_hidden_layers = shared["k"]
            return [
                self.change(
                    shared["path"],
                    "truncate",
                    kept=list(range(shared["k"])),
                    blocks_before=shared["n"],
                    shared=True,
                )
            ]
        changes: list[Change] = []
        for stack in plan.data.get("stacks", []):
            changes += self._apply_stack(model, stack)
        return changes

    def _apply_stack(self, model: nn.Module, stack: dict[str, Any]) -> list[Change]:
        lists, sizes, kept = stack["lists"], stack["sizes"], stack["kept"]
        n = sum(sizes)
        if kept == list(range(n)):
            return []
        offset = 0
        position = 0
        for path, size in zip(lists, sizes, strict=True):
            blocks = get_module(model, path)
            if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) != size:
                raise PassError(
                    Diagnostic(
                        code="S0410",
                        message=f"`{path}` no longer holds the {size} planned blocks",
                        span=self.statement.span,
                        help="an earlier statement changed the blocks; reorder the recipe",
                    )
                )
            mine = [blocks[i - offset] for i in kept if offset <= i < offset + size]
            new: nn.Module = (
                type(blocks)(*mine) if isinstance(blocks, nn.Sequential) else nn.ModuleList(mine)
            )
            for blk in mine:
                m: Any
                for m in blk.modules():  # caches and masks index layers by their new position
                    if isinstance(getattr(m, "layer_idx", None), int):
                        m.layer_idx = position
                position += 1
            set_module(model, path, new)
            offset += size
        update = stack.get("config")
        if update is not None and update["key"] is not None:
            cfg = config_of(model, update["list"])
            assert cfg is not None
            if getattr(cfg, update["key"], None) is not None:
                setattr(cfg, update["key"], update["value"])
            root = config_of(model, "")
            if update.get("root_key") and root is not None:
                setattr(root, update["root_key"], update["value"])
            types = getattr(cfg, "layer_types", None)
            if isinstance(types, list) and len(types) == n:
                cfg.layer_types = [types[i] for i in kept]
        path = lists[0] if len(lists) == 1 else lists[0].rsplit(".", 2)[0]
        return [
            self.change(
                lists[0] if len(lists) == 1 else path,
                "truncate",
                kept=kept,
                removed=[i for i in range(n) if i not in kept],
                blocks_before=n,
            )
        ]
