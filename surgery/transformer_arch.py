"""What the transformer passes need to know about HF-style architectures.

The ``group``, ``skip``, ``drop`` and ``truncate`` passes all ask the same questions of a
model: where are the repeated blocks, where is each block's attention and MLP, how many
query/key-value heads does an attention have, is its layer-norm placement pre- or post-residual,
and does the model have a CLS token.

*Where* the attention is, this module never decides itself: it reads the attention sites the
graph patterns found (:mod:`surgery.patterns`, kept by ``analyze`` on the dependency graph;
:func:`graph_attention`, :func:`traced_analysis`), or, where the model cannot be exported, the
attention units of the module-level rules (:func:`surgery.graph.attention_units`). Blocks and
stages are :func:`block_stacks`: repeated modules holding residual adds, grouped into the stages
of one stack. What a graph cannot say is kept in small tables here and in the passes (the HF
attention classes `GroupedAttention` can stand in for, which config key counts the blocks). Every function that takes ``units`` builds on that one answer. What a graph cannot
say is added here, from module structure alone (attribute and class names of the HF
implementations in transformers 5.x, so it also works on models built from a config without
running them): an attention's family and head layout, which module list holds the blocks, and
where a block's sublayers begin and end.

Attention families (``AttentionSite.family``):

=============  =================================================  ===============================
``separate``   BERT-style ``query``/``key``/``value`` (``o`` lives   HF ``BertSelfAttention``,
               in a sibling ``output.dense``)                        RoBERTa, ...
``qkvo``       ``q_proj``/``k_proj``/``v_proj``/``o_proj``, no kv   HF ``ViTAttention`` (5.x)
               grouping of its own, not causal
``fused``      one HF ``Conv1D`` ``c_attn`` ``[in, 3·hidden]`` and   HF ``GPT2Attention``
               ``c_proj``
``gqa``        ``q_proj``/``k_proj``/``v_proj``/``o_proj`` with      LLaMA, Mistral, Qwen2
               ``num_key_value_groups`` and rotary embeddings
``grouped``    a :class:`~surgery.modules.attention.GroupedAttention`  (already grouped by surgery)
=============  =================================================  ===============================

>>> from transformers import BertConfig, BertModel
>>> cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
...                  intermediate_size=64, vocab_size=50)
>>> model = BertModel(cfg)
>>> [(s.path, s.family, s.num_heads, s.kv_heads) for s in attention_sites(model)][:1]
[('encoder.layer.0.attention.self', 'separate', 4, 4)]
>>> block_list(model)[0], has_cls_token(model)
('encoder.layer', True)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from surgery.facts import Analysis, AttentionUnit
from surgery.graph import attention_units
from surgery.patterns import AttentionMatch

__all__ = [
    "GROUPED_ATTENTION_CLASSES",
    "AttentionSite",
    "Family",
    "Stack",
    "Sublayer",
    "attention_of_block",
    "attention_sites",
    "attention_sublayers",
    "block_list",
    "block_stacks",
    "config_of",
    "divisors",
    "find_hf_config",
    "get_module",
    "graph_attention",
    "has_cls_token",
    "is_hf_conv1d",
    "set_module",
    "sublayers",
    "traced_analysis",
]

Family = Literal["separate", "qkvo", "fused", "gqa", "grouped"]


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention module and its head layout.

    ``num_heads`` is the number of attention heads (output slots), ``q_heads`` the number of
    distinct query projections (``num_heads`` unless query-grouped) and ``kv_heads`` the
    number of key/value projections.
    """

    path: str
    block: int
    family: Family
    num_heads: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    causal: bool


@dataclass(frozen=True)
class Sublayer:
    """The attention or MLP sublayer of one block and what replacing it by identity means.

    ``replace`` maps module paths to the :class:`~surgery.modules.identity.IdentitySublayer`
    mode that makes the sublayer vanish: for post-LN blocks (BERT) the whole
    ``sublayer + residual + LayerNorm`` becomes the identity on the hidden states; for pre-LN
    blocks (GPT-2, LLaMA, ViT) the sublayer returns zeros, so the block's own residual add
    passes the stream through unchanged.
    """

    block: int
    kind: Literal["attention", "mlp"]
    block_path: str
    norm: Literal["pre", "post"]
    score_in: str  # post-LN: module whose first input is x_in; pre-LN: the block
    score_out: str  # post-LN: module whose output is x_out; pre-LN: the sublayer itself
    replace: dict[str, tuple[str, bool]]  # path -> (identity mode, returns a tuple)


