"""`GroupedHeadsLinear`: a q/k/v projection whose heads are shared by groups, any layout.

``group`` uses it on every self-attention it has no dedicated module for (DistilBERT,
DeBERTa-v2, ALBERT, BART, T5, GPT-NeoX, OPT, BLOOM, Falcon, CLIP, Swin, VideoMAE, ...): the
attention module itself stays, and only the projection that makes its queries, keys or values
(a separate ``k_proj`` or a fused ``query_key_value``) is replaced. The new layer computes
``rows`` features (the pooled heads, once each) and scatters them back to the original output
width with ``index``, so the attention reads exactly the layout it read before: every head of a
group reads the group's pooled projection. That is grouped-query attention by mean-pooling
(2305.13245) with the projection parameters and FLOPs of the grouped heads; the attention core
still runs ``h`` heads (as HF's own ``repeat_kv`` does) and a key/value cache keeps ``h`` heads.

``index`` is stored as ``[start, length]`` runs, so the spec stays small.

>>> import torch
>>> m = GroupedHeadsLinear(4, 6, rows=4, runs=[[0, 2], [2, 2], [2, 2]], bias=False)
>>> m.index.tolist()  # features 2..5 both read pooled rows 2..3
[0, 1, 2, 3, 2, 3]
>>> m(torch.randn(3, 4)).shape
torch.Size([3, 6])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.modules.registry import SurgeryModule, register_module

__all__ = ["GroupedHeadsLinear", "runs_of"]


def runs_of(index: list[int]) -> list[list[int]]:
    """``[start, length]`` runs of consecutive values.

    >>> runs_of([0, 1, 2, 5, 6, 2, 3])
    [[0, 3], [5, 2], [2, 2]]
    """
    runs: list[list[int]] = []
    for i in index:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return runs


@register_module
class GroupedHeadsLinear(SurgeryModule):
    """``y = (x Wᵀ + b)[..., index]`` with ``W`` of ``rows`` pooled rows (see module docstring)."""

    index: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rows: int,
        runs: list[list[int]],
        bias: bool = True,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        index = [s + i for s, n in runs for i in range(n)]
        if len(index) != out_features or (index and not 0 <= min(index) <= max(index) < rows):
            raise ValueError(f"runs must map {out_features} features onto {rows} rows")
        torch_dtype = getattr(torch, dtype) if dtype else None
        self.in_features, self.out_features, self.rows = in_features, out_features, rows
        self.runs = [list(r) for r in runs]
        self.proj = nn.Linear(in_features, rows, bias=bias, dtype=torch_dtype)
        self.register_buffer("index", torch.tensor(index, dtype=torch.long), persistent=False)
        self._identity = index == list(range(rows))

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rows": self.rows,
            "runs": self.runs,
            "bias": self.proj.bias is not None,
            "dtype": str(self.proj.weight.dtype).removeprefix("torch."),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = self.proj(x)
        return y if self._identity else y.index_select(-1, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rows={self.rows}"
