"""Graph analysis: module facts, repeated blocks and the dependency graph selectors and passes read.

:func:`analyze` returns an :class:`~surgery.facts.Analysis`:

* **Module facts** for every named submodule (the root is excluded): class name, parameter
  count (each parameter once per module), in/out features (``Linear``; HF ``Conv1D``, whose
  weight is ``[in, out]``; conv channels; ``LowRankLinear``), the largest conv kernel side,
  and whether a parameter is tied to a module outside it (GPT-2 ``lm_head`` / ``wte``).
  With inputs, one forward run under forward hooks and ``FlopCounterMode`` records the tensor
  shapes of the first call, the call counts and the FLOPs (2 per multiply-accumulate; a
  container's FLOPs include its children's; ``Linear(in, out)`` on N tokens is ``2·N·in·out``).
* **Blocks**: every ``nn.ModuleList`` whose items all have one class. A module's ``block`` is
  the item index in the *outermost* such list containing it (``encoder.layer.3.attention.self.query``
  → 3).
* **Dependency graph** (networkx ``DiGraph``; nodes are module paths with attribute ``info``):

  - ``contains``: parent → child.
  - ``data``: leaf u → leaf v when a value computed inside u is consumed inside v, directly or
    through functional ops that belong to no leaf (reshapes, matmuls, residual adds). Found
    from one ``torch.export.export(..., strict=False)`` graph, mapping each node to the
    innermost module of its ``nn_module_stack``.
  - ``coupled`` (both directions) — layers whose widths must change together:

    1. *Attention*: the projections of one attention site. With a graph, the sites are what
       the patterns of :mod:`surgery.patterns` match in the exported program (q/k/v
       projections → heads → scores → softmax → weighted values → output projection, with the
       head layout of each projection); they are kept on the graph as
       ``graph.graph["attention"]`` (a list of :class:`~surgery.patterns.AttentionMatch`),
       beside ``graph.graph["residual"]`` (the modules holding a residual add), and the passes
       read them. Where export fails, the module-level rules below decide, as before: the
       projections (``Linear``/``Conv1D``/``LowRankLinear``) inside one
       attention — the outermost module whose class name contains ``Attention`` (so HF BERT's
       ``attention.self.{query,key,value}`` and ``attention.output.dense`` form one group), or,
       for models without such class names, a module with ≥3 projection children named like
       q/k/v (or one fused ``c_attn``/``qkv``) plus its output projection
       (``o_proj``/``out_proj``/``dense``/``c_proj``), looked for among its children and then in
       an ``*out*`` sibling module (BERT's ``BertSelfOutput`` layout). Each is an
       :class:`~surgery.facts.AttentionUnit` in ``Analysis.attentions`` (see
       :func:`attention_units`): the only place surgery looks for attention; the transformer
       passes read their blocks and attentions from it.
    2. *Decomposition*: the ``first`` and ``second`` factors of one ``LowRankLinear``.
    3. *Residual stream*: in one block item, the attention output projection(s) and the MLP
       down projection (the last projection outside the attention with the same output width),
       since both write to the residual stream. Block membership itself is the node's ``block``.

  A DiGraph holds one edge per ordered pair, so when two relations link the same pair (a
  ``LowRankLinear``'s factors are both ``data`` and ``coupled``) the edge attribute ``kind`` is
  the strongest (``coupled`` > ``data`` > ``contains``) and ``kinds`` holds all of them; use
  :func:`edges_of_kind` / :func:`kind_view` to select edges by relation.

If ``torch.export`` fails (data-dependent control flow, ...), the analysis degrades:
``traced=False``, a warning, and no ``data`` edges; everything else is still measured.

>>> import torch
>>> from surgery.inputs import Inputs
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
>>> a = analyze(m, Inputs((torch.randn(3, 8),), {}))
>>> a.modules["0"].flops == 2 * 3 * 8 * 4, a.traced, ("0", "1") in a.graph.edges
(True, True, True)
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import networkx as nx
import torch
from torch import nn

from surgery.diagnostics import first_line
from surgery.facts import Analysis, AttentionUnit, BlockInfo, ModuleInfo
from surgery.inputs import Inputs, flatten_outputs
from surgery.patterns import AttentionMatch, find_attention

__all__ = [
    "analyze",
    "attention_matches",
    "attention_units",
    "edges_of_kind",
    "export",
    "kind_view",
    "units_from_matches",
]

_PRIORITY = {"contains": 1, "data": 2, "coupled": 3}

# Names of attention input projections; a fused one alone marks an attention.
_QKV_NAMES = {
    "q",
    "k",
    "v",
    "query",
    "key",
    "value",
    "q_proj",
    "k_proj",
    "v_proj",
    "wq",
    "wk",
    "wv",
}
_FUSED_QKV_NAMES = {"c_attn", "qkv", "qkv_proj", "wqkv", "query_key_value", "in_proj", "Wqkv"}
_OUT_NAMES = {"o_proj", "out_proj", "dense", "c_proj", "proj", "o", "out", "wo", "output"}
_DOWN_NAMES = {"down_proj", "fc2", "w2", "dense_4h_to_h", "c_proj", "dense", "proj_out", "wo"}


# --- module facts -----------------------------------------------------------------------------


_INTERPRETER_TYPES = {"InterpreterModule", "InterpreterModuleDispatcher"}


def _type_names(named: list[tuple[str, nn.Module]]) -> dict[int, str]:
    """id(module) → class name; for modules unflattened from a ``.pt2`` (``InterpreterModule``)
    the original class recorded in the program's ``nn_module_stack``, so that selectors such as
    ``Linear`` still match a loaded ``.pt2``."""
    names: dict[int, str] = {}
    for path, m in named:
        name = type(m).__name__
        graph = getattr(m, "graph", None)
        if name in _INTERPRETER_TYPES and isinstance(graph, torch.fx.Graph):
            for node in graph.nodes:
                for key, val in (node.meta.get("nn_module_stack") or {}).items():
                    raw = val[0] if isinstance(val, tuple) and val else str(key)
                    if _normalize_stack_path(str(raw)) == path and isinstance(val, tuple):
                        name = str(val[1]).rsplit(".", 1)[-1]
                        break
                if name not in _INTERPRETER_TYPES:
                    break
        names[id(m)] = name
    return names


def _weight(m: nn.Module) -> torch.Tensor | None:
    w = getattr(m, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def _is_conv1d_hf(m: nn.Module, tname: str) -> bool:
    # transformers.pytorch_utils.Conv1D: a Linear with a transposed [in, out] weight.
    w = _weight(m)
    return tname == "Conv1D" and w is not None and w.dim() == 2


def _is_linear(m: nn.Module, tname: str) -> bool:
    w = _weight(m)
    return isinstance(m, nn.Linear) or (tname == "Linear" and w is not None and w.dim() == 2)


def _is_projection(m: nn.Module, types: dict[int, str]) -> bool:
    """A unit that maps a feature width to another: what attention/MLP coupling talks about."""
    tname = types.get(id(m), type(m).__name__)
    if _is_linear(m, tname) or _is_conv1d_hf(m, tname):
        return True
    try:
        from surgery.modules import LowRankLinear
    except ImportError:  # pragma: no cover - the package always ships it
        return False
    return isinstance(m, LowRankLinear)


def _is_factorization(m: nn.Module, types: dict[int, str]) -> bool:
    tname = types.get(id(m), type(m).__name__)
    return _is_projection(m, types) and not _is_linear(m, tname) and not _is_conv1d_hf(m, tname)


def _features(m: nn.Module, tname: str) -> tuple[int | None, int | None, int | None]:
    """(in_features, out_features, kernel) of a module, None where meaningless."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features, None
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.in_channels, m.out_channels, max(int(k) for k in m.kernel_size)
    w = _weight(m)
    if _is_conv1d_hf(m, tname) and w is not None:
        return int(w.shape[0]), int(w.shape[1]), None  # weight is [nx (in), nf (out)]
    if tname == "Linear" and w is not None and w.dim() == 2:  # unflattened .pt2: [out, in]
        return int(w.shape[1]), int(w.shape[0]), None
    if (
        tname.startswith("Conv")
        and tname[-2:] in ("1d", "2d", "3d")
        and w is not None
        and w.dim() >= 3
    ):
        # unflattened .pt2 conv: weight [out, in/groups, *kernel]; groups are not recorded
        return int(w.shape[1]), int(w.shape[0]), max(int(k) for k in w.shape[2:])
    fin, fout = getattr(m, "in_features", None), getattr(m, "out_features", None)
    if isinstance(fin, int) and isinstance(fout, int):
        return fin, fout, None
    return None, None, None