# The per-family table: what a graph cannot tell. `GroupedAttention` replaces a whole attention
# module and must take its call signature and return value, so it is used only for the HF
# classes it was written against; every other self-attention the patterns find is grouped at
# its projections (`surgery.modules.grouped_heads`).
GROUPED_ATTENTION_CLASSES = frozenset(
    {
        "BertSelfAttention",
        "RobertaSelfAttention",
        "ElectraSelfAttention",
        "XLMRobertaSelfAttention",
        "CamembertSelfAttention",
        "ViTAttention",
        "DeiTAttention",
        "GPT2Attention",
        "GroupedAttention",
    }
)


def graph_attention(
    model: nn.Module, analysis: Analysis | None = None, example: Any = None
) -> tuple[list[AttentionMatch] | None, str | None]:
    """(attention sites the graph patterns find, None) or (None, why not).

    Read from ``analysis`` when it was traced on this model; otherwise ``model`` is exported
    afresh on ``example`` (or inputs derived from it). None when export fails: callers fall
    back to the module-level rules, with the reason as a warning.
    """
    traced = traced_analysis(model, analysis, example)
    if traced.traced and "attention" in traced.graph.graph:
        return list(traced.graph.graph["attention"]), None
    return None, (traced.warnings or ["could not trace the model"])[-1]


def traced_analysis(
    model: nn.Module, analysis: Analysis | None = None, example: Any = None
) -> Analysis:
    """``analysis`` if it holds the exported graph's facts for ``model``, else a fresh
    :func:`~surgery.graph.analyze` with tracing on ``example`` (or inputs derived from the
    model). Its ``traced`` says whether export worked (``warnings`` why not)."""
    from surgery.graph import analyze

    if analysis is not None and analysis.traced and "attention" in analysis.graph.graph:
        return analysis
    if example is None:
        from surgery.inputs import example_inputs

        try:
            example = example_inputs(model)
        except Exception:
            example = None
    return analyze(model, example) if example is not None else analyze(model, None)


