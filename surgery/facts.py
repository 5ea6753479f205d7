"""Facts about a model that selectors and passes read: the output of `surgery.graph.analyze`.

Plain data (dataclasses), so tests can build an `Analysis` by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

__all__ = ["Analysis", "AttentionUnit", "BlockInfo", "ModuleInfo"]


@dataclass
class ModuleInfo:
    """One named submodule of the model, measured on the example inputs."""

    path: str  # dotted path from the root model, e.g. "encoder.layer.0.attention.self.query"
    type: str  # class name, e.g. "Linear", "Conv1D", "Conv2d", "BertSelfAttention"
    params: int  # parameters owned directly or by children (tied weights counted once per module)
    flops: int  # FLOPs of one forward on the example inputs (2 per multiply-accumulate)
    input_shapes: list[tuple[int, ...]] = field(
        default_factory=list
    )  # tensor args of the first call
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)
    in_features: int | None = None  # Linear/Conv1D: input width; conv: in_channels
    out_features: int | None = None  # Linear/Conv1D: output width; conv: out_channels
    kernel: int | None = None  # conv: largest kernel side; None for non-convs
    block: int | None = None  # index of the repeated block (ModuleList item) it lives in
    calls: int = 0  # how many times forward ran during one model call
    is_leaf: bool = True  # has no child modules
    tied: bool = False  # one of its parameters is shared with another module

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "type": self.type,
            "params": self.params,
            "flops": self.flops,
            "input_shapes": [list(s) for s in self.input_shapes],
            "output_shapes": [list(s) for s in self.output_shapes],
            "in_features": self.in_features,
            "out_features": self.out_features,
            "kernel": self.kernel,
            "block": self.block,
        }


@dataclass
class BlockInfo:
    """A ModuleList of repeated layers (e.g. "encoder.layer") and its items."""

    path: str  # the ModuleList, e.g. "encoder.layer"
    items: list[str]  # paths of its items in order, e.g. ["encoder.layer.0", ...]


@dataclass(frozen=True)
class AttentionUnit:
    """One attention the dependency graph found: projections whose widths change together.

    ``path`` is the module that owns the input projections, the attention proper (BERT's
    ``attention.self``, GPT-2's ``attn``, LLaMA's ``self_attn``): what ``group`` rewrites and what
    `surgery.transformer_arch` reads a head layout from.
    """

    path: str  # e.g. "encoder.layer.0.attention.self"
    inputs: tuple[str, ...]  # the q/k/v projections, or one fused qkv projection
    outputs: tuple[str, ...]  # the output projection(s), e.g. "...attention.output.dense"

    @property
    def members(self) -> tuple[str, ...]:
        """Every projection of the attention: what ``coupled`` edges join."""
        return self.inputs + self.outputs


@dataclass
class Analysis:
    """What `surgery.graph.analyze` learned about a model.

    ``graph`` is a networkx DiGraph whose nodes are module paths (leaf modules and the
    containers that own them) with edges:
    ``kind="data"`` u→v when an output of u flows (possibly through functional ops) into v;
    ``kind="coupled"`` (added in both directions) when u and v must change together
    (q/k/v/o of one attention, the two factors of a decomposition, the members of one residual
    block); ``kind="contains"`` parent→child.

    ``attentions`` are the attention units the ``coupled`` edges were built from, in module
    order: the one answer to "where is the attention", which `surgery.transformer_arch` and the
    ``group``, ``drop``, ``truncate`` and ``skip`` passes read.
    """

    modules: dict[str, ModuleInfo]
    blocks: list[BlockInfo]
    graph: nx.DiGraph
    traced: bool  # False when torch.export failed and only module-level facts are known
    total_params: int
    total_flops: int
    warnings: list[str] = field(default_factory=list)
    attentions: list[AttentionUnit] = field(default_factory=list)

    def coupled(self, path: str) -> set[str]:
        """Modules that must change together with ``path`` (not including itself)."""
        if path not in self.graph:
            return set()
        return {
            v for _, v, d in self.graph.out_edges(path, data=True) if d.get("kind") == "coupled"
        }
