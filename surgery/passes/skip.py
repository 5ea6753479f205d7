"""`skip`: SkipViT token skipping (2401.15293) on CLS-token encoders.

``skip tokens 55% after block 3 [until block 9]`` scores tokens at block ``3`` by the CLS
token's attention, runs blocks ``4 .. 9`` (default: to the last block) on CLS plus the top
``⌈(1−ρ)·(N−1)⌉`` tokens and carries the other tokens unchanged, scattering them back into
their positions afterwards. It wraps the model's block list in a
:class:`~surgery.modules.token_skip.TokenSkipLayers` (no new parameters; see there for the
scoring, rounding and masking rules). Works on HF ``ViTModel`` and BERT-style encoders;
decoders (GPT-2, LLaMA) have no CLS token and are refused.

Every refusal names why, from what the graph shows: a model without self-attention (CNNs), one
whose blocks are a shared layer run from a loop (ALBERT), a hierarchical model that attends in
windows and merges patches between stages (Swin), an encoder–decoder, a causal (decoder or
CLIP text) model, or an encoder without a CLS token; and an encoder whose attention's query and
key projections the token scorer cannot read yet (`surgery.modules.token_skip` reads ``query``
/``key`` or ``q_proj``/``k_proj``).

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

from typing import ClassVar

from torch import nn

from surgery import ast
from surgery.diagnostics import Diagnostic
from surgery.modules.token_skip import TokenSkipLayers, keep_count
from surgery.passes.base import Change, PassError, PlanRow, StepPlan, SurgeryPass
from surgery.transformer_arch import (
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


class SkipPass(SurgeryPass[ast.SkipTokens]):
    """``skip tokens P% after block D [until block E]``."""

    keyword: ClassVar[str] = "skip"

    def plan(self, model: nn.Module) -> StepPlan:
        ctx = self.ensure_context(model)
        stmt = self.statement
        assert isinstance(stmt, ast.SkipTokens)
        plan = self.new_plan()
        units = ctx.analysis.attentions  # where the dependency graph found attention
        # The module-level rules know ViT/BERT-style encoders; anything else asks the graph.
        towers = len(block_stacks(model, ctx.analysis))
        why = None if has_cls_token(model, units) and towers == 1 else self._why_not(model)
        if why is not None or not (has_cls_token(model, units) or self._pooled(model)):
            raise PassError(
                Diagnostic(
                    code="S0324",
                    message=f"token skipping needs a CLS-token encoder; `{type(model).__name__}` "
                    + (why or "has no CLS token"),
                    span=stmt.span,
                    help="use `skip tokens` on ViT or BERT-style encoders; for decoders consider `drop` or `truncate`",
                )
            )
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
            }
        )
        plan.notes.append(f"blocks {d + 1}..{last} see CLS + {1 - ratio:.0%} of the other tokens")
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

    def _why_not(self, model: nn.Module) -> str | None:
        """Why ``model`` cannot skip tokens, from its graph (None: it may, if it has a CLS)."""
        ctx = self.ensure_context(model)
        traced = traced_analysis(model, ctx.analysis, ctx.example)
        matches, _ = graph_attention(model, traced)
        if matches is None:
            return None  # no graph: the module-level rules decide
        selfs = [m for m in matches if not m.cross]
        if not selfs:
            return "has no self-attention to rank tokens with"
        if any(m.calls > 1 for m in selfs):
            return (
                "runs one shared layer from a loop over `num_hidden_layers`: there is no list of "
                "blocks for the token-skipping wrapper to stand in for"
            )
        if any(len(s.lists) > 1 for s in block_stacks(model, traced)):
            return (
                "attends within fixed windows of patches and merges neighbouring patches between "
                "stages: removing tokens breaks the window grid, and it has no CLS token"
            )
        cfg = find_hf_config(model)
        stacks = block_stacks(model, traced)
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
        cls = (
            any(
                n.rsplit(".", 1)[-1] in ("cls_token", "class_embedding")
                for n, _ in model.named_parameters()
            )
            or getattr(cfg, "model_type", "") in CLS_ENCODERS
            or bool(getattr(cfg, "use_mean_pooling", False))
        )
        if not cls:
            return "has no CLS token (nor a pooled output) whose attention ranks the tokens"
        try:
            blocks: nn.Module | None = block_list(model, units=None)[1]
        except LookupError:
            blocks = None
        first = selfs[0]
        readable = {"query", "key", "q_proj", "k_proj"}

        def name_of(path: str) -> str:  # a projection grouped by `group` is its wrapper's `proj`
            parent, _, leaf = path.rpartition(".")
            grouped = (
                leaf == "proj" and type(get_module(model, parent)).__name__ == "GroupedHeadsLinear"
            )
            return parent.rsplit(".", 1)[-1] if grouped else leaf

        names = {name_of(first.q.module), name_of(first.k.module)}
        if blocks is None or not names <= readable:
            return (
                f"scores tokens by the CLS query through `{name_of(first.q.module)}`"
                f"/`{name_of(first.k.module)}`, which the token scorer does not read yet "
                "(it reads `query`/`key` or `q_proj`/`k_proj`)"
            )
        return None

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
        wrapper = TokenSkipLayers(plan.data["ratio"], plan.data["after"], plan.data["until"])
        wrapper.inner = blocks
        set_module(model, path, wrapper)
        return [self.change(path, "skip tokens", **wrapper.spec())]