def _under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or inside it."""
    return path == prefix or path.startswith(prefix + ".")


def _tied(named: list[tuple[str, nn.Module]]) -> set[str]:
    owners: dict[int, set[str]] = defaultdict(set)
    for path, m in named:
        for p in m.parameters(recurse=False):
            owners[id(p)].add(path)
    shared = {pid: paths for pid, paths in owners.items() if len(paths) > 1}
    tied: set[str] = set()
    if not shared:
        return tied
    for path, m in named:
        for p in m.parameters():
            paths = shared.get(id(p))
            if paths and any(not _under(o, path) for o in paths):
                tied.add(path)
                break
    return tied


def _blocks(named: list[tuple[str, nn.Module]]) -> list[BlockInfo]:
    blocks = []
    for path, m in named:
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            kinds = {type(item) for item in m}
            if len(kinds) == 1:
                items = [f"{path}.{name}" for name, _ in m.named_children()]
                blocks.append(BlockInfo(path=path, items=items))
    return blocks


def _block_index(path: str, blocks: list[BlockInfo]) -> int | None:
    # blocks are in named_modules (pre-)order, so the first list containing `path` is outermost
    for b in blocks:
        if path.startswith(b.path + "."):
            item = path[len(b.path) + 1 :].split(".", 1)[0]
            return int(item) if item.isdigit() else None
    return None


# --- measuring one run ------------------------------------------------------------------------


def _shapes(obj: Any) -> list[tuple[int, ...]]:
    return [tuple(int(s) for s in t.shape) for t in flatten_outputs(obj)]


def _tracker_names(model: nn.Module) -> dict[str, nn.Module]:
    """The names ``FlopCounterMode``'s ModuleTracker gives modules: ``Root.child.grandchild``."""
    names: dict[str, nn.Module] = {}
    seen: set[int] = set()

    def visit(m: nn.Module, name: str) -> None:
        names[name] = m
        if id(m) in seen:
            return
        seen.add(id(m))
        for child_name, child in m.named_children():
            visit(child, f"{name}.{child_name}")

    visit(model, type(model).__name__)
    return names


