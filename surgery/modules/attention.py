"""`GroupedAttention`: self-attention whose query and/or key-value heads are shared by groups.

It replaces an HF self-attention module (BERT's ``BertSelfAttention``, ViT's ``ViTAttention``,
GPT-2's ``GPT2Attention``) after ``group kv = G`` / ``group q = Gq kv = Gkv`` and keeps that
module's call signature and return value ``(attn_output, attn_weights)``.

**Pairing map.** The attention keeps ``h`` output slots (heads), so the output projection is
unchanged. Slot ``i`` reads query group ``i // (h / q_groups)`` and key-value group
``i // (h / kv_groups)`` (contiguous groups; ``q_groups = h`` is GQA-``kv_groups``,
``kv_groups = 1`` is MQA, ``kv_groups = h`` with fewer query groups is GKVA, both smaller is
GQKVA). Several slots can read the same (query group, kv group) pair: attention is computed once
per *distinct* pair and its output is **repeated into every slot of that pair**, i.e. a grouped
query head's output is broadcast back to each member head's slot, in the member's original
position. With ``h = 4, q_groups = 2, kv_groups = 2`` slots 0,1 read pair (0,0) and slots 2,3
read (1,1): two attentions are computed and each is written twice. This is the natural
generalisation when converting a pretrained MHA by mean-pooling: every head keeps its slot in
``W_o`` and its query/key/value become the means over its groups. (The GQKVA paper's Cartesian
pairing, with ``q_groups · kv_groups = h`` distinct pairs, is a different map; it is not used.)

>>> m = GroupedAttention(hidden_size=16, num_heads=4, head_dim=4, q_groups=4, kv_groups=2)
>>> out, weights = m(torch.randn(2, 5, 16))
>>> out.shape, weights.shape  # (B, T, h·d), (B, h, T, T)
(torch.Size([2, 5, 16]), torch.Size([2, 4, 5, 5]))
>>> m.pairs  # distinct (query group, kv group) pairs that are computed
[(0, 0), (1, 0), (2, 1), (3, 1)]
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from surgery.modules.identity import IdentitySublayer, Mode
from surgery.modules.registry import SurgeryModule, register_module

__all__ = ["GroupedAttention", "HandOnIdentity", "pairing", "pool_heads"]

# Positional arguments after ``hidden_states`` of the HF modules this one replaces.
_POSITIONAL: dict[str, tuple[str, ...]] = {
    "bert": ("attention_mask", "past_key_values"),  # BertSelfAttention
    "vit": ("attention_mask",),  # ViTAttention (5.x)
    "gpt2": ("past_key_values", "attention_mask"),  # GPT2Attention
}

Signature = Literal["bert", "vit", "gpt2"]


def pairing(
    num_heads: int, q_groups: int, kv_groups: int
) -> tuple[list[tuple[int, int]], list[int]]:
    """(distinct (q group, kv group) pairs in slot order, pair index of every slot).

    >>> pairing(6, 3, 2)
    ([(0, 0), (1, 0), (1, 1), (2, 1)], [0, 0, 1, 2, 3, 3])
    """
    per_q, per_kv = num_heads // q_groups, num_heads // kv_groups
    pairs: list[tuple[int, int]] = []
    slot: list[int] = []
    for i in range(num_heads):
        p = (i // per_q, i // per_kv)
        if p not in pairs:
            pairs.append(p)
        slot.append(pairs.index(p))
    return pairs, slot


def pool_heads(weight: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """Mean-pool ``heads`` contiguous head blocks of a projection into ``groups`` blocks.

    ``weight`` is ``[heads·d, ...]`` (a Linear weight ``[out, in]`` or a bias ``[out]``);
    the result is ``[groups·d, ...]`` where block ``g`` is the mean of heads
    ``g·heads/groups .. (g+1)·heads/groups − 1``.

    >>> w = torch.arange(4.0).repeat_interleave(2)  # 4 heads of dim 2: [0,0,1,1,2,2,3,3]
    >>> pool_heads(w, 4, 2).tolist()
    [0.5, 0.5, 2.5, 2.5]
    """
    if heads % groups:
        raise ValueError(f"{groups} groups do not divide {heads} heads")
    rest = weight.shape[1:]
    d = weight.shape[0] // heads
    # (heads·d, *rest) -> (groups, heads/groups, d, *rest): average the middle axis
    return weight.reshape(groups, heads // groups, d, *rest).mean(dim=1).reshape(groups * d, *rest)


@register_module
class GroupedAttention(SurgeryModule):
    """Multi-head self-attention with ``q_groups`` query and ``kv_groups`` key/value projections.

    Projections are ``q_proj: hidden→q_groups·d``, ``k_proj``/``v_proj: hidden→kv_groups·d``
    and, when ``out_features`` is given (ViT, GPT-2: the HF module owns its output projection),
    ``o_proj: h·d→out_features``; BERT's output dense stays outside in ``BertSelfOutput``.
    ``signature`` selects the positional-argument order of the replaced HF module. A key/value
    cache (``past_key_values``) stores the ``kv_groups`` grouped heads, so decoding with a cache
    also saves memory.
    """

    pair_q: torch.Tensor
    pair_kv: torch.Tensor
    slot_pair: torch.Tensor

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        q_groups: int,
        kv_groups: int,
        qkv_bias: bool = True,
        out_features: int | None = None,
        out_bias: bool = True,
        is_causal: bool = False,
        scaling: float | None = None,
        layer_idx: int | None = None,
        dropout: float = 0.0,
        resid_dropout: float = 0.0,
        signature: Signature = "bert",
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        for name, g in (("q_groups", q_groups), ("kv_groups", kv_groups)):
            if g <= 0 or num_heads % g:
                raise ValueError(f"{name} = {g} must divide num_heads = {num_heads}")
        if signature not in _POSITIONAL:
            raise ValueError(f"unknown signature `{signature}`")
        torch_dtype = getattr(torch, dtype) if dtype else None
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.q_groups = q_groups
        self.kv_groups = kv_groups
        self.is_causal = is_causal
        self.scaling = float(scaling) if scaling is not None else head_dim**-0.5
        self.layer_idx = layer_idx
        self.signature: Signature = signature
        self.q_proj = nn.Linear(hidden_size, q_groups * head_dim, bias=qkv_bias, dtype=torch_dtype)
        self.k_proj = nn.Linear(hidden_size, kv_groups * head_dim, bias=qkv_bias, dtype=torch_dtype)
        self.v_proj = nn.Linear(hidden_size, kv_groups * head_dim, bias=qkv_bias, dtype=torch_dtype)
        self.o_proj = (
            nn.Linear(num_heads * head_dim, out_features, bias=out_bias, dtype=torch_dtype)
            if out_features is not None
            else None
        )
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(resid_dropout)
        self.pairs, slots = pairing(num_heads, q_groups, kv_groups)
        # Index maps are derived from the spec, so they are not saved in the state dict.
        self.register_buffer("pair_q", torch.tensor([p[0] for p in self.pairs]), persistent=False)
        self.register_buffer("pair_kv", torch.tensor([p[1] for p in self.pairs]), persistent=False)
        self.register_buffer("slot_pair", torch.tensor(slots), persistent=False)
        self._identity_q = [p[0] for p in self.pairs] == list(range(q_groups))
        self._identity_kv = [p[1] for p in self.pairs] == list(range(kv_groups))
        self._identity_slots = slots == list(range(num_heads))

    def spec(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "q_groups": self.q_groups,
            "kv_groups": self.kv_groups,
            "qkv_bias": self.q_proj.bias is not None,
            "out_features": self.o_proj.out_features if self.o_proj is not None else None,
            "out_bias": self.o_proj is not None and self.o_proj.bias is not None,
            "is_causal": self.is_causal,
            "scaling": self.scaling,
            "layer_idx": self.layer_idx,
            "dropout": self.attn_dropout.p,
            "resid_dropout": self.resid_dropout.p,
            "signature": self.signature,
            "dtype": str(self.q_proj.weight.dtype).removeprefix("torch."),
        }

    # Read by HF's sdpa/eager helpers and by other surgery code.
    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    def _mask(self, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Apply an HF attention mask: additive float, boolean keep-mask, or None (+ causal)."""
        tq, tk = scores.shape[-2], scores.shape[-1]
        if mask is None:
            if not self.is_causal or tq == 1:
                return scores
            # Queries are the last tq positions of tk keys (cache prefix first).
            keep = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).tril(tk - tq)
            return scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        mask = mask[..., :tk]  # HF may pad static-cache masks beyond the keys in use
        if mask.dtype == torch.bool:
            return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return scores + mask.to(scores.dtype)

    def forward(
        self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for name, value in zip(_POSITIONAL[self.signature], args, strict=False):
            kwargs[name] = value
        if kwargs.get("encoder_hidden_states") is not None:
            raise NotImplementedError("GroupedAttention replaces self-attention only")
        mask: torch.Tensor | None = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values")
        bsz, tq, _ = hidden_states.shape  # (B, T, C)
        d = self.head_dim
        q = (
            self.q_proj(hidden_states).view(bsz, tq, self.q_groups, d).transpose(1, 2)
        )  # (B, Gq, T, d)
        k = (
            self.k_proj(hidden_states).view(bsz, tq, self.kv_groups, d).transpose(1, 2)
        )  # (B, Gkv, T, d)
        v = (
            self.v_proj(hidden_states).view(bsz, tq, self.kv_groups, d).transpose(1, 2)
        )  # (B, Gkv, T, d)
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache
            k, v = cache.update(k, v, self.layer_idx)  # (B, Gkv, Tk, d)
        # One attention per distinct (query group, kv group) pair.
        qp = q if self._identity_q else q.index_select(1, self.pair_q)  # (B, P, T, d)
        kp = k if self._identity_kv else k.index_select(1, self.pair_kv)  # (B, P, Tk, d)
        vp = v if self._identity_kv else v.index_select(1, self.pair_kv)  # (B, P, Tk, d)
        scores = torch.matmul(qp, kp.transpose(2, 3)) * self.scaling  # (B, P, T, Tk)
        scores = self._mask(scores, mask)
        if scores.dtype in (torch.float16, torch.bfloat16):
            probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
        else:
            probs = nn.functional.softmax(scores, dim=-1)
        probs = self.attn_dropout(probs)
        ctx = torch.matmul(probs, vp)  # (B, P, T, d)
        if not self._identity_slots:  # broadcast each pair's output to its member slots
            ctx = ctx.index_select(1, self.slot_pair)  # (B, h, T, d)
            probs = probs.index_select(1, self.slot_pair)  # (B, h, T, Tk)
        out = ctx.transpose(1, 2).reshape(bsz, tq, self.num_heads * d).contiguous()  # (B, T, h·d)
        if self.o_proj is not None:
            out = self.resid_dropout(self.o_proj(out))  # (B, T, out)
        return out, probs

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, q_groups={self.q_groups}, kv_groups={self.kv_groups}, "
            f"head_dim={self.head_dim}, signature={self.signature!r}"
        )