def get_module(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)`` that also accepts ``""`` for the root."""
    return root if not path else root.get_submodule(path)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (ModuleList items by index)."""
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and name.isdigit():
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def is_hf_conv1d(m: nn.Module) -> bool:
    """HF ``Conv1D`` (GPT-2): a Linear whose weight is stored ``[in, out]``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "weight")


def find_hf_config(model: nn.Module) -> Any | None:
    """The HF config of ``model`` (or of its first submodule that has one)."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            return cfg
    return None


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n`` in increasing order: the valid head-group counts.

    >>> divisors(12)
    [1, 2, 3, 4, 6, 12]
    """
    return [d for d in range(1, n + 1) if n % d == 0]


def _forward_params(m: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(m.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _site(path: str, m: Any, block: int) -> AttentionSite | None:
    """The head layout of one attention module the graph found, if its family is in the table
    above; None for any other module (cross-attention, unknown layouts)."""
    from surgery.modules.attention import GroupedAttention

    name = type(m).__name__
    if "Cross" in name or getattr(m, "is_cross_attention", False):
        return None
    if isinstance(m, GroupedAttention):
        return AttentionSite(
            path,
            block,
            "grouped",
            m.num_heads,
            m.q_groups,
            m.kv_groups,
            m.head_dim,
            m.hidden_size,
            m.is_causal,
        )
    lin = nn.Linear
    if all(isinstance(getattr(m, a, None), lin) for a in ("query", "key", "value")):
        h = int(getattr(m, "num_attention_heads", 0))
        if h <= 0:
            return None
        q: nn.Linear = m.query  # type: ignore[assignment]
        return AttentionSite(
            path,
            block,
            "separate",
            h,
            h,
            h,
            q.out_features // h,
            q.in_features,
            bool(getattr(m, "is_causal", False)),
        )
    if is_hf_conv1d(getattr(m, "c_attn", nn.Identity())) and hasattr(m, "num_heads"):
        h = int(m.num_heads)
        c_attn = m.c_attn
        hidden = int(c_attn.weight.shape[0])  # type: ignore[union-attr, index]
        return AttentionSite(
            path,
            block,
            "fused",
            h,
            h,
            h,
            int(m.head_dim),
            hidden,
            bool(getattr(m, "is_causal", True)),
        )
    if (
        all(
            isinstance(getattr(getattr(m, a, None), "out_features", None), int)
            for a in ("q_proj", "k_proj", "v_proj")
        )
        and isinstance(getattr(m, "out_proj", None), lin)
        and isinstance(getattr(m, "head_dim", None), int)
        and type(m).__name__.startswith("CLIP")
    ):  # CLIP: q/k/v_proj + out_proj, bidirectional in the vision tower
        q_proj_: Any = m.q_proj  # a Linear, or a GroupedHeadsLinear after `group`
        return AttentionSite(
            path,
            block,
            "qkvo",
            q_proj_.out_features // int(m.head_dim),
            q_proj_.out_features // int(m.head_dim),
            m.k_proj.out_features // int(m.head_dim),  # type: ignore[union-attr, operator]
            int(m.head_dim),
            q_proj_.in_features,
            bool(getattr(m, "is_causal", False)),
        )
    if all(isinstance(getattr(m, a, None), lin) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
        head_dim = int(getattr(m, "head_dim", 0))
        if head_dim <= 0:
            return None
        q_proj: nn.Linear = m.q_proj  # type: ignore[assignment]
        k_proj: nn.Linear = m.k_proj  # type: ignore[assignment]
        h = q_proj.out_features // head_dim
        kv = k_proj.out_features // head_dim
        if hasattr(m, "num_key_value_groups") or "position_embeddings" in _forward_params(m):
            return AttentionSite(
                path,
                block,
                "gqa",
                h,
                h,
                kv,
                head_dim,
                q_proj.in_features,
                bool(getattr(m, "is_causal", True)),
            )
        return AttentionSite(
            path,
            block,
            "qkvo",
            h,
            h,
            kv,
            head_dim,
            q_proj.in_features,
            bool(getattr(m, "is_causal", False)),
        )
    return None


def _units(model: nn.Module, units: Sequence[AttentionUnit] | None) -> Sequence[AttentionUnit]:
    return attention_units(model) if units is None else units


def _sites(model: nn.Module, units: Iterable[AttentionUnit]) -> list[AttentionSite]:
    """The attention units whose module is of a family in the table above, in module order."""
    sites = (_site(unit.path, get_module(model, unit.path), 0) for unit in units)
    return [site for site in sites if site is not None]


def _item_of(list_path: str, path: str) -> tuple[int, str] | None:
    """(item index, path inside the item) of ``path`` strictly inside an item of the
    ``ModuleList`` at ``list_path``; None elsewhere."""
    prefix = f"{list_path}." if list_path else ""
    if not path.startswith(prefix):
        return None
    item, _, rel = path[len(prefix) :].partition(".")
    return (int(item), rel) if item.isdigit() and rel else None


def block_list(
    model: nn.Module, units: Sequence[AttentionUnit] | None = None
) -> tuple[str, nn.ModuleList]:
    """The repeated transformer blocks: the longest ``ModuleList`` of one class whose items hold
    an attention of a known family.

    Raises ``LookupError`` when the model has none.
    """
    sites = _sites(model, _units(model, units))
    best: tuple[str, nn.ModuleList] | None = None
    for path, m in model.named_modules():
        inner = getattr(m, "inner", None)  # a TokenSkipLayers wrapper stands for its list
        lst = inner if isinstance(inner, nn.ModuleList) and not isinstance(m, nn.ModuleList) else m
        if not isinstance(lst, nn.ModuleList) or len(lst) == 0:
            continue
        if lst is not m:
            path = f"{path}.inner"
        # Blocks share one class; a block whose attention was dropped still counts.
        if len({type(item) for item in lst}) != 1 or not any(
            _item_of(path, s.path) is not None for s in sites
        ):
            continue
        if best is None or len(lst) > len(best[1]):
            best = (path, lst)
    if best is None:
        raise LookupError("no repeated transformer blocks (a ModuleList of layers with attention)")
    return best


def attention_of_block(block: nn.Module) -> tuple[str, AttentionSite] | None:
    """(relative path, site) of the first attention of a known family inside one block."""
    sites = _sites(block, attention_units(block))
    return (sites[0].path, sites[0]) if sites else None


def attention_sites(
    model: nn.Module, units: Sequence[AttentionUnit] | None = None
) -> list[AttentionSite]:
    """Every block's (first) self-attention of a known family, in block order, with full
    dotted paths."""
    units = _units(model, units)
    path, _ = block_list(model, units)
    first: dict[int, AttentionSite] = {}
    for s in _sites(model, units):  # module order: the first one of each block wins
        found = _item_of(path, s.path)
        if found is not None:
            first.setdefault(found[0], replace(s, block=found[0]))
    return [first[i] for i in sorted(first)]


def has_cls_token(model: nn.Module, units: Sequence[AttentionUnit] | None = None) -> bool:
    """True for encoders whose position 0 is a CLS token (ViT, BERT-style text encoders).

    Causal (decoder) attention rules it out; a ``cls_token`` parameter (ViT, DeiT) or a
    bidirectional BERT-family text encoder (whose tokenizer prepends ``[CLS]``/``<s>``) has one.
    """
    try:
        sites = attention_sites(model, units)
    except LookupError:
        return False
    if not sites or any(s.causal for s in sites):
        return False
    if any(
        n.rsplit(".", 1)[-1] in ("cls_token", "class_embedding")
        for n, _ in model.named_parameters()
    ):
        return True
    cfg = find_hf_config(model)
    if cfg is not None and (
        getattr(cfg, "is_decoder", False) or getattr(cfg, "is_encoder_decoder", False)
    ):
        return False
    return (
        all(s.family in ("separate", "grouped") for s in sites)
        and cfg is not None
        and hasattr(cfg, "type_vocab_size")
    )


def _child_path(block: nn.Module, *names: str) -> str | None:
    for n in names:
        try:
            block.get_submodule(n)
        except AttributeError:
            continue
        return n
    return None


def _attention_child(bpath: str, block: nn.Module, units: Sequence[AttentionUnit]) -> str | None:
    """The child of the block at ``bpath`` that holds its first attention unit (of any family),
    unless that child is a list of nested blocks rather than a sublayer."""
    prefix = f"{bpath}."
    for unit in units:
        if unit.path.startswith(prefix):
            child = unit.path[len(prefix) :].split(".", 1)[0]
            return None if isinstance(block.get_submodule(child), nn.ModuleList) else child
    return None


def sublayers(
    model: nn.Module,
    kind: Literal["attention", "mlp"],
    units: Sequence[AttentionUnit] | None = None,
) -> list[Sublayer]:
    """The attention or MLP sublayer of every block, with how to score and remove it.

    A block's attention sublayer is its child that holds the block's attention unit; its MLP is
    the child named ``mlp``/``feed_forward``/``ffn`` (BERT: ``intermediate`` + ``output``), since
    a graph cannot tell where an MLP module begins (a fused-expert MoE has no projection to find).
    """
    from surgery.modules.identity import IdentitySublayer

    units = _units(model, units)
    path, blocks = block_list(model, units)
    found: list[Sublayer] = []
    for i, blk in enumerate(blocks):
        bpath = f"{path}.{i}"
        att = _attention_child(bpath, blk, units)  # None once dropped: an identity has no unit
        if att is not None and _child_path(blk, f"{att}.output.LayerNorm") is not None:
            # post-LN (BERT): the attention child is BertAttention (self + output incl. the
            # residual LayerNorm)
            if kind == "attention":
                p = f"{bpath}.{att}"
                found.append(Sublayer(i, kind, bpath, "post", p, p, {p: ("input", True)}))
            else:
                inter, out = _child_path(blk, "intermediate"), _child_path(blk, "output")
                if (
                    inter is None
                    or out is None
                    or isinstance(blk.get_submodule(out), IdentitySublayer)
                ):
                    continue
                pi, po = f"{bpath}.{inter}", f"{bpath}.{out}"
                found.append(
                    Sublayer(
                        i,
                        kind,
                        bpath,
                        "post",
                        pi,
                        po,
                        {pi: ("input", False), po: ("residual", False)},
                    )
                )
            continue
        if kind == "attention":
            name = att
            tuple_out = True
        else:
            name = _child_path(blk, "mlp", "feed_forward", "ffn")
            tuple_out = False
        if name is None or isinstance(blk.get_submodule(name), IdentitySublayer):
            continue
        p = f"{bpath}.{name}"
        found.append(Sublayer(i, kind, bpath, "pre", bpath, p, {p: ("zero", tuple_out)}))
    return found


# --- stacks of repeated blocks (truncate) ------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """One chain of repeated blocks: a single list (a transformer's layers) or the stages of a
    hierarchical model, in forward order (Swin's ``layers.i.blocks``, a CNN's
    ``stages.i.layers``). ``fixed`` are the positions (over the whole stack) that must stay:
    the first block of every stage (it downsamples, and a stage cannot be empty), and a first
    block with parameters the list's other items lack (T5's block 0, which owns the
    relative-position bias), since the architecture is rebuilt from its config by position.
    """

    lists: tuple[str, ...]
    sizes: tuple[int, ...]
    fixed: frozenset[int]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def locate(self, i: int) -> tuple[int, int]:
        """(list index, item index) of stack position ``i``."""
        for li, n in enumerate(self.sizes):
            if i < n:
                return li, i
            i -= n
        raise IndexError(i)


def _param_shapes(m: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((n, tuple(p.shape)) for n, p in m.named_parameters())


def _shape_preserving(analysis: Analysis | None, path: str) -> bool:
    info = analysis.modules.get(path) if analysis is not None else None
    if info is None or not info.input_shapes or not info.output_shapes:
        return True  # not measured: nothing says otherwise
    return info.input_shapes[0] == info.output_shapes[0]


def block_stacks(model: nn.Module, analysis: Analysis | None = None) -> list[Stack]:
    """The stacks of repeated blocks of ``model``.

    A candidate list is a ``ModuleList``/``Sequential`` whose items are non-leaf modules of one
    class; lists at the same place of the items of an outer list (``layers.0.blocks``,
    ``layers.1.blocks``) are the stages of one stack. A stack is kept when it has at least two
    blocks, every block but a list's first keeps its input's shape (recorded on the analysis
    inputs) and, where the analysis holds the exported graph, every block holds a residual add
    (a repeated subgraph between residual adds); of two nested stacks the inner one wins
    (Swin's blocks, not its stages). Without a graph the outer one wins (a ResNet block, not
    the conv layers inside it).
    """
    import re

    lists: dict[str, list[tuple[str, nn.ModuleList | nn.Sequential]]] = {}
    for path, m in model.named_modules():
        if not path or not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) == 0:
            continue
        items = list(m)
        if len({type(x) for x in items}) != 1 or not any(True for _ in items[0].children()):
            continue
        key = re.sub(r"\.\d+\.", ".*.", f".{path}.").strip(".")
        lists.setdefault(key, []).append((path, m))
    residual: set[str] | None = None
    if analysis is not None and analysis.traced:
        residual = analysis.graph.graph.get("residual")
    stacks: list[Stack] = []
    for group in lists.values():
        total = sum(len(m) for _, m in group)
        if total < 2:
            continue
        if residual is not None and not all(
            f"{path}.{i}" in residual for path, m in group for i in range(len(m))
        ):
            continue  # a block holds a residual add
        ok = all(
            _shape_preserving(analysis, f"{path}.{i}")
            for path, m in group
            for i in range(1, len(m))
        )
        if not ok:
            continue
        fixed: set[int] = set()
        offset = 0
        for _, m in group:
            names = [{n for n, _ in _param_shapes(x)} for x in m]
            if len(group) > 1 or (len(names) > 1 and names[0] > names[1]):
                fixed.add(offset)  # a stage's first block; a first block with more parameters
            offset += len(m)
        stacks.append(
            Stack(tuple(p for p, _ in group), tuple(len(m) for _, m in group), frozenset(fixed))
        )

    def inside(a: Stack, b: Stack) -> bool:
        return any(x.startswith(y + ".") for x in a.lists for y in b.lists)

    if residual is not None:  # stages hold blocks: the innermost residual blocks win
        return [s for s in stacks if not any(inside(o, s) for o in stacks if o is not s)]
    # Without a graph, blocks nest lists of their own (a ResNet block's convs): the outermost.
    return [s for s in stacks if not any(inside(s, o) for o in stacks if o is not s)]


def config_of(model: nn.Module, path: str) -> Any | None:
    """The HF config of the innermost module on ``path`` that has one (CLIP's text tower has
    its own), else the model's."""
    parts = path.split(".") if path else []
    for n in range(len(parts), -1, -1):
        try:
            m = get_module(model, ".".join(parts[:n]))
        except AttributeError:
            continue
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            return cfg
    return None


