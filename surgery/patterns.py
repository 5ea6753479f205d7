"""Attention found in a ``torch.export`` graph by patterns written as data.

An attention site is the pattern *q/k/v projections → (reshape to heads) → scores → softmax →
weighted values → output projection*. It is matched on the aten graph ``analyze`` already
exports, never from family names:

* a **core** is either one ``scaled_dot_product_attention`` node (``q``, ``k``, ``v`` are its
  first three arguments), or a ``softmax`` node whose input is reached from a matrix product
  ``q @ kᵀ`` through score ops (scaling, masks, additive position biases: T5, DeBERTa, Swin,
  ALiBi's ``baddbmm``: a bias changes no projection, so it is simply passed) and whose output reaches a matrix product ``p @ v`` through probability
  ops (dropout, casts); see :data:`CORES`;
* each of ``q``, ``k``, ``v`` is followed back through data-movement ops (views, transposes,
  splits of a fused projection, slices, repeats of grouped heads) and elementwise ops (rotary
  embeddings, scaling) to the **projection** that made it: a ``linear``/``addmm``/``mm`` node
  whose weight is a parameter (so HF ``Conv1D`` and a functional ``F.linear(x, self.key.weight)``
  are found too), named by the module that owns the weight;
* the **head layout** is then computed, not guessed: the ids ``0 .. F−1`` of the projection's
  output features are pushed through the same ops (:func:`feature_layout`), so that the core
  sees, for every head slot, which rows of the projection weight it reads. This covers separate
  q/k/v, fused ``[q | k | v]`` (GPT-2, Phi-3), head-interleaved fused ``[h, 3, d]`` (GPT-NeoX,
  BLOOM, Falcon) and grouped key/value heads repeated to the query heads (LLaMA's
  ``repeat_kv``, or ``enable_gqa``);
* the **output projection** is the first projection the core's output reaches through
  data-movement ops; the site is **cross-attention** when the key projection reads another
  tensor than the query projection (BART/T5/Whisper decoders).

>>> from transformers import GPT2Config, GPT2Model
>>> import torch
>>> m = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=4, vocab_size=20, n_positions=8,
...                          attn_implementation="eager")).eval()
>>> ids = {"input_ids": torch.tensor([[1, 2, 3]]), "use_cache": False}
>>> ep = torch.export.export(m, (), ids, strict=False)
>>> [site] = find_attention(ep)
>>> site.path, site.q.module, site.num_heads, site.kv_heads, site.head_dim, site.out
('h.0.attn', 'h.0.attn.c_attn', 4, 4, 4, ('h.0.attn.c_proj',))
>>> site.k.rows[1]  # head 1 of the keys reads columns 20..23 of the fused [q | k | v]
(20, 21, 22, 23)
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

__all__ = [
    "CORES",
    "AttentionMatch",
    "HeadRows",
    "feature_layout",
    "find_attention",
    "projection_of",
]

aten = torch.ops.aten


def _ops(*names: str) -> frozenset[Any]:
    """The overloads of ``aten`` ops named ``op.overload`` (missing ones are left out)."""
    found = set()
    for name in names:
        op, _, overload = name.partition(".")
        packet = getattr(aten, op, None)
        target = getattr(packet, overload or "default", None) if packet is not None else None
        if target is not None:
            found.add(target)
    return frozenset(found)


# --- the op classes the patterns are written in ----------------------------------------------

LINEAR = _ops("linear.default", "addmm.default", "mm.default", "matmul.default")
MATMUL = _ops("matmul.default", "bmm.default", "baddbmm.default")
SOFTMAX = _ops("softmax.int", "_softmax.default", "_safe_softmax.default")
SDPA = _ops("scaled_dot_product_attention.default")
# Ops that move features around without mixing them: executed on feature ids.
MOVE = _ops(
    "view.default",
    "_unsafe_view.default",
    "reshape.default",
    "permute.default",
    "transpose.int",
    "t.default",
    "numpy_T.default",
    "expand.default",
    "unsqueeze.default",
    "squeeze.dim",
    "squeeze.dims",
    "squeeze.default",
    "slice.Tensor",
    "select.int",
    "clone.default",
    "contiguous.default",
    "alias.default",
    "split.Tensor",
    "split_with_sizes.default",
    "chunk.default",
    "unbind.int",
    "unflatten.int",
    "flatten.using_ints",
    "narrow.default",
    "repeat_interleave.self_int",
    "index_select.default",
    "cat.default",
    "repeat.default",
) | {operator.getitem}
# Dtype/device changes and identities: ids pass unchanged.
CAST = _ops(
    "to.dtype",
    "to.dtype_layout",
    "to.device",
    "_to_copy.default",
    "type_as.default",
    "dropout.default",
    "detach.default",
    "detach_.default",
    "lift_fresh_copy.default",
)
# Elementwise ops: a feature keeps its place (rotary embeddings, scaling, masks, biases).
ELEMENTWISE = _ops(
    "mul.Tensor",
    "mul.Scalar",
    "mul_.Tensor",
    "mul_.Scalar",
    "div.Tensor",
    "div.Scalar",
    "div_.Tensor",
    "div_.Scalar",
    "sub_.Tensor",
    "add.Tensor",
    "add_.Tensor",
    "sub.Tensor",
    "rsub.Scalar",
    "neg.default",
    "where.self",
    "where.ScalarOther",
    "where.ScalarSelf",
    "masked_fill.Scalar",
    "masked_fill.Tensor",
    "masked_fill_.Scalar",
    "clamp.default",
    "float.default",
)
SCORE_OPS = ELEMENTWISE | CAST | MOVE  # between q @ kᵀ and the softmax
PROB_OPS = CAST | ELEMENTWISE | _ops("view.default", "reshape.default", "contiguous.default")


@dataclass(frozen=True)
class Core:
    """One pattern of the attention core, as data: which op anchors it and where q/k/v are."""

    name: str
    anchor: frozenset[Any]
    match: Callable[[Node], tuple[Node, Node, Node, Node] | None]


def _operands(mm: Node) -> tuple[Any, Any]:
    """The two matrix operands of a matmul-like node (``baddbmm``'s come after its input)."""
    return (mm.args[1], mm.args[2]) if mm.target in _ops("baddbmm.default") else mm.args[:2]  # type: ignore[return-value]


def _back(start: Any, through: frozenset[Any], stop: frozenset[Any], depth: int = 12) -> list[Node]:
    """Nodes in ``stop`` reached backwards from ``start`` through ops in ``through``."""
    found: list[Node] = []
    seen: set[Node] = set()
    frontier = [start] if isinstance(start, Node) else []
    for _ in range(depth):
        nxt: list[Node] = []
        for n in frontier:
            if n in seen or n.op != "call_function":
                continue
            seen.add(n)
            if n.target in stop:
                found.append(n)
            elif n.target in through:
                nxt.extend(n.all_input_nodes)
        frontier = nxt
    return found


def _forward(
    start: Node, through: frozenset[Any], stop: frozenset[Any], depth: int = 8
) -> list[tuple[Node, Node]]:
    """(node in ``stop``, the input it was reached by) forward from ``start`` through ``through``."""
    found: list[tuple[Node, Node]] = []
    seen: set[Node] = set()
    frontier = [(u, start) for u in start.users]
    for _ in range(depth):
        nxt: list[tuple[Node, Node]] = []
        for n, via in frontier:
            if n in seen or n.op != "call_function":
                continue
            seen.add(n)
            if n.target in stop:
                found.append((n, via))
            elif n.target in through:
                nxt.extend((u, n) for u in n.users)
        frontier = nxt
    return found


def _match_sdpa(node: Node) -> tuple[Node, Node, Node, Node] | None:
    q, k, v = node.args[:3]
    if not (isinstance(q, Node) and isinstance(k, Node) and isinstance(v, Node)):
        return None
    return q, k, v, node


def _match_softmax(node: Node) -> tuple[Node, Node, Node, Node] | None:
    scores = _back(node.args[0], SCORE_OPS, MATMUL)
    if not scores:
        return None
    qk = scores[0]
    q, kt = _operands(qk)
    after = [(m, via) for m, via in _forward(node, PROB_OPS, MATMUL) if _operands(m)[0] is via]
    if not after or not isinstance(q, Node) or not isinstance(kt, Node):
        return None
    pv = after[0][0]
    v = _operands(pv)[1]
    if not isinstance(v, Node):
        return None
    return q, kt, v, pv


CORES: tuple[Core, ...] = (
    Core("sdpa", SDPA, _match_sdpa),
    Core("softmax", SOFTMAX, _match_softmax),
)
"""The attention-core patterns, tried on every node in graph order."""


# --- projections and their feature layout -----------------------------------------------------


def _param_owner(ep: torch.export.ExportedProgram) -> dict[str, str]:
    """Placeholder name → the path of the module owning that parameter."""
    sig = ep.graph_signature
    return {
        ph: name.rsplit(".", 1)[0] if "." in name else ""
        for ph, name in sig.inputs_to_parameters.items()
    }


def projection_of(node: Node, owners: dict[str, str]) -> tuple[str, Node] | None:
    """(module path, input node) when ``node`` is a dense layer whose weight is a parameter."""
    if node.op != "call_function" or node.target not in LINEAR:
        return None
    if node.target is aten.linear.default:
        x, w = node.args[0], node.args[1]
    elif node.target is aten.addmm.default:
        x, w = node.args[1], node.args[2]
    else:  # mm / matmul: x @ w.t() (Falcon's FalconLinear)
        x, w = node.args[0], node.args[1]
    while isinstance(w, Node) and w.op == "call_function" and w.target in MOVE | CAST:
        w = w.args[0]  # a transposed weight (`mm(x, w.t())`)
    if not isinstance(w, Node) or w.op != "placeholder" or w.name not in owners:
        return None
    return (owners[w.name], x) if isinstance(x, Node) else None


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(s) for s in val.shape)
        except (TypeError, ValueError):  # symbolic sizes
            return None
    return None


