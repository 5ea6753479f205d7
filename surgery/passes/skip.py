"""`skip`: SkipViT token skipping (2401.15293) on CLS-token encoders.

``skip tokens 55% after block 3 [until block 9]`` scores tokens at block ``3`` by the CLS
token's attention, runs blocks ``4 .. 9`` (default: to the last block) on CLS plus the top
``⌈(1−ρ)·(N−1)⌉`` tokens and carries the other tokens unchanged, scattering them back into
their positions afterwards. It wraps the model's block list in a
:class:`~surgery.modules.token_skip.TokenSkipLayers` (no new parameters; see there for the
scoring, rounding and masking rules). Works on CLS-token and mean-pooled encoders (ViT,
DeiT, BERT, DistilBERT, DeBERTa-v2, CLIP vision, VideoMAE); decoders (GPT-2, LLaMA) have no
CLS token and are refused.

The scorer reads the query and key projections of the attention the exported graph's patterns
found (:mod:`surgery.patterns`) in block ``D``, whatever their names (``q_lin``/``k_lin``,
``query_proj``/``key_proj``): their paths and head layout are kept in the wrapper's spec. Blocks
that take relative positions (DeBERTa-v2's ``relative_pos``, computed once from the sequence
length by the encoder) get them gathered at the kept tokens (see
:mod:`surgery.modules.token_skip`); DeBERTa's optional convolution after block 0 reads all
tokens, so there tokens can only be skipped after block 1 or later.

Every refusal names why, from what the graph shows: a model without self-attention (CNNs), one
whose blocks are a shared layer run from a loop (ALBERT), a hierarchical model that attends in
windows and merges patches between stages (Swin), an encoder–decoder, a causal (decoder or
CLIP text) model, or an encoder without a CLS token; and an attention whose heads are not runs
of consecutive features of its projections.

Plan: one row per block with its token count before/after (``N`` from the analysed example,
if shapes were recorded). Block FLOPs after skipping are estimated as
``flops · (1+k)/N`` (exact for the linear layers, an upper bound for the ``T²`` attention term).

>>> import torch
>>> from transformers import ViTConfig, ViTModel
>>> from surgery.parse import parse
>>> model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
...                            intermediate_size=64, image_size=16, patch_size=4)).eval()
>>> p = SkipPass(parse("skip tokens 50% after block 0").statements[0])
>>> plan = p.ensure_context(model) and p.plan(model)
>>> [r.action for r in plan.rows]
['skip', 'skip tokens', 'skip tokens']
>>> _ = p.apply(model, plan)
>>> model(pixel_values=torch.randn(2, 3, 16, 16)).last_hidden_state.shape
torch.Size([2, 17, 32])
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from surgery import ast
from surgery.diagnostics import Diagnostic
from surgery.modules.grouped_heads import GroupedHeadsLinear
from surgery.modules.token_skip import CLSScorer, TokenSkipLayers, keep_count
from surgery.passes.base import Change, PassError, PlanRow, StepPlan, SurgeryPass
from surgery.patterns import AttentionMatch, HeadRows
from surgery.transformer_arch import (
    Stack,
    block_list,
    block_stacks,
    find_hf_config,
    get_module,
    graph_attention,
    has_cls_token,
    set_module,
    traced_analysis,
)

__all__ = ["CLS_ENCODERS", "SkipPass"]

# What the graph cannot tell: text encoders whose tokenizer puts a CLS token first.
CLS_ENCODERS = frozenset(
    {
        "bert",
        "roberta",
        "electra",
        "xlm-roberta",
        "camembert",
        "distilbert",
        "deberta",
        "deberta-v2",
        "mpnet",
        "albert",
    }
)


@dataclass
class _GraphView:
    """What the exported graph says about skipping tokens (:meth:`SkipPass._from_graph`)."""

    why: str | None  # why the model cannot skip tokens; None: it can, if it has a CLS token
    cls: bool  # a CLS token (or a mean-pooled output) sees every token
    path: str | None = None  # the list of blocks
    scorer: CLSScorer | None = None  # block D's query/key projections
    position_bias: bool = False  # blocks take relative positions (DeBERTa)
    conv_after_first: bool = False  # the encoder mixes block 0's output with a conv (DeBERTa)


def _forward_params(m: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(m.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _why_not(
    model: nn.Module,
    matches: list[AttentionMatch],
    selfs: list[AttentionMatch],
    stacks: list[Stack],
) -> str | None:
    """Why ``model`` cannot skip tokens, from its graph (None: it may, if it has a CLS)."""
    if not selfs:
        return "has no self-attention to rank tokens with"
    if any(m.calls > 1 for m in selfs):
        return (
            "runs one shared layer from a loop over `num_hidden_layers`: there is no list of "
            "blocks for the token-skipping wrapper to stand in for"
        )
    if any(len(s.lists) > 1 for s in stacks):
        return (
            "attends within fixed windows of patches and merges neighbouring patches between "
            "stages: removing tokens breaks the window grid, and it has no CLS token"
        )
    cfg = find_hf_config(model)
    if len(selfs) == len(matches) and len(stacks) > 1:
        return (
            f"has {len(stacks)} separate stacks of blocks ("
            + ", ".join(f"`{s.lists[0]}`" for s in stacks)
            + "): token skipping wraps one encoder; apply it to that tower's own model"
        )
    if len(selfs) != len(matches) or getattr(cfg, "is_encoder_decoder", False):
        return "is an encoder–decoder model: its decoder cross-attends to every encoder token"
    can_generate = getattr(model, "can_generate", None)
    if getattr(cfg, "is_decoder", False) or (callable(can_generate) and can_generate()):
        return "attends causally: no CLS token sees the whole sequence"
    if getattr(cfg, "model_type", "") == "clip_text_model":
        return "attends causally and pools at the end-of-text token: there is no CLS token"
    return None


def _projection(model: nn.Module, rows: HeadRows) -> tuple[str, tuple[int, ...]] | None:
    """(module whose output the scorer reads, first feature of every head slot), or None when
    a head's features are not consecutive. A projection pooled by `group` is the inner
    ``proj`` of a :class:`GroupedHeadsLinear`: its wrapper's output has the original layout,
    heads in consecutive runs of ``head_dim`` features."""
    parent, _, leaf = rows.module.rpartition(".")
    d = len(rows.rows[0])
    if leaf == "proj" and isinstance(get_module(model, parent), GroupedHeadsLinear):
        return parent, tuple(i * d for i in range(len(rows.rows)))
    if any(list(r) != list(range(r[0], r[0] + d)) for r in rows.rows):
        return None
    return rows.module, tuple(r[0] for r in rows.rows)


def _scorer(model: nn.Module, match: AttentionMatch, block: str) -> CLSScorer | None:
    """The CLS scorer of the attention ``match`` inside the block at ``block``."""
    q, k = _projection(model, match.q), _projection(model, match.k)
    if q is None or k is None:
        return None
    attn = get_module(model, match.path)
    d = match.head_dim
    scaling = getattr(attn, "scaling", None)
    if not isinstance(scaling, (int, float)):
        scaling = d**-0.5
        # DeBERTa divides q·k by √(d·(1 + number of disentangled terms)) (`pos_att_type`)
        extra = getattr(attn, "pos_att_type", None)
        if isinstance(extra, (list, tuple)):
            scaling /= (1 + len({"c2p", "p2c"} & set(extra))) ** 0.5
    n = len(block) + 1
    return CLSScorer(
        q[0][n:],
        k[0][n:],
        q[1],
        k[1],
        d,
        float(scaling),
    )


class SkipPass(SurgeryPass[ast.SkipTokens]):
    """``skip tokens P% after block D [until block E]``."""

    keyword: ClassVar[str] = "skip"

    def plan(self, model: nn.Module) -> StepPlan:
        ctx = self.ensure_context(model)
        stmt = self.statement
        assert isinstance(stmt, ast.SkipTokens)
        plan = self.new_plan()
        units = ctx.analysis.attentions  # where the dependency graph found attention
        # The module-level rules settle ViT/BERT-style encoders without exporting the model;
        # anything else, or a context that holds the exported graph already, asks the graph.
        settled = has_cls_token(model, units) and len(block_stacks(model, ctx.analysis)) == 1
        graph = ctx.analysis.traced and "attention" in ctx.analysis.graph.graph
        view = self._from_graph(model, stmt.after.value) if graph or not settled else None
        if view is None:
            why, cls = None, settled or self._pooled(model)
        else:
            why, cls = view.why, view.cls
        if why is not None or not cls:
            raise PassError(
                Diagnostic(
                    code="S0324",
                    message=f"token skipping needs a CLS-token encoder; `{type(model).__name__}` "
                    + (why or "has no CLS token"),
                    span=stmt.span,
                    help="use `skip tokens` on ViT or BERT-style encoders; for decoders consider `drop` or `truncate`",
                )
            )
        listed = get_module(model, view.path) if view is not None and view.path else None
        if view is not None and view.path is not None and isinstance(listed, nn.ModuleList):
            path, blocks = view.path, listed
        else:
            path, blocks = block_list(model, units)
        if isinstance(path, str) and path.endswith(".inner"):
            raise PassError(
                Diagnostic(
                    code="S0323",
                    message="this model already skips tokens",
                    span=stmt.span,
                    help="write one `skip tokens` statement per recipe",
                )
            )
        if view is not None and view.conv_after_first and stmt.after.value == 0:
            raise PassError(
                Diagnostic(
                    code="S0324",
                    message=f"`{type(model).__name__}` adds a convolution over all tokens to "
                    "block 0's output outside the blocks, so tokens cannot be skipped after it",
                    span=stmt.after.span,
                    help="skip tokens after block 1 or later",
                )
            )
        n = len(blocks)
        ratio = stmt.ratio.magnitude  # `check` rejects a fraction outside [0, 1) (S0203)
        d = stmt.after.value
        if not 0 <= d < n - 1:
            raise PassError(
                Diagnostic(
                    code="S0321",
                    message=f"block {d} is out of range: tokens can be skipped after blocks 0..{n - 2} of {n}",
                    span=stmt.after.span,
                    help=f"valid range: 0..{n - 2} (at least one block must follow)",
                )
            )
        last = n - 1
        if stmt.until is not None:
            last = stmt.until.value  # `check` rejects one not after `after` (S0204)
            if last > n - 1:
                raise PassError(
                    Diagnostic(
                        code="S0321",
                        message=f"block {last} is out of range: the model has blocks 0..{n - 1}",
                        span=stmt.until.span,
                        help=f"valid range: {d + 1}..{n - 1}",
                    )
                )
        for i, blk in enumerate(blocks):
            bpath = f"{path}.{i}"
            info = ctx.analysis.modules.get(bpath)
            tokens = (
                info.input_shapes[0][1]
                if info is not None and info.input_shapes and len(info.input_shapes[0]) == 3
                else None
            )
            flops = info.flops if info is not None else 0
            params = sum(p.numel() for p in blk.parameters())
            reduced = d < i <= last
            kept = 1 + keep_count(tokens, ratio) if tokens else None
            shape = f"{tokens} tokens" if tokens else "tokens: unknown"
            if reduced:
                shape += f" → {kept}" if kept is not None else f" → 1+⌈{1 - ratio:g}·(N−1)⌉"
            plan.rows.append(
                PlanRow(
                    path=bpath,
                    type=type(blk).__name__,
                    shape=shape,
                    action="skip tokens" if reduced else "skip",
                    params_before=params,
                    params_after=params,
                    flops_before=flops,
                    flops_after=flops * kept // tokens if reduced and tokens and kept else flops,
                    detail={"block": i, "tokens": tokens, "kept": kept if reduced else tokens},
                    note=("scores tokens by CLS attention" if i == d else ""),
                )
            )
        plan.data.update(
            {
                "path": path,
                "ratio": ratio,
                "after": d,
                "until": stmt.until.value if stmt.until else None,
                "scorer": view.scorer.to_dict() if view is not None and view.scorer else None,
            }
        )
        plan.notes.append(f"blocks {d + 1}..{last} see CLS + {1 - ratio:.0%} of the other tokens")
        if view is not None and view.position_bias:
            plan.notes.append(
                "tokens are ranked by the content-to-content term of the CLS attention; the "
                "relative positions of the kept tokens are gathered for the later blocks"
            )
        if not has_cls_token(model, units) and self._pooled(model):
            plan.notes.append(
                "no CLS token: tokens are ranked by the first token's attention; the mean-pooled "
                "output still averages every position"
            )
        return plan

    @staticmethod
    def _pooled(model: nn.Module) -> bool:
        """A mean-pooled encoder without a CLS token (VideoMAE): tokens are ranked by the
        first token's attention and the pooled output still sees every position."""
        cfg = find_hf_config(model)
        return bool(getattr(cfg, "use_mean_pooling", False)) and not getattr(
            cfg, "is_decoder", False
        )

    def _from_graph(self, model: nn.Module, after: int) -> _GraphView | None:
        """What the exported graph says about skipping tokens in ``model`` (None: no graph,
        the module-level rules decide): why not, whether it has a CLS token, the list of
        blocks and the scorer of block ``after``'s attention."""
        ctx = self.ensure_context(model)
        traced = traced_analysis(model, ctx.analysis, ctx.example)
        matches, _ = graph_attention(model, traced)
        if matches is None:
            return None
        selfs = [m for m in matches if not m.cross]
        stacks = block_stacks(model, traced)
        cfg = find_hf_config(model)
        cls = (
            has_cls_token(model, ctx.analysis.attentions)
            or any(
                n.rsplit(".", 1)[-1] in ("cls_token", "class_embedding")
                for n, _ in model.named_parameters()
            )
            or getattr(cfg, "model_type", "") in CLS_ENCODERS
            or self._pooled(model)
        )
        view = _GraphView(why=_why_not(model, matches, selfs, stacks), cls=cls)
        if view.why is not None or not cls:
            return view
        lists = [
            s.lists[0] for s in stacks if any(m.path.startswith(s.lists[0] + ".") for m in selfs)
        ]
        if len(lists) != 1 or not isinstance(get_module(model, lists[0]), nn.ModuleList):
            return view  # the module rules find the list (`block_list`)
        view.path = lists[0]
        match = next((m for m in selfs if m.path.startswith(f"{view.path}.{after}.")), None)
        if match is not None:
            view.scorer = _scorer(model, match, f"{view.path}.{after}")
            if view.scorer is None:
                view.why = (
                    f"scores tokens by the CLS query through `{match.q.module}`/"
                    f"`{match.k.module}`, whose heads are not runs of consecutive features"
                )
            view.position_bias = any(
                "relative_pos" in _forward_params(b)
                for b in get_module(model, view.path).children()
            )
        parent = get_module(model, view.path.rpartition(".")[0])
        view.conv_after_first = isinstance(getattr(parent, "conv", None), nn.Module)
        return view

    def apply(self, model: nn.Module, plan: StepPlan) -> list[Change]:
        path: str = plan.data["path"]
        blocks = get_module(model, path)
        if not isinstance(blocks, nn.ModuleList):
            raise PassError(
                Diagnostic(
                    code="S0410",
                    message=f"`{path}` is no longer a list of blocks",
                    span=self.statement.span,
                    help="an earlier statement changed the blocks; reorder the recipe",
                )
            )
        wrapper = TokenSkipLayers(
            plan.data["ratio"], plan.data["after"], plan.data["until"], plan.data.get("scorer")
        )
        wrapper.inner = blocks
        set_module(model, path, wrapper)
        return [self.change(path, "skip tokens", **wrapper.spec())]
