"""`drop`: replace the least important attention or MLP sublayers by identity (2406.15786).

``drop attention N [by similarity]`` (or ``drop mlp N``) scores every block's sublayer by
``importance = 1 − cos(x_in, x_out)``: the mean over calibration tokens of how much the
sublayer turns the residual stream, and replaces the ``N`` least important with an
:class:`~surgery.modules.identity.IdentitySublayer`. Definitions per architecture:

* pre-LN blocks (GPT-2, LLaMA, ViT: ``x + f(norm(x))``): ``x_in`` is the residual stream
  entering the sublayer and ``x_out = x_in + f(norm(x_in))`` the stream leaving it (for the
  attention ``x_in`` is the block input; for the MLP, ``x_out`` is the block output). Dropping
  makes ``f`` return zeros, so the stream passes through the block's residual add.
* post-LN blocks (BERT: ``LayerNorm(x + f(x))``): ``x_in`` is the sublayer input and ``x_out``
  its normalised output; dropping makes ``sublayer + residual + LayerNorm`` the identity on the
  hidden states (``BertAttention`` → identity; ``BertIntermediate``/``BertOutput`` → pass the
  attention output through).

A sublayer module that returns more than its output and attention weights hands something on
to the later blocks (T5's attention returns ``(output, position_bias, weights)``). If it hands
on one of its own inputs unchanged (T5's later blocks pass the bias through), it can be dropped:
its stand-in (:class:`~surgery.modules.attention.HandOnIdentity`) hands the same input on. If
it computes what it hands on (T5's first block owns the relative-position bias), it stays: a
plan row and a note say so, and asking for more drops than there are eligible sublayers is
refused naming the one that stays.

Calibration batches come from ``context.calibration`` (``context.example`` if empty, else
inputs derived from the model). ``drop attention 0`` changes nothing. Ties keep the earlier block.

>>> import torch
>>> from transformers import BertConfig, BertModel
>>> from surgery.parse import parse
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
...                              intermediate_size=64, vocab_size=50)).eval()
>>> p = DropPass(parse("drop attention 1").statements[0])
>>> plan = p.ensure_context(model) and p.plan(model)
>>> len(plan.rows), len(plan.changed_rows)
(3, 1)
>>> [c.action for c in p.apply(model, plan)]
['drop']
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from surgery import ast
from surgery.diagnostics import Diagnostic
from surgery.modules.attention import HandOnIdentity
from surgery.modules.identity import IdentitySublayer
from surgery.passes.base import Change, PassError, PlanRow, StepPlan, SurgeryPass
from surgery.transformer_arch import (
    Sublayer,
    attention_sublayers,
    first_tensor,
    get_module,
    set_module,
    sublayers,
)

__all__ = ["DropPass", "sublayer_importance"]


def _hidden_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _one_minus_cos(x_in: torch.Tensor, x_out: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of 1 − cos, number of tokens) for (B, T, C) tensors."""
    cos = nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1)  # (B, T)
    return float((1.0 - cos).sum()), int(cos.numel())


def _zeroed(out: Any) -> Any:
    """A sublayer's output with its first tensor (the output) replaced by zeros."""
    if isinstance(out, tuple):
        return (torch.zeros_like(out[0]), *out[1:])
    return torch.zeros_like(out)


class _Layout(ValueError):
    """A sublayer's output does not line up with its block's stream (Swin's windows)."""


def sublayer_importance(model: nn.Module, subs: list[Sublayer], batches: list[Any]) -> list[float]:
    """Mean ``1 − cos(x_in, x_out)`` of each sublayer over ``batches`` (``Inputs``).

    A pre-LN sublayer whose output is laid out otherwise than its block's stream (Swin's
    attention works on shifted windows, padded to the window grid) cannot be lined up with the
    stream token by token. Then every pre-LN sublayer of the model is scored by ablation, so
    the scores still compare: its block runs a second time with the sublayer's output zeroed
    (what dropping it does), and ``x_in``/``x_out`` are the block's outputs without and with it.
    """
    try:
        return _importance(model, subs, batches, ablate=False)
    except _Layout:
        return _importance(model, subs, batches, ablate=True)