def _paths_to(
    target: Node, sources: frozenset[Any], owners: dict[str, str]
) -> tuple[Node, set[Node]] | None:
    """The one projection that ``target`` is computed from, and the nodes between them."""
    through = MOVE | CAST | ELEMENTWISE
    between: dict[Node, bool] = {}
    projections: set[Node] = set()

    def visit(n: Node, depth: int) -> bool:
        if n in between:
            return between[n]
        if depth > 40 or n.op != "call_function":
            between[n] = False
            return False
        if projection_of(n, owners) is not None:
            projections.add(n)
            between[n] = True
            return True
        ok = False
        if n.target in through:
            for a in n.all_input_nodes:
                ok = visit(a, depth + 1) or ok
        between[n] = ok
        return ok

    if not visit(target, 0) or len(projections) != 1:
        return None
    return next(iter(projections)), {n for n, ok in between.items() if ok}


def feature_layout(
    proj: Node, on_path: set[Node], target: Node, constants: dict[str, torch.Tensor] | None = None
) -> torch.Tensor | None:
    """The ids of ``proj``'s output features as they arrive at ``target``: the result of the
    data-movement ops between them executed on ``arange(F)``; elementwise ops keep ids.
    ``constants`` gives buffers an op reads (an ``index_select``'s index) by placeholder name."""
    constants = constants or {}
    shape = _shape(proj)
    if shape is None:
        return None
    vals: dict[Node, Any] = {proj: torch.arange(shape[-1]).expand(shape)}
    order = {n: i for i, n in enumerate(proj.graph.nodes)}
    for n in sorted(on_path - {proj}, key=order.__getitem__):
        tracked = [a for a in n.all_input_nodes if a in vals]
        if not tracked:
            continue

        def sub(a: Any) -> Any:
            if isinstance(a, Node):
                if a in vals:
                    return vals[a]
                if a.op == "placeholder" and a.name in constants:
                    return constants[a.name]
                s = _shape(a)
                return torch.full(s, -1, dtype=torch.long) if s is not None else None
            return a

        try:
            if n.target in MOVE:
                args = torch.fx.node.map_aggregate(n.args, sub)
                kwargs = torch.fx.node.map_aggregate(n.kwargs, sub)
                vals[n] = n.target(*args, **kwargs)  # type: ignore[operator]
            else:  # a cast or an elementwise op: every feature keeps its place
                out = _shape(n)
                first = vals[tracked[0]]
                vals[n] = first if out is None else torch.broadcast_to(first, out)
        except Exception:  # an op the ids cannot follow: no layout
            return None
    got = vals.get(target)
    return got if isinstance(got, torch.Tensor) else None


