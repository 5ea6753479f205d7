"""`IdentitySublayer`: a dropped attention or MLP sublayer that lets the residual stream through.

What "identity" means depends on where the block puts its layer norm:

* ``mode="zero"`` (pre-LN blocks: GPT-2, LLaMA, ViT): the block computes
  ``x + sublayer(norm(x))``, so the sublayer returns zeros and the block's own residual add
  passes ``x`` through unchanged.
* ``mode="input"`` (post-LN BERT ``BertAttention``, whose output is
  ``LayerNorm(x + attn(x))``; and BERT's ``intermediate``): return the hidden states as they came.
* ``mode="residual"`` (post-LN BERT ``BertOutput(h, input_tensor)``, which is
  ``LayerNorm(dense(h) + input_tensor)``): return ``input_tensor``.

``returns_tuple`` appends a ``None`` (attention weights) for modules the HF code unpacks as
``out, weights = attn(...)``. A dropped *decoder* attention still appends a zero-width entry to
the key/value cache of its ``layer_idx``, so that the cache length HF reads from layer 0
(positions, masks during ``generate``) stays right.

>>> import torch
>>> x = torch.randn(2, 3, 4)
>>> IdentitySublayer("zero", returns_tuple=True)(x)[0].abs().sum().item()
0.0
>>> bool(torch.equal(IdentitySublayer("residual")(torch.randn(2, 3, 8), x), x))
True
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from surgery.modules.registry import SurgeryModule, register_module

__all__ = ["IdentitySublayer"]

Mode = Literal["zero", "input", "residual"]


@register_module
class IdentitySublayer(SurgeryModule):
    """A parameter-free stand-in for a removed sublayer (see the module docstring)."""

    def __init__(
        self, mode: Mode = "zero", returns_tuple: bool = False, layer_idx: int | None = None
    ) -> None:
        super().__init__()
        if mode not in ("zero", "input", "residual"):
            raise ValueError(f"unknown identity mode `{mode}`")
        self.mode: Mode = mode
        self.returns_tuple = returns_tuple
        self.layer_idx = layer_idx

    def spec(self) -> dict[str, Any]:
        return {"mode": self.mode, "returns_tuple": self.returns_tuple, "layer_idx": self.layer_idx}

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.mode == "zero":
            out = torch.zeros_like(hidden_states)  # (B, T, C)
        elif self.mode == "input":
            out = hidden_states
        else:
            residual = args[0] if args else kwargs["input_tensor"]
            out = residual
        cache = kwargs.get("past_key_values")
        if cache is not None and self.layer_idx is not None:
            cache = getattr(cache, "self_attention_cache", cache)
            b, t = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 1, t, 0)  # (B, 1, T, 0): length without data
            cache.update(empty, empty, self.layer_idx)
        return (out, None) if self.returns_tuple else out

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