def attention_sublayers(
    model: nn.Module, analysis: Analysis | None = None, example: Any = None
) -> tuple[list[Sublayer], str | None]:
    """Every block's self-attention sublayer as the graph patterns find it, with how to remove
    it; or ([], why none can be removed). Without a graph: :func:`sublayers` by module names.

    The sublayer is the smallest module holding the attention's q/k/v and output projections.
    In a BERT-style post-LN block whose attention module also holds the residual LayerNorm
    (``attention.output.LayerNorm``) the whole module becomes the identity (``input``); an
    attention that adds the residual itself (BLOOM's ``forward(hidden, residual, ...)``)
    returns the residual; any other returns zeros, so the block's own residual add passes the
    stream (in a post-LN block the block's LayerNorm still applies). Not removable: an attention
    shared by several blocks (ALBERT); `drop` also refuses one that returns more than its output
    and weights (T5 passes its relative-position bias on to the next blocks).
    """
    traced = traced_analysis(model, analysis, example)
    matches = traced.graph.graph.get("attention") if traced.traced else None
    if matches is None:
        return sublayers(model, "attention", traced.attentions), None
    selfs = [m for m in matches if not m.cross]
    if not selfs:
        return [], f"`{type(model).__name__}` has no self-attention"
    shared = [m for m in selfs if m.calls > 1]
    if shared:
        return [], (
            f"its blocks run one shared layer (`{shared[0].path}` is called {shared[0].calls} "
            "times): removing its attention would remove it from every block"
        )
    found: list[Sublayer] = []
    for stack in block_stacks(model, traced):
        for i in range(stack.total):
            li, j = stack.locate(i)
            bpath = f"{stack.lists[li]}.{j}"
            match = next((m for m in selfs if m.path.startswith(bpath + ".")), None)
            if match is None:
                continue
            blk = get_module(model, bpath)
            owner = _common_parent((*match.inputs, *match.out, match.path + ".x"))
            if not owner.startswith(bpath + "."):
                continue
            rel = owner[len(bpath) + 1 :]
            post = _child_path(blk, f"{rel}.output.LayerNorm")
            if post is None and "." in rel:  # BERT: the unit's parent holds `self` and `output`
                parent = rel.rsplit(".", 1)[0]
                if _child_path(blk, f"{parent}.output.LayerNorm") is not None:
                    rel, owner, post = parent, f"{bpath}.{parent}", parent
            if post is not None:
                found.append(
                    Sublayer(i, "attention", bpath, "post", owner, owner, {owner: ("input", True)})
                )
                continue
            mode = "residual" if "residual" in _forward_params(get_module(model, owner)) else "zero"
            found.append(
                Sublayer(i, "attention", bpath, "pre", bpath, owner, {owner: (mode, True)})
            )
    return found, None if found else "no block holds a self-attention of its own"


def _common_parent(paths: Iterable[str]) -> str:
    parents = [p.rsplit(".", 1)[0] if "." in p else "" for p in paths]
    common: list[str] = []
    for level in zip(*(p.split(".") for p in parents), strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def first_tensor(obj: Any) -> torch.Tensor:
    """The hidden states in a module output: the tensor itself or the first item of a tuple."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    raise TypeError(f"no tensor in module output of type `{type(obj).__name__}`")