@dataclass(frozen=True)
class HeadRows:
    """Which output rows of one projection every head slot of the core reads."""

    module: str  # the projection module (owner of the weight)
    features: int  # its output width
    rows: tuple[tuple[int, ...], ...]  # per head slot (in slot order), the weight rows it reads

    @property
    def groups(self) -> list[tuple[int, ...]]:
        """The distinct row sets (heads actually computed), in slot order."""
        return list(dict.fromkeys(self.rows))


def _slots(ids: torch.Tensor, transposed: bool) -> list[tuple[int, ...]] | None:
    """Per head slot, the feature ids it reads (leading dims are batch × heads)."""
    if ids.dim() < 3:
        return None
    mat = ids.reshape(-1, ids.shape[-2], ids.shape[-1])
    rows = mat[:, :, 0] if transposed else mat[:, 0, :]  # (slots, d)
    out = [tuple(int(i) for i in r) for r in rows]
    if any(i < 0 for r in out for i in r):
        return None
    # The batch repeats the heads: keep one period.
    for p in range(1, len(out) + 1):
        if len(out) % p == 0 and all(out[i] == out[i % p] for i in range(len(out))):
            return out[:p]
    return out


@dataclass(frozen=True)
class AttentionMatch:
    """One attention site found by the patterns (see the module docstring)."""

    path: str  # the module owning the input projections: what `group` rewrites
    core: str  # which pattern matched ("sdpa", "softmax")
    q: HeadRows
    k: HeadRows
    v: HeadRows
    out: tuple[str, ...]  # the output projection(s)
    cross: bool  # keys/values read another tensor than the queries
    calls: int = 1  # how many times the graph runs it (a shared layer: ALBERT)

    @property
    def num_heads(self) -> int:
        return len(self.q.rows)

    @property
    def q_heads(self) -> int:
        return len(self.q.groups)

    @property
    def kv_heads(self) -> int:
        return len(self.k.groups)

    @property
    def head_dim(self) -> int:
        return len(self.q.rows[0])

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.q.module, self.k.module, self.v.module)))


