"""What the transformer passes need to know about HF-style architectures.

The ``group``, ``skip``, ``drop`` and ``truncate`` passes all ask the same questions of a
model: where are the repeated blocks, where is each block's attention and MLP, how many
query/key-value heads does an attention have, is its layer-norm placement pre- or post-residual,
and does the model have a CLS token.

*Where* the attention is, this module never decides itself: it reads the attention units of the
dependency graph (:func:`surgery.graph.attention_units`, stored by ``analyze`` as
``Analysis.attentions``; the passes hand over their analysis's units, other callers let them be
found afresh). Every function that takes ``units`` builds on that one answer. What a graph cannot
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

from surgery.facts import AttentionUnit
from surgery.graph import attention_units

__all__ = [
    "AttentionSite",
    "Family",
    "Sublayer",
    "attention_of_block",
    "attention_sites",
    "block_list",
    "divisors",
    "find_hf_config",
    "get_module",
    "has_cls_token",
    "is_hf_conv1d",
    "set_module",
    "sublayers",
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
    if any(n.rsplit(".", 1)[-1] == "cls_token" for n, _ in model.named_parameters()):
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


def first_tensor(obj: Any) -> torch.Tensor:
    """The hidden states in a module output: the tensor itself or the first item of a tuple."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    raise TypeError(f"no tensor in module output of type `{type(obj).__name__}`")