@register_module
class HandOnIdentity(IdentitySublayer):
    """A dropped attention that hands some of its inputs on, as the module it replaces did.

    T5's attention returns ``(output, position_bias, weights)``: the first block computes the
    relative-position bias, every later block receives it as its ``position_bias`` input and
    returns it unchanged, and the stack hands it to the next block. A later block's attention
    dropped by ``drop`` must do the same, or the next block would see no bias. ``passes`` lists
    those inputs as ``[name, position]`` (the position in the replaced module's ``forward``,
    ``hidden_states`` being 0; ``position`` is used when the input came positionally); the
    stand-in returns ``(identity output, *passed inputs, None)``.

    >>> m = HandOnIdentity("zero", passes=[["position_bias", 3]])
    >>> bias = torch.randn(1, 4, 5, 5)
    >>> out, got, weights = m(torch.randn(2, 5, 8), position_bias=bias)
    >>> got is bias, weights, float(out.abs().sum())
    (True, None, 0.0)
    """

    def __init__(
        self,
        mode: Mode = "zero",
        passes: list[list[Any]] | None = None,
        layer_idx: int | None = None,
    ) -> None:
        super().__init__(mode, returns_tuple=True, layer_idx=layer_idx)
        self.passes: list[tuple[str, int]] = [(str(n), int(p)) for n, p in passes or []]

    def spec(self) -> dict[str, Any]:
        passes = [[n, p] for n, p in self.passes]
        return {"mode": self.mode, "passes": passes, "layer_idx": self.layer_idx}

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if "cache" in kwargs and "past_key_values" not in kwargs:  # T5 names its cache `cache`
            kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
        out = super().forward(hidden_states, *args, **kwargs)[0]
        handed = [
            kwargs[name] if name in kwargs else (args[pos - 1] if 0 < pos <= len(args) else None)
            for name, pos in self.passes
        ]
        return (out, *handed, None)