def _common_parent(paths: Iterable[str]) -> str:
    parents = [p.rsplit(".", 1)[0] if "." in p else "" for p in paths]
    common: list[str] = []
    for level in zip(*(p.split(".") for p in parents), strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _root(n: Any, owners: dict[str, str]) -> Any:
    """The tensor a projection reads, through views and through the first factor of a
    decomposed projection (a LowRankLinear is two dense layers in a row)."""
    while isinstance(n, Node) and n.op == "call_function":
        if n.target in MOVE | CAST:
            n = n.args[0]
            continue
        got = projection_of(n, owners)
        if got is None:
            break
        n = got[1]
    return n


def _constants(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Placeholder name → the buffer or constant tensor it stands for."""
    sig = ep.graph_signature
    found: dict[str, torch.Tensor] = {}
    for ph, name in {**sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}.items():
        value = ep.state_dict.get(name, ep.constants.get(name))
        if isinstance(value, torch.Tensor):
            found[ph] = value
    return found


def _head_rows(
    x: Node, owners: dict[str, str], transposed: bool, constants: dict[str, torch.Tensor]
) -> tuple[HeadRows, Node] | None:
    found = _paths_to(x, LINEAR, owners)
    if found is None:
        return None
    proj, on_path = found
    ids = feature_layout(proj, on_path, x, constants)
    if ids is None:
        return None
    slots = _slots(ids, transposed)
    got = projection_of(proj, owners)
    shape = _shape(proj)
    if slots is None or got is None or shape is None:
        return None
    return HeadRows(got[0], shape[-1], tuple(slots)), got[1]


def _out_projection(core_out: Node, owners: dict[str, str]) -> tuple[str, ...]:
    for n, _ in _forward(core_out, MOVE | CAST, LINEAR, depth=10):
        got = projection_of(n, owners)
        if got is not None:
            return (got[0],)
    return ()


def find_attention(ep: torch.export.ExportedProgram) -> list[AttentionMatch]:
    """Every attention site of an exported program, in graph order (one per module set)."""
    owners = _param_owner(ep)
    constants = _constants(ep)
    found: dict[tuple[str, str, str], AttentionMatch] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        for core in CORES:
            if node.target not in core.anchor:
                continue
            matched = core.match(node)
            if matched is None:
                continue
            q, k, v, out = matched
            got_q = _head_rows(q, owners, False, constants)
            # The key operand of q @ kᵀ is already transposed; sdpa takes k as is.
            got_k = _head_rows(k, owners, core.name == "softmax", constants)
            got_v = _head_rows(v, owners, False, constants)
            if got_q is None or got_k is None or got_v is None:
                continue
            (hq, xq), (hk, xk), (hv, _) = got_q, got_k, got_v
            if len(hk.rows) < len(hq.rows) and len(hq.rows) % len(hk.rows) == 0:
                rep = len(hq.rows) // len(hk.rows)  # enable_gqa: kv heads serve query groups
                hk = HeadRows(hk.module, hk.features, tuple(r for r in hk.rows for _ in range(rep)))
                hv = HeadRows(hv.module, hv.features, tuple(r for r in hv.rows for _ in range(rep)))
            if not (len(hq.rows) == len(hk.rows) == len(hv.rows)):
                continue
            key = (hq.module, hk.module, hv.module)
            if key in found:
                prev = found[key]
                found[key] = AttentionMatch(**{**prev.__dict__, "calls": prev.calls + 1})
                continue
            cross = _root(xq, owners) is not _root(xk, owners)
            owner = _common_parent(dict.fromkeys((hq.module, hk.module, hv.module)))
            found[key] = AttentionMatch(
                path=owner,
                core=core.name,
                q=hq,
                k=hk,
                v=hv,
                out=_out_projection(out, owners),
                cross=cross,
            )
            break
    return list(found.values())
