"""MindIR (the MindSpore / Ascend path): the exported aten graph rebuilt as a MindSpore ``nn.Cell``.

No importer from torch or ONNX into MindSpore exists for CPython 3.11 (BACKENDS.md), so the
backend translates the graph itself:

1. ``torch.export`` (non-strict, :func:`~surgery.backends.base.export_program`) gives the aten
   graph; it is **not** decomposed further (``run_decompositions`` fails on GPT-2 with SDPA
   attention), so the rules below cover the ops such graphs hold: ``linear``, ``matmul``,
   ``einsum``, convolutions (1-, 2- and 3-d transposed ones and ``padding="same"`` too; on
   ``cpu`` a 1- or 2-d one other than an ungrouped 1×1 at stride 1 runs as ``Im2Col`` and a
   1×1 conv or a batched matmul, :func:`~surgery.backends.mindir.rules_nn._im2col_conv`),
   norms, activations, softmax, attention, top-k / sort / gather / scatter (with its
   reductions: ``scatter(reduce=...)``, ``scatter_add``, ``scatter_reduce`` sum / prod / amax
   / amin / mean with or without ``include_self``), reshapes and friends. MindSpore's
   ``Einsum`` has no CPU kernel, so an einsum becomes transposes, reshapes and batched
   matmuls, after a strided slice for each diagonal (a subscript repeated in one operand,
   ``ii->i``); an in-place write into a view (``scores[:, 0] = inf``, a ``fill_`` of a
   ``select``) rebinds the viewed tensor to a ``where`` over the positions it covers.
   Refused with a located error: 3-d transposed convolutions outside float32 / float16 (the
   CPU kernel's dtypes) and scatter reductions on ``bool`` or complex tensors;
2. nodes that do not depend on the inputs' values or on a parameter (``arange``, mask
   constants, buffer slices, ``zeros_like``) are **folded** by running them in torch once;
   their results become constants of the cell;
3. every other node becomes one line of a generated ``construct`` written to
   ``model_cell.py`` in the work directory: MindSpore's graph mode compiles ``construct`` from
   its Python source, so the source must exist in a file (an interpreter loop over the fx
   graph would not compile);
4. the cell is exported with ``mindspore.export(..., file_format="MINDIR")`` to
   ``model.mindir``, loaded back with ``mindspore.load`` and run as an ``nn.GraphCell``:
   numerics and timing are those of the deployable file, not of the Python cell.

Semantics follow torch exactly where MindSpore's defaults differ: GELU is exact (``erf``)
unless the node says ``approximate="tanh"``, layer-norm epsilon comes from the node,
arithmetic runs in the dtype torch promotes to, comparisons and masks keep ``bool``. A node
whose op has no rule is a :class:`~surgery.backends.base.LoweringError` naming the op and the
node. Parameters keep their dtype and values (float32 stays float32).

Devices: ``cpu`` runs here. An Ascend NPU needs the CANN toolkit and the hardware; neither is
on this machine, so ``MindirBackend("ascend")`` reports itself unavailable and nothing is ever
timed for it.

Install: ``pip install mindspore==2.10.0`` (wheels for CPython 3.10–3.12).

The package, in the order of a lowering:

* :mod:`.state` — the translation state (``_Codegen``), the rule registry :data:`RULES`
  with its ``@_rule("aten.x")`` decorator, and the torch → MindSpore dtype names;
* the rule families, one module each, registering themselves in :data:`RULES`:
  :mod:`.rules_shape` (identity, casts, reshapes, views, slices, concatenation, indexing, and
  in-place writes into views), :mod:`.rules_elementwise` (arithmetic, comparisons,
  activations, reductions, norms), :mod:`.rules_nn` (linear algebra, convolution, pooling,
  attention), :mod:`.rules_einsum` and :mod:`.rules_select` (top-k, sort, scatter);
* :mod:`.codegen` — the export graph walked into a cell's source: folding, liveness,
  in-place ops, the generated ``construct`` (:func:`generate_cell_source`);
* :mod:`.runtime` — the backend: the cell exported to ``model.mindir``, reloaded as a
  ``GraphCell``, run and timed (:class:`MindirBackend`).

>>> sorted(op for op in RULES if "softmax" in op)
['aten._softmax.default', 'aten.log_softmax.int', 'aten.softmax.int']
"""

from __future__ import annotations

from .codegen import generate_cell_source, mapped_ops
from .runtime import MindirBackend, MindirLowered
from .state import RULES, ms_dtype

__all__ = [
    "RULES",
    "MindirBackend",
    "MindirLowered",
    "generate_cell_source",
    "mapped_ops",
    "ms_dtype",
]