def _importance(
    model: nn.Module, subs: list[Sublayer], batches: list[Any], *, ablate: bool
) -> list[float]:
    total: dict[int, float] = defaultdict(float)
    count: dict[int, int] = defaultdict(int)
    seen: dict[str, Any] = {}
    handles = []
    rerun = [False]  # inside an ablation rerun of a block: the hooks stand aside

    def add(i: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        s, n = _one_minus_cos(x_in, x_out)
        total[i] += s
        count[i] += n

    for i, sub in enumerate(subs):
        if sub.norm == "post":

            def pre(
                _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i
            ) -> None:
                seen[f"in{i}"] = _hidden_arg(args, kwargs)

            def post(_m: nn.Module, _a: Any, _k: Any, out: Any, i: int = i) -> None:
                add(i, seen.pop(f"in{i}"), first_tensor(out))

            handles.append(
                get_module(model, sub.score_in).register_forward_pre_hook(pre, with_kwargs=True)
            )
            handles.append(
                get_module(model, sub.score_out).register_forward_hook(post, with_kwargs=True)
            )
        else:
            block = get_module(model, sub.block_path)
            sublayer = get_module(model, sub.score_out)

            def bpre(
                _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i
            ) -> None:
                if not rerun[0]:
                    seen[f"in{i}"] = (args, kwargs)

            def spost(_m: nn.Module, _a: Any, _k: Any, out: Any, i: int = i) -> None:
                if not rerun[0]:
                    seen[f"sub{i}"] = first_tensor(out)

            def bpost(
                m: nn.Module,
                _a: Any,
                _k: Any,
                out: Any,
                i: int = i,
                kind: str = sub.kind,
                sublayer: nn.Module = sublayer,
            ) -> None:
                if rerun[0]:
                    return
                args, kwargs = seen.pop(f"in{i}")
                x_block_in, f = _hidden_arg(args, kwargs), seen.pop(f"sub{i}")
                x_block_out = first_tensor(out)
                if not ablate and f.shape != x_block_in.shape:
                    raise _Layout(f"`{subs[i].score_out}` works on another layout of the tokens")
                if ablate:  # the block's output without the sublayer, and with it
                    zero = sublayer.register_forward_hook(lambda _m, _a, o: _zeroed(o))
                    rerun[0] = True
                    try:
                        without = first_tensor(m(*args, **kwargs))
                    finally:
                        rerun[0] = False
                        zero.remove()
                    add(i, without, x_block_out)
                elif kind == "attention":  # stream before / after the attention's residual add
                    add(i, x_block_in, x_block_in + f)
                else:  # stream before / after the MLP's residual add (the block output)
                    add(i, x_block_out - f, x_block_out)

            handles.append(block.register_forward_pre_hook(bpre, with_kwargs=True))
            handles.append(sublayer.register_forward_hook(spost, with_kwargs=True))
            handles.append(block.register_forward_hook(bpost, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                batch.call(model)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [total[i] / max(count[i], 1) for i in range(len(subs))]


@dataclass
class _Returned:
    """What one sublayer module returned on a run: ``items`` (0: a tensor), and for the items
    between its output and its attention weights (``1 .. items−2``) which input each hands on
    unchanged (``[name, position]``), or None for one it computes itself (T5's first block,
    which makes the relative-position bias the later blocks reuse)."""

    items: int
    passes: list[list[Any] | None]

    @property
    def computes(self) -> list[int]:
        return [j + 1 for j, p in enumerate(self.passes) if p is None]


def _returns(model: nn.Module, subs: list[Sublayer], batch: Any) -> dict[str, _Returned]:
    """What each sublayer module returns (its replacement must return the same), from one run."""
    seen: dict[str, _Returned] = {}
    handles = []
    for sub in subs:
        for p in sub.replace:
            module = get_module(model, p)
            try:
                params = list(inspect.signature(module.forward).parameters)
            except (TypeError, ValueError):
                params = []

            def hook(
                _m: nn.Module,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                out: Any,
                p: str = p,
                params: list[str] = params,
            ) -> None:
                if p in seen:
                    return
                if not isinstance(out, tuple):
                    seen[p] = _Returned(0, [])
                    return
                passes: list[list[Any] | None] = []
                for item in out[1:-1]:
                    named = [
                        [n, params.index(n) if n in params else -1]
                        for n, v in kwargs.items()
                        if v is item
                    ]
                    named += [
                        [params[i], i] for i, v in enumerate(args) if v is item and i < len(params)
                    ]
                    passes.append(named[0] if named else None)
                seen[p] = _Returned(len(out), passes)

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            batch.call(model)
    except Exception:  # the scoring run reports a model that does not run
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


class DropPass(SurgeryPass[ast.Drop]):
    """``drop attention|mlp N [by similarity]``."""

    keyword: ClassVar[str] = "drop"

    def _batches(self, model: nn.Module) -> list[Any]:
        ctx = self.ensure_context(model)
        if ctx.calibration:
            return list(ctx.calibration)
        if ctx.example is not None:
            return [ctx.example]
        from surgery.inputs import example_inputs

        return [example_inputs(model)]

    def plan(self, model: nn.Module) -> StepPlan:
        ctx = self.ensure_context(model)
        stmt = self.statement
        assert isinstance(stmt, ast.Drop)
        plan = self.new_plan()
        kind = stmt.sublayer.value
        if kind not in ("attention", "mlp"):
            raise PassError(
                Diagnostic(
                    code="S0331",
                    message=f"`drop` takes `attention` or `mlp`, not `{kind}`",
                    span=stmt.sublayer.span,
                    help="write `drop attention N` or `drop mlp N`",
                )
            )
        # `by` is not re-checked: `check` rejects any importance but `similarity` (S0201).
        why: str | None = None
        if kind == "attention":  # the attention sites of the exported graph's patterns
            subs, why = attention_sublayers(model, ctx.analysis, ctx.example)
        else:
            try:
                subs = sublayers(model, kind, ctx.analysis.attentions)  # type: ignore[arg-type]
            except LookupError:
                subs = []
        n = stmt.count.value
        if n < 0 or n > len(subs):
            if not subs and why is None:
                why = (
                    f"`{type(model).__name__}` has no repeated transformer blocks with {kind} "
                    "sublayers"
                )
            raise PassError(
                Diagnostic(
                    code="S0333",
                    message=f"cannot drop {n} {kind} sublayers: the model has {len(subs)} that can be dropped",
                    span=stmt.count.span,
                    notes=(why,) if why else (),
                    help=f"valid range: 0..{len(subs)}"
                    + ("; to remove whole blocks use `truncate blocks keep K`" if not subs else ""),
                )
            )
        returned = _returns(model, subs, self._batches(model)[0]) if n > 0 else {}
        # Items a module returns besides its output and weights that later blocks read: one
        # that hands its own input on can be replaced (the stand-in hands it on too); one that
        # computes it (T5's first block: the relative-position bias) must stay.
        named = {
            j: p[0] for r in returned.values() for j, p in enumerate(r.passes, 1) if p is not None
        }
        stays: dict[int, str] = {}
        for i, sub in enumerate(subs):
            for p in sub.replace:
                r = returned.get(p)
                if r is not None and r.computes:
                    what = ", ".join(
                        f"`{named[j]}`" if j in named else f"item {j} of its output"
                        for j in r.computes
                    )
                    stays[i] = (
                        f"`{p}` (block {sub.block}) computes the {what} it hands on to the "
                        "later blocks, which read it (T5's first block owns the "
                        "relative-position bias)"
                    )
        eligible = [i for i in range(len(subs)) if i not in stays]
        if n > len(eligible):
            raise PassError(
                Diagnostic(
                    code="S0333",
                    message=f"cannot drop {n} {kind} sublayers: {len(eligible)} of the "
                    f"{len(subs)} {kind} sublayers of `{type(model).__name__}` can be dropped",
                    span=stmt.count.span,
                    notes=tuple(stays.values())[:1],
                    help=f"valid range: 0..{len(eligible)}; to remove whole blocks use "
                    "`truncate blocks keep K`",
                )
            )
        scores = (
            sublayer_importance(model, subs, self._batches(model)) if n > 0 else [0.0] * len(subs)
        )
        order = sorted(eligible, key=lambda i: (scores[i], subs[i].block))
        chosen = set(order[:n])
        replace: dict[str, tuple[str, bool, int | None, list[Any] | None]] = {}
        for i, sub in enumerate(subs):
            paths = list(sub.replace)
            infos = [ctx.analysis.modules.get(p) for p in paths]
            params = sum(
                int(sum(p.numel() for p in get_module(model, q).parameters())) for q in paths
            )
            flops = sum(info.flops for info in infos if info is not None)
            plan.rows.append(
                PlanRow(
                    path=paths[0] if len(paths) == 1 else sub.block_path,
                    type=type(get_module(model, paths[0])).__name__,
                    shape=f"block {sub.block} {kind} ({sub.norm}-LN)",
                    action="drop" if i in chosen else "skip",
                    params_before=params,
                    params_after=0 if i in chosen else params,
                    flops_before=flops,
                    flops_after=0 if i in chosen else flops,
                    detail={
                        "block": sub.block,
                        "importance": round(scores[i], 8),
                        "replaces": paths,
                    },
                    note=""
                    if i in chosen
                    else "kept: hands on what it computes"
                    if i in stays
                    else "kept: more important",
                )
            )
            if i in chosen:
                for p, (mode, tup) in sub.replace.items():
                    # a decoder's dropped attention still marks its layer in the kv cache
                    layer_idx = getattr(get_module(model, p), "layer_idx", None)
                    if not isinstance(layer_idx, int) or kind != "attention":
                        layer_idx = None
                    r = returned.get(p, _Returned(2 if tup else 0, []))
                    passes = r.passes if r.items > 2 else None
                    replace[p] = (mode, bool(r.items), layer_idx, passes)
        plan.data["replace"] = replace
        plan.notes.extend(f"kept: {why}" for why in stays.values())
        if n == 0:
            plan.notes.append("dropping 0 sublayers changes nothing")
        return plan

    def apply(self, model: nn.Module, plan: StepPlan) -> list[Change]:
        stmt = self.statement
        assert isinstance(stmt, ast.Drop)
        replace: dict[str, tuple[str, bool, int | None, list[Any] | None]] = plan.data.get(
            "replace", {}
        )
        changes: list[Change] = []
        for path, (mode, tup, layer_idx, passes) in replace.items():
            stand_in = (
                HandOnIdentity(mode, passes=passes, layer_idx=layer_idx)  # type: ignore[arg-type]
                if passes is not None
                else IdentitySublayer(mode, returns_tuple=tup, layer_idx=layer_idx)  # type: ignore[arg-type]
            )
            set_module(model, path, stand_in)
            changes.append(self.change(path, "drop", sublayer=stmt.sublayer.value, mode=mode))
        return changes