def _measure(
    model: nn.Module,
    named: list[tuple[str, nn.Module]],
    inputs: Inputs,
    infos: dict[str, ModuleInfo],
    count_flops: bool = True,
) -> int:
    """Run once with hooks and a FLOP counter; fill shapes, calls, flops. Returns total FLOPs.
    Without ``count_flops`` only shapes and calls are recorded."""
    from torch.utils.flop_counter import FlopCounterMode

    handles = []
    for path, m in named:
        info = infos[path]

        def hook(mod: nn.Module, args: Any, kwargs: Any, out: Any, info: ModuleInfo = info) -> None:
            info.calls += 1
            if info.calls == 1:
                info.input_shapes = _shapes((args, kwargs))
                info.output_shapes = _shapes(out)

        handles.append(m.register_forward_hook(hook, with_kwargs=True))
    counter = FlopCounterMode(display=False)
    try:
        if count_flops:
            with counter:
                inputs.call(model)
        else:
            inputs.call(model)
    finally:
        for h in handles:
            h.remove()
    if not count_flops:
        return 0
    path_of = {id(m): p for p, m in named}
    for name, m in _tracker_names(model).items():
        p = path_of.get(id(m))
        if p is not None and p in infos:
            counts = counter.get_flop_counts().get(name)
            if counts:
                infos[p].flops = int(sum(counts.values()))
    return int(counter.get_total_flops())


