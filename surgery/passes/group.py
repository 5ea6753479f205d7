"""`group`: share attention heads by groups (GQA, MQA, GKVA, GQKVA) by mean-pooling projections.

``group kv = G`` gives every block's self-attention ``G`` key/value heads (GQA; ``kv = 1`` is
MQA); ``group q = Gq kv = Gkv`` also pools the query heads into ``Gq`` groups (GQKVA; with
``kv = heads`` it is GKVA). Heads are grouped contiguously (group ``g`` holds heads
``g·h/G .. (g+1)·h/G − 1``) and a group's projection weight rows and biases are the **mean** of
its members' (2305.13245, 2311.03426). The output projection is unchanged: see
:mod:`surgery.modules.attention` for how grouped query heads fill the ``h`` output slots.

Per architecture:

* BERT-style ``query/key/value`` (HF ``BertSelfAttention``), ViT (``ViTAttention``) and GPT-2's
  fused ``c_attn`` (HF ``Conv1D``, weight ``[in, 3·hidden]``, split into q|k|v columns) are
  replaced by a :class:`~surgery.modules.attention.GroupedAttention` with the same call
  signature and return value.
* LLaMA/Mistral-style attentions, already grouped (``num_key_value_heads``), stay HF modules:
  ``k_proj``/``v_proj`` become smaller ``nn.Linear`` with pooled weights and
  ``num_key_value_groups`` and ``config.num_key_value_heads`` are updated, so ``generate`` and
  saving with ``save_pretrained`` keep working. ``G`` must divide the current kv heads; query
  grouping is not supported there (rotary embeddings would need a replacement module).
* Every other self-attention the graph patterns find (`surgery.patterns`: DistilBERT,
  DeBERTa-v2, ALBERT, BART and T5 self-attention, GPT-NeoX, OPT, BLOOM, Falcon, Phi-3, CLIP,
  Swin, VideoMAE, ...) keeps its HF module; the projections that make its queries, keys and
  values (separate or fused, whatever their row layout) become
  :class:`~surgery.modules.grouped_heads.GroupedHeadsLinear` layers holding the pooled heads
  once, so the attention reads the same layout with grouped heads. Cross-attention is left
  alone (a plan row says so). An attention shared by several blocks (ALBERT) is grouped once.
* ``kv = heads`` (and ``q = heads``) changes nothing: the model is left bit-identical.

Plan FLOPs are analytic, for one forward on the analysed example (``B, T`` from the attention's
recorded input shape): q/k/v projections ``2·B·T·C·d·(q + 2·kv)`` plus scores and weighted sum
``4·B·P·T²·d`` over ``P`` computed (query, kv) pairs; the unchanged output projection is not
counted. Without recorded shapes the FLOP columns are 0.

>>> from transformers import BertConfig, BertModel
>>> from surgery.parse import parse
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
...                              intermediate_size=64, vocab_size=50))
>>> p = GroupPass(parse("group kv = 2").statements[0])
>>> plan = p.ensure_context(model) and p.plan(model)
>>> [(r.path, r.shape) for r in plan.rows][:1]
[('encoder.layer.0.attention.self', '4 heads: q 4→4, kv 4→2')]
>>> [c.action for c in p.apply(model, plan)]
['group', 'group']
>>> type(model.encoder.layer[0].attention.self).__name__
'GroupedAttention'
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from surgery import ast
from surgery.diagnostics import Diagnostic
from surgery.modules.attention import GroupedAttention, pairing, pool_heads
from surgery.modules.grouped_heads import GroupedHeadsLinear, runs_of
from surgery.passes.base import Change, PassError, PlanRow, StepPlan, SurgeryPass
from surgery.patterns import AttentionMatch
from surgery.transformer_arch import (
    GROUPED_ATTENTION_CLASSES,
    AttentionSite,
    _site,
    attention_sites,
    divisors,
    find_hf_config,
    get_module,
    graph_attention,
    is_hf_conv1d,
    set_module,
)

__all__ = ["GroupPass", "attention_flops", "grouped_attention_from"]


def attention_flops(
    tokens: int, batch: int, hidden: int, head_dim: int, q: int, kv: int, pairs: int
) -> int:
    """Analytic FLOPs of q/k/v projections and the attention core (2 per MAC).

    >>> attention_flops(tokens=10, batch=1, hidden=8, head_dim=2, q=4, kv=4, pairs=4)
    7040
    """
    proj = 2 * batch * tokens * hidden * head_dim * (q + 2 * kv)
    core = 4 * batch * pairs * tokens * tokens * head_dim  # QKᵀ and softmax(·)V
    return proj + core


def _projections(m: Any, site: AttentionSite) -> dict[str, Any]:
    """q/k/v (and owned output) projections of an attention as Linear-layout tensors."""
    if site.family == "separate":
        q, k, v = m.query, m.key, m.value
    elif site.family in ("qkvo", "grouped", "gqa"):
        q, k, v = m.q_proj, m.k_proj, m.v_proj
    else:  # fused GPT-2 c_attn: Conv1D weight [in, 3·H] -> columns q | k | v
        w, b = m.c_attn.weight, m.c_attn.bias  # [C, 3H], [3H]
        hd = site.num_heads * site.head_dim
        out: dict[str, Any] = {
            "q": (w[:, :hd].t(), b[:hd]),
            "k": (w[:, hd : 2 * hd].t(), b[hd : 2 * hd]),
            "v": (w[:, 2 * hd :].t(), b[2 * hd :]),
            "o": (m.c_proj.weight.t(), m.c_proj.bias),  # Conv1D [H, C] -> Linear [C, H]
        }
        return out
    out = {"q": (q.weight, q.bias), "k": (k.weight, k.bias), "v": (v.weight, v.bias)}
    o = getattr(m, "o_proj", None)
    if isinstance(o, nn.Linear) and site.family != "gqa":
        out["o"] = (o.weight, o.bias)
    return out


def grouped_attention_from(
    m: Any, site: AttentionSite, q_groups: int, kv_groups: int
) -> GroupedAttention:
    """A :class:`GroupedAttention` with mean-pooled projections of attention ``m``."""
    proj = _projections(m, site)
    w_q = proj["q"][0]
    signature = {"separate": "bert", "qkvo": "vit", "fused": "gpt2"}.get(site.family)
    if site.family == "grouped":
        signature = m.signature
    o = proj.get("o")
    if site.family == "separate" or site.family == "qkvo":
        dropout = getattr(m, "dropout", None)
        p_drop = (
            dropout.p
            if isinstance(dropout, nn.Dropout)
            else float(getattr(m, "attention_dropout", 0.0))
        )
        resid = 0.0
    else:
        p_drop = m.attn_dropout.p
        resid = m.resid_dropout.p
    new = GroupedAttention(
        hidden_size=site.hidden_size,
        num_heads=site.num_heads,
        head_dim=site.head_dim,
        q_groups=q_groups,
        kv_groups=kv_groups,
        qkv_bias=proj["q"][1] is not None,
        out_features=int(o[0].shape[0]) if o is not None else None,
        out_bias=o is not None and o[1] is not None,
        is_causal=site.causal,
        scaling=float(getattr(m, "scaling", site.head_dim**-0.5)),
        layer_idx=getattr(m, "layer_idx", None),
        dropout=float(p_drop),
        resid_dropout=float(resid),
        signature=signature,  # type: ignore[arg-type]
        dtype=str(w_q.dtype).removeprefix("torch."),
    ).to(w_q.device)
    with torch.no_grad():
        for name, cur, new_g in (
            ("q", site.q_heads, q_groups),
            ("k", site.kv_heads, kv_groups),
            ("v", site.kv_heads, kv_groups),
        ):
            w, b = proj[name]
            target: nn.Linear = getattr(new, f"{name}_proj")
            target.weight.copy_(pool_heads(w, cur, new_g))
            if b is not None:
                assert target.bias is not None
                target.bias.copy_(pool_heads(b, cur, new_g))
        if o is not None and new.o_proj is not None:
            new.o_proj.weight.copy_(o[0])
            if o[1] is not None and new.o_proj.bias is not None:
                new.o_proj.bias.copy_(o[1])
    new.train(m.training)
    return new


def _regroup_gqa(model: nn.Module, m: Any, site: AttentionSite, kv_groups: int) -> None:
    """LLaMA-style: pool k_proj/v_proj in place of the HF module and update its attributes."""
    for name in ("k_proj", "v_proj"):
        old: nn.Linear = getattr(m, name)
        new = nn.Linear(
            old.in_features,
            kv_groups * site.head_dim,
            bias=old.bias is not None,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(pool_heads(old.weight, site.kv_heads, kv_groups))
            if old.bias is not None:
                assert new.bias is not None
                new.bias.copy_(pool_heads(old.bias, site.kv_heads, kv_groups))
        new.train(old.training)
        setattr(m, name, new)
    m.num_key_value_groups = site.num_heads // kv_groups
    if hasattr(m, "num_key_value_heads"):
        m.num_key_value_heads = kv_groups
    for cfg in {
        id(c): c for c in (getattr(m, "config", None), find_hf_config(model)) if c is not None
    }.values():
        if hasattr(cfg, "num_key_value_heads"):
            cfg.num_key_value_heads = kv_groups


def _legacy_site(model: nn.Module, match: AttentionMatch) -> AttentionSite | None:
    """The head layout of a matched attention that a dedicated rewrite handles: a class of
    :data:`GROUPED_ATTENTION_CLASSES` (replaced by `GroupedAttention`) or a LLaMA-style
    attention with its own ``num_key_value_groups`` (pooled in place, config updated)."""
    m = get_module(model, match.path)
    site = _site(match.path, m, 0)
    if site is None:
        return None
    if site.family == "gqa" or type(m).__name__ in GROUPED_ATTENTION_CLASSES:
        return site
    return None


def projection_groups(match: AttentionMatch, q: int, kv: int) -> dict[str, dict[str, Any]]:
    """Per projection module to replace: ``members`` (original rows averaged into each new
    row) and ``runs`` (where each original output feature now reads), for ``q`` query and
    ``kv`` key/value groups. Heads are grouped contiguously over the distinct heads.

    >>> from surgery.patterns import HeadRows
    >>> h = lambda mod, base: HeadRows(mod, 4, ((base, base + 1), (base + 2, base + 3)))
    >>> m = AttentionMatch("a", "softmax", h("a.q", 0), h("a.k", 0), h("a.v", 0), ("a.o",), False)
    >>> projection_groups(m, 2, 1)["a.k"]
    {'members': [[0, 2], [1, 3]], 'runs': [[0, 2], [0, 2]]}
    """
    assign: dict[str, dict[int, tuple[str, int, int]]] = {}
    features: dict[str, int] = {}
    for part, heads, target in (("q", match.q, q), ("k", match.k, kv), ("v", match.v, kv)):
        groups = heads.groups
        features[heads.module] = heads.features
        if target == len(groups):
            continue
        per = len(groups) // target
        fmap = assign.setdefault(heads.module, {})
        for j, rows in enumerate(groups):
            for t, f in enumerate(rows):
                fmap[f] = (part, j // per, t)
    out: dict[str, dict[str, Any]] = {}
    for module, fmap in assign.items():
        slot: dict[Any, int] = {}
        members: list[list[int]] = []
        index: list[int] = []
        for f in range(features[module]):
            key: Any = fmap.get(f, ("own", f))
            if key not in slot:
                slot[key] = len(members)
                members.append([])
            members[slot[key]].append(f)
            index.append(slot[key])
        out[module] = {"members": members, "runs": runs_of(index)}
    return out


def _dense(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight as ``[out, in]``, bias) of a plain dense layer; None for anything else."""
    if type(m) is nn.Linear or (isinstance(m, nn.Linear) and type(m).__name__ == "FalconLinear"):
        return m.weight, m.bias
    if is_hf_conv1d(m):
        return m.weight.t(), getattr(m, "bias", None)  # type: ignore[operator, union-attr]
    return None


def grouped_projection(
    m: nn.Module, members: list[list[int]], runs: list[list[int]]
) -> GroupedHeadsLinear:
    """A :class:`GroupedHeadsLinear` whose row ``r`` is the mean of ``m``'s rows ``members[r]``."""
    found = _dense(m)
    assert found is not None
    w, b = found
    new = GroupedHeadsLinear(
        int(w.shape[1]),
        int(w.shape[0]),
        rows=len(members),
        runs=runs,
        bias=b is not None,
        dtype=str(w.dtype).removeprefix("torch."),
    ).to(w.device)
    with torch.no_grad():
        for r, rows in enumerate(members):
            new.proj.weight[r].copy_(w[rows].mean(dim=0))
            if b is not None:
                assert new.proj.bias is not None
                new.proj.bias[r].copy_(b[rows].mean(dim=0))
    new.train(m.training)
    return new


class GroupPass(SurgeryPass[ast.Group]):
    """``group kv = G`` / ``group q = Gq kv = Gkv`` over every block's self-attention."""

    keyword: ClassVar[str] = "group"

    def _error(self, field: ast.Int, site: AttentionSite, what: str, current: int) -> PassError:
        valid = divisors(current)
        shown = ", ".join(str(v) for v in valid)
        return PassError(
            Diagnostic(
                code="S0314",
                message=(
                    f"`{what} = {field.value}` does not divide the {current} current {what} heads "
                    f"of `{site.path}`"
                ),
                span=field.span,
                notes=(
                    f"the attention has {site.num_heads} heads ({site.q_heads} query, {site.kv_heads} key/value)",
                ),
                help=f"valid choices: {shown}",
            )
        )

    def plan(self, model: nn.Module) -> StepPlan:
        ctx = self.ensure_context(model)
        stmt = self.statement
        assert isinstance(stmt, ast.Group)
        plan = self.new_plan()
        matches, why = graph_attention(model, ctx.analysis, ctx.example)
        generic: list[AttentionMatch] = []
        if matches is None:  # no graph: the module-level rules and the dedicated rewrites only
            ctx.warn(Diagnostic(code="S0313", message=str(why), span=stmt.span, severity="warning"))
            try:
                sites = attention_sites(model, ctx.analysis.attentions)
            except LookupError:
                sites = []
        else:
            sites = []
            for match in matches:
                if match.cross:
                    plan.rows.append(self._cross_row(model, match))
                    continue
                site = _legacy_site(model, match)
                if site is not None:
                    info = ctx.analysis.modules.get(match.path)
                    block = info.block if info is not None and info.block is not None else 0
                    sites.append(replace(site, block=block))
                else:
                    generic.append(match)
        if not sites and not generic:
            raise PassError(
                Diagnostic(
                    code="S0313",
                    message="`group` found no self-attention in this model",
                    span=stmt.span,
                    notes=(
                        "an attention is the pattern projections → scores → softmax → weighted "
                        "values in the exported graph; none was found"
                        + (" (the model could not be exported)" if matches is None else ""),
                    ),
                    help="`group` applies to transformer self-attention only",
                )
            )
        targets: dict[str, tuple[int, int]] = {}
        projections: dict[str, dict[str, Any]] = {}
        for match in generic:
            self._plan_generic(model, match, plan, projections)
        for site in sites:
            kv = stmt.kv.value
            if kv <= 0 or site.kv_heads % kv:
                raise self._error(stmt.kv, site, "kv", site.kv_heads)
            q = site.q_heads
            if stmt.q is not None:
                q = stmt.q.value
                if q <= 0 or site.q_heads % q:
                    raise self._error(stmt.q, site, "q", site.q_heads)
                if site.family == "gqa" and q != site.q_heads:
                    raise PassError(
                        Diagnostic(
                            code="S0312",
                            message=f"query grouping is not supported on `{type(get_module(model, site.path)).__name__}`",
                            span=stmt.q.span,
                            help=f"use `group kv = G` alone on this model (kv choices: {', '.join(map(str, divisors(site.kv_heads)))})",
                        )
                    )
            info = ctx.analysis.modules.get(site.path)
            d, c, h = site.head_dim, site.hidden_size, site.num_heads
            bias = 1 if _projections(get_module(model, site.path), site)["q"][1] is not None else 0
            per_head = c * d + bias * d
            pairs_before = len(pairing(h, site.q_heads, site.kv_heads)[0])
            pairs_after = len(pairing(h, q, kv)[0])
            flops_before = flops_after = 0
            if info is not None and info.input_shapes and len(info.input_shapes[0]) == 3:
                b, t, _ = info.input_shapes[0]
                flops_before = attention_flops(
                    t, b, c, d, site.q_heads, site.kv_heads, pairs_before
                )
                flops_after = attention_flops(t, b, c, d, q, kv, pairs_after)
            unchanged = q == site.q_heads and kv == site.kv_heads
            plan.rows.append(
                PlanRow(
                    path=site.path,
                    type=type(get_module(model, site.path)).__name__,
                    shape=f"{h} heads: q {site.q_heads}→{q}, kv {site.kv_heads}→{kv}",
                    action="skip" if unchanged else "group",
                    params_before=per_head * (site.q_heads + 2 * site.kv_heads),
                    params_after=per_head * (q + 2 * kv),
                    flops_before=flops_before,
                    flops_after=flops_after if not unchanged else flops_before,
                    detail={
                        "block": site.block,
                        "heads": h,
                        "q": q,
                        "kv": kv,
                        "pairs": pairs_after,
                        "family": site.family,
                    },
                    note="already has this grouping" if unchanged else "",
                )
            )
            if not unchanged:
                targets[site.path] = (q, kv)
        plan.data["targets"] = targets
        plan.data["projections"] = projections
        if not targets and not projections:
            plan.notes.append("every attention already has this grouping: nothing changes")
        return plan

    def _cross_row(self, model: nn.Module, match: AttentionMatch) -> PlanRow:
        m = get_module(model, match.path)
        return PlanRow(
            path=match.path,
            type=type(m).__name__,
            shape=f"{match.num_heads} heads: cross-attention",
            action="skip",
            params_before=0,
            params_after=0,
            flops_before=0,
            flops_after=0,
            detail={"heads": match.num_heads, "cross": True},
            note="cross-attention: left alone",
        )

    def _plan_generic(
        self,
        model: nn.Module,
        match: AttentionMatch,
        plan: StepPlan,
        projections: dict[str, dict[str, Any]],
    ) -> None:
        """Plan one self-attention grouped at its projections (see the module docstring)."""
        stmt = self.statement
        assert isinstance(stmt, ast.Group)
        site = AttentionSite(
            match.path,
            0,
            "qkvo",
            match.num_heads,
            match.q_heads,
            match.kv_heads,
            match.head_dim,
            0,
            False,
        )
        kv = stmt.kv.value
        if kv <= 0 or match.kv_heads % kv:
            raise self._error(stmt.kv, site, "kv", match.kv_heads)
        q = match.q_heads
        if stmt.q is not None:
            q = stmt.q.value
            if q <= 0 or match.q_heads % q:
                raise self._error(stmt.q, site, "q", match.q_heads)
        groups = projection_groups(match, q, kv)
        for proj in groups:
            m = get_module(model, proj)
            parent = proj.rpartition(".")[0]
            if isinstance(get_module(model, parent), GroupedHeadsLinear):
                raise PassError(
                    Diagnostic(
                        code="S0312",
                        message=f"the heads of `{parent}` were grouped by an earlier `group`",
                        span=stmt.span,
                        help="write one `group` statement per recipe",
                    )
                )
            if _dense(m) is None:
                raise PassError(
                    Diagnostic(
                        code="S0312",
                        message=f"`group` cannot pool the heads of `{proj}`, a `{type(m).__name__}`",
                        span=stmt.span,
                        notes=("heads are pooled in plain dense layers (`Linear`, HF `Conv1D`)",),
                        help="put `group` before statements that replace the attention projections",
                    )
                )
        d = match.head_dim
        params_before = params_after = flops_before = flops_after = 0
        for proj in dict.fromkeys(match.inputs):
            m = get_module(model, proj)
            found = _dense(m)
            assert found is not None
            w, b = found
            width = int(w.shape[1]) + (1 if b is not None else 0)
            rows = len(groups[proj]["members"]) if proj in groups else int(w.shape[0])
            params_before += width * int(w.shape[0])
            params_after += width * rows
            info = self.ensure_context(model).analysis.modules.get(proj)
            flops = info.flops if info is not None else 0
            flops_before += flops
            flops_after += flops * rows // max(int(w.shape[0]), 1)
        unchanged = not groups
        shared = f", shared by {match.calls} calls" if match.calls > 1 else ""
        plan.rows.append(
            PlanRow(
                path=match.path,
                type=type(get_module(model, match.path)).__name__,
                shape=f"{match.num_heads} heads: q {match.q_heads}→{q}, kv {match.kv_heads}→{kv}",
                action="skip" if unchanged else "group",
                params_before=params_before,
                params_after=params_after,
                flops_before=flops_before,
                flops_after=flops_after,
                detail={
                    "heads": match.num_heads,
                    "head_dim": d,
                    "q": q,
                    "kv": kv,
                    "projections": sorted(groups),
                    "family": "projections",
                },
                note="already has this grouping"
                if unchanged
                else f"pooled at the projections{shared}",
            )
        )
        for proj, g in groups.items():
            projections[proj] = {
                **g,
                "features": int(_dense(get_module(model, proj))[0].shape[0]),  # type: ignore[index]
                "attention": match.path,
                "q": q,
                "kv": kv,
                "before": (match.q_heads, match.kv_heads),
            }

    def _apply_projections(self, model: nn.Module, plan: StepPlan) -> list[Change]:
        changes: list[Change] = []
        for proj, g in plan.data.get("projections", {}).items():
            m = get_module(model, proj)
            found = _dense(m)
            if found is None or int(found[0].shape[0]) != g["features"]:
                raise self.moved(proj, f"dense layer with {g['features']} outputs")
            set_module(model, proj, grouped_projection(m, g["members"], g["runs"]))
            changes.append(
                self.change(
                    proj,
                    "group",
                    attention=g["attention"],
                    q=g["q"],
                    kv=g["kv"],
                    q_before=g["before"][0],
                    kv_before=g["before"][1],
                    rows=len(g["members"]),
                )
            )
        return changes

    def apply(self, model: nn.Module, plan: StepPlan) -> list[Change]:
        changes = self._apply_projections(model, plan)
        targets: dict[str, tuple[int, int]] = plan.data.get("targets", {})
        # Found afresh: an earlier statement may have changed the model since it was planned.
        sites = {s.path: s for s in attention_sites(model)} if targets else {}
        for path, (q, kv) in targets.items():
            site = sites.get(path)
            if site is None:
                raise PassError(
                    Diagnostic(
                        code="S0410",
                        message=f"`{path}` is no longer a supported self-attention",
                        span=self.statement.span,
                        help="an earlier statement replaced it; reorder the recipe",
                    )
                )
            m = get_module(model, path)
            if site.family == "gqa":
                _regroup_gqa(model, m, site, kv)
            else:
                set_module(model, path, grouped_attention_from(m, site, q, kv))
            changes.append(
                self.change(
                    path,
                    "group",
                    heads=site.num_heads,
                    q=q,
                    kv=kv,
                    q_before=site.q_heads,
                    kv_before=site.kv_heads,
                )
            )
        return changes