# --- data edges from torch.export ---------------------------------------------------------------

_SUBSCRIPT = re.compile(r"\[\s*['\"]?([^\]'\"]+)['\"]?\s*\]")


def _normalize_stack_path(raw: str) -> str:
    """``L['self'].encoder.layer[0]`` / ``encoder.layer.0@1`` → ``encoder.layer.0``."""
    s = raw.strip()
    s = re.sub(r"@\d+$", "", s)  # repeated calls of one module are suffixed `@n`
    s = re.sub(r"^L\[\s*['\"]self['\"]\s*\]", "", s)
    s = re.sub(r"^L__self__", "", s)
    s = s.replace("._modules", "")
    s = _SUBSCRIPT.sub(r".\1", s)
    return s.strip(".")


def _node_module(node: torch.fx.Node, known: set[str]) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    best: str | None = None
    for key, val in stack.items():
        raw = val[0] if isinstance(val, tuple) and val and isinstance(val[0], str) else str(key)
        path = _normalize_stack_path(raw)
        if path not in known:
            path = _normalize_stack_path(str(key))
        if path in known and (best is None or path.count(".") >= best.count(".")):
            best = path  # innermost known module
    return best


def export(model: nn.Module, inputs: Inputs) -> torch.export.ExportedProgram:
    """``torch.export.export(model, inputs, strict=False)`` without its warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, tuple(inputs.args), dict(inputs.kwargs), strict=False)


def attention_matches(model: nn.Module, inputs: Inputs) -> list[AttentionMatch]:
    """The attention sites the patterns of `surgery.patterns` find in ``model``'s exported
    graph on ``inputs`` (raises what ``torch.export`` raises)."""
    return find_attention(export(model, inputs))


def _data_edges(
    ep: torch.export.ExportedProgram, leaves: set[str], known: set[str]
) -> set[tuple[str, str]]:
    owner: dict[torch.fx.Node, str | None] = {}
    sources: dict[torch.fx.Node, frozenset[str]] = {}
    edges: set[tuple[str, str]] = set()
    empty: frozenset[str] = frozenset()
    for node in ep.graph.nodes:  # topological order
        if node.op != "call_function":
            owner[node], sources[node] = None, empty
            continue
        mod = _node_module(node, known)
        leaf = mod if mod in leaves else None
        reach: set[str] = set()
        for inp in node.all_input_nodes:
            o = owner.get(inp)
            reach |= {o} if o is not None else sources.get(inp, empty)
        owner[node] = leaf
        if leaf is not None:
            edges.update((u, leaf) for u in reach if u != leaf)
            sources[node] = frozenset((leaf,))
        else:
            sources[node] = frozenset(reach)
    return edges


def _residual_modules(ep: torch.export.ExportedProgram, known: set[str]) -> set[str]:
    """Modules holding a residual add: an ``add`` of two tensors of the output's shape (the
    stream and a branch, or a shortcut and a branch), inside the module or its children."""
    adds = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}

    def stack(node: Any) -> set[str]:
        if not isinstance(node, torch.fx.Node):
            return set()
        found = set()
        for key, val in (node.meta.get("nn_module_stack") or {}).items():
            raw = val[0] if isinstance(val, tuple) and val and isinstance(val[0], str) else str(key)
            path = _normalize_stack_path(raw)
            if path in known:
                found.add(path)
        return found

    def shape(node: Any) -> Any:
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        return tuple(val.shape) if isinstance(val, torch.Tensor) else None

    out: set[str] = set()
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target not in adds or len(node.args) < 2:
            continue
        a, b = node.args[:2]
        if shape(a) is None or shape(a) != shape(b) or shape(a) != shape(node):
            continue
        out |= stack(node)
    return out


# --- coupling ---------------------------------------------------------------------------------


def _projections_under(root: str, m: nn.Module, types: dict[int, str]) -> list[str]:
    """Projection units inside ``m`` (not descending into a unit), in registration order."""
    found: list[str] = []

    def visit(prefix: str, mod: nn.Module) -> None:
        for name, child in mod.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if _is_projection(child, types):
                found.append(path)
            else:
                visit(path, child)

    visit(root, m)
    return found


def _owner(container: str, inputs: list[str]) -> str:
    """The module that owns an attention's input projections (the attention proper): their
    parent, those named like q/k/v first, else the deepest module that holds them all."""
    named = [p for p in inputs if p.rsplit(".", 1)[-1] in _QKV_NAMES | _FUSED_QKV_NAMES]
    parents = {p.rsplit(".", 1)[0] if "." in p else "" for p in named or inputs}
    common: list[str] = []
    for level in zip(*(p.split(".") for p in parents), strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common) or container


def _attention_units(
    named: list[tuple[str, nn.Module]],
    block_lists: set[str],
    types: dict[int, str],
) -> list[AttentionUnit]:
    """Each attention found by the rules in the module docstring, in module order."""
    modules = dict(named)
    units: list[AttentionUnit] = []
    claimed: list[str] = []  # attention containers already grouped

    def inside_claimed(path: str) -> bool:
        return any(_under(path, c) for c in claimed)

    for path, m in named:  # pre-order: outer attentions are seen first
        if inside_claimed(path) or _is_projection(m, types) or not list(m.children()):
            continue
        if "attention" in types[id(m)].lower() and not any(_under(b, path) for b in block_lists):
            members = _projections_under(path, m, types)
            outs = [p for p in members if p.rsplit(".", 1)[-1] in _OUT_NAMES]
            if not outs and members:
                outs = [members[-1]]
            if len(members) >= 2:
                inputs = [p for p in members if p not in outs]
                units.append(AttentionUnit(_owner(path, inputs), tuple(inputs), tuple(outs)))
            claimed.append(path)
    for path, m in named:
        if inside_claimed(path) or _is_projection(m, types):
            continue
        kids = {n: c for n, c in m.named_children() if _is_projection(c, types)}
        qkv = [n for n in kids if n in _QKV_NAMES]
        fused = [n for n in kids if n in _FUSED_QKV_NAMES]
        if len(qkv) < 3 and not fused:
            continue
        inputs = [f"{path}.{n}" if path else n for n in qkv + fused]
        outs = [f"{path}.{n}" if path else n for n in kids if n in _OUT_NAMES]
        if not outs and path:  # BERT layout: the output dense lives in a sibling `output` module
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            me = path.rsplit(".", 1)[-1]
            siblings = modules[parent].named_children() if parent in modules else []
            for sname, sib in siblings:
                if sname == me or "out" not in sname.lower():
                    continue
                spath = f"{parent}.{sname}" if parent else sname
                outs += [
                    f"{spath}.{n}"
                    for n, c in sib.named_children()
                    if _is_projection(c, types) and n in _OUT_NAMES
                ]
        units.append(AttentionUnit(path, tuple(inputs), tuple(outs)))
        claimed.append(path)
    order = {path: i for i, (path, _) in enumerate(named)}
    return sorted(units, key=lambda u: order.get(u.path, -1))


def units_from_matches(
    matches: Iterable[AttentionMatch], named: list[tuple[str, nn.Module]]
) -> list[AttentionUnit]:
    """The :class:`AttentionUnit` of every attention the graph patterns found, in module
    order: the module owning the q/k/v projections, those projections and the output one."""
    order = {path: i for i, (path, _) in enumerate(named)}
    modules = dict(named)
    types = _type_names(named)

    def unit(path: str) -> str:
        # A factor of a decomposed projection (LowRankLinear's `second`, a grouped projection's
        # `proj`) stands for the layer that holds it.
        while "." in path:
            parent = modules.get(path.rsplit(".", 1)[0])
            if parent is None or not (
                _is_projection(parent, types)
                or isinstance(getattr(parent, "out_features", None), int)
            ):
                break
            path = path.rsplit(".", 1)[0]
        return path

    units = [
        AttentionUnit(
            m.path,
            tuple(dict.fromkeys(unit(p) for p in m.inputs)),
            tuple(dict.fromkeys(unit(p) for p in m.out)),
        )
        for m in matches
    ]
    return sorted(units, key=lambda u: order.get(u.path, -1))


def attention_units(model: nn.Module) -> list[AttentionUnit]:
    """The attentions of ``model`` by the rules in the module docstring, in module order.

    The one place that decides where attention is and which projections form one:
    :func:`analyze` stores the result as ``Analysis.attentions`` and builds the ``coupled``
    edges from it, and `surgery.transformer_arch` finds blocks and head layouts from it. Paths
    are relative to ``model``, which itself is never an attention.

    >>> class Mixer(nn.Module):  # no "Attention" in the class name: found by its children
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.q, self.k, self.v, self.o = (nn.Linear(4, 4) for _ in range(4))
    >>> attention_units(nn.Sequential(Mixer()))
    [AttentionUnit(path='0', inputs=('0.q', '0.k', '0.v'), outputs=('0.o',))]
    """
    named = [(p, m) for p, m in model.named_modules() if p]
    return _attention_units(named, {b.path for b in _blocks(named)}, _type_names(named))


def _coupled_edges(
    named: list[tuple[str, nn.Module]],
    blocks: list[BlockInfo],
    infos: dict[str, ModuleInfo],
    types: dict[int, str],
    units: list[AttentionUnit],
) -> set[tuple[str, str]]:
    modules = dict(named)
    pairs: set[tuple[str, str]] = set()

    def couple(paths: Iterable[str]) -> None:
        ps = sorted(set(paths))
        for i, u in enumerate(ps):
            for v in ps[i + 1 :]:
                pairs.update(((u, v), (v, u)))

    for unit in units:
        couple(unit.members)

    # Factors of one decomposition.
    for path, m in named:
        if _is_factorization(m, types):
            couple(f"{path}.{n}" for n, c in m.named_children() if _is_projection(c, types))

    # Residual writers of one block item: attention out-proj(s) and the MLP down projection.
    items = sorted((it for b in blocks for it in b.items), key=len, reverse=True)

    def nearest_item(path: str) -> str | None:
        return next((it for it in items if path.startswith(it + ".")), None)

    in_attention = {p for unit in units for p in unit.members}
    outs_by_item: dict[str, list[str]] = defaultdict(list)
    for unit in units:
        for o in unit.outputs:
            it = nearest_item(o)
            if it is not None:
                outs_by_item[it].append(o)
    for it, outs in outs_by_item.items():
        width = {infos[o].out_features for o in outs if o in infos}
        candidates = [
            p
            for p in _projections_under(it, modules[it], types)
            if p not in in_attention and nearest_item(p) == it and infos[p].out_features in width
        ]
        named_down = [p for p in candidates if p.rsplit(".", 1)[-1] in _DOWN_NAMES]
        down = (named_down or candidates)[-1:]
        if down:
            couple(outs + down)
    return pairs


# --- graph ------------------------------------------------------------------------------------


def _add_edge(g: nx.DiGraph, u: str, v: str, kind: str) -> None:
    if g.has_edge(u, v):
        d = g.edges[u, v]
        d["kinds"] = d["kinds"] | {kind}
        if _PRIORITY[kind] > _PRIORITY[d["kind"]]:
            d["kind"] = kind
    else:
        g.add_edge(u, v, kind=kind, kinds=frozenset((kind,)))


def edges_of_kind(graph: nx.DiGraph, kind: str) -> list[tuple[str, str]]:
    """Edges of ``graph`` that carry relation ``kind`` (also where a stronger one shadows it)."""
    return [(u, v) for u, v, d in graph.edges(data=True) if kind in d.get("kinds", {d.get("kind")})]


def kind_view(graph: nx.DiGraph, kind: str) -> nx.DiGraph:
    """A read-only view of ``graph`` with only the edges of relation ``kind``."""

    def keep(u: str, v: str) -> bool:
        d = graph.edges[u, v]
        return kind in d.get("kinds", {d.get("kind")})

    return nx.subgraph_view(graph, filter_edge=keep)


def analyze(model: nn.Module, inputs: Inputs | None = None, *, trace: bool = True) -> Analysis:
    """Measure ``model`` (on ``inputs`` if given) and build its dependency graph."""
    named = [(p, m) for p, m in model.named_modules() if p]
    types = _type_names(named)
    tied = _tied(named)
    blocks = _blocks(named)
    infos: dict[str, ModuleInfo] = {}
    for path, m in named:
        fin, fout, kernel = _features(m, types[id(m)])
        infos[path] = ModuleInfo(
            path=path,
            type=types[id(m)],
            params=sum(p.numel() for p in m.parameters()),
            flops=0,
            in_features=fin,
            out_features=fout,
            kernel=kernel,
            block=_block_index(path, blocks),
            is_leaf=not any(True for _ in m.children()),
            tied=path in tied,
        )
    warn: list[str] = []
    total_flops = 0
    ran = inputs is not None
    if inputs is not None:
        try:
            total_flops = _measure(model, named, inputs, infos)
        except Exception as exc:  # a model that cannot run still gets its static facts
            for info in infos.values():
                info.calls, info.input_shapes, info.output_shapes = 0, [], []
            try:  # the FLOP counter's module tracker fails on some models (DeBERTa-v2)
                _measure(model, named, inputs, infos, count_flops=False)
                warn.append(
                    f"could not count the FLOPs of {type(model).__name__} "
                    f"({first_line(exc, 200)}): FLOP columns are 0"
                )
            except Exception:
                ran = False  # exporting would fail the same way, only more noisily
                warn.append(
                    f"could not run {type(model).__name__} on the inputs ({first_line(exc, 200)}): "
                    "no shapes or FLOPs"
                )
    g = nx.DiGraph()
    for path, _ in named:
        g.add_node(path, info=infos[path])
    for path, _ in named:
        if "." in path:
            _add_edge(g, path.rsplit(".", 1)[0], path, "contains")
    traced = False
    matches: list[AttentionMatch] | None = None
    if trace and inputs is not None and ran:
        leaves = {p for p, i in infos.items() if i.is_leaf}
        try:
            ep = export(model, inputs)
            data = _data_edges(ep, leaves, set(infos))
            traced = True
            matches = find_attention(ep)
            g.graph["residual"] = _residual_modules(ep, set(infos))
        except Exception as exc:  # untraceable models degrade to module-level facts
            data = set()
            warn.append(
                f"could not trace {type(model).__name__} with torch.export ({first_line(exc, 200)}): "
                "using module-level analysis"
            )
        for u, v in data:
            _add_edge(g, u, v, "data")
    if matches is not None:
        g.graph["attention"] = matches  # what the attention patterns found in the graph
    if matches:
        units = units_from_matches(matches, named)
    else:  # no graph (or no attention in it): the module-level rules
        units = _attention_units(named, {b.path for b in blocks}, types)
    for u, v in _coupled_edges(named, blocks, infos, types, units):
        _add_edge(g, u, v, "coupled")
    return Analysis(
        modules=infos,
        blocks=blocks,
        graph=g,
        traced=traced,
        total_params=sum(p.numel() for p in model.parameters()),
        total_flops=total_flops,
        warnings=warn,
        attentions=units,
    )
