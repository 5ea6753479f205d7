"""`TokenSkipLayers`: SkipViT token skipping (2401.15293) around a model's list of blocks.

It wraps the ``nn.ModuleList`` of transformer blocks (``ViTModel.layers``,
``BertEncoder.layer``) and behaves like it (``len``, indexing, iteration), so the HF forward
loop ``for layer in self.layers: hidden = layer(hidden, mask, ...)`` runs unchanged. Iterating
yields the plain blocks, except:

* block ``after`` (``D``) runs on all ``N`` tokens; a forward hook captures its attention's
  query/key projections, and each non-CLS token is scored by the CLS query's softmax attention
  to it, averaged over heads (padding keys, from the attention mask, score ``−∞``; CLS always
  stays). The block's output is split: CLS plus the top ``k = ⌈(1−ρ)·(N−1)⌉`` tokens (kept in
  their original order) go on; the others are carried unchanged.
* blocks ``D+1 .. until`` (``E``, default the last block) run on the ``1 + k`` kept tokens, with
  the attention mask cut to them;
* after block ``E`` the carried tokens are scattered back into their positions, so the final
  norm/head sees ``N`` tokens in the original order, the skipped ones holding their block-``D``
  outputs.

Where the scores come from: the pass hands the wrapper a :class:`CLSScorer` built from the
attention the exported graph's patterns found (:mod:`surgery.patterns`): the block-relative
paths of the query and key projections, and where in their outputs every head's rows start. So
any projection names (``q_lin``/``k_lin``, ``query_proj``/``key_proj``) and fused layouts are
read. The scores are the content-to-content ``q·k`` term only: a position bias a model adds to
its scores (DeBERTa's disentangled terms) is left out of the *ranking*; it is never left out of
the blocks that run. A wrapper saved without a scorer finds the attention by the module rules
(``query``/``key`` or ``q_proj``/``k_proj``).

Relative positions: DeBERTa's encoder computes ``relative_pos`` ``(1, N, N)`` once from the
sequence length and hands it to every block. For the reduced blocks its rows and columns are
gathered at each example's kept positions, so a kept token sees the same relative position to
every other kept token as before (``pos_i − pos_j``, bucketed as the encoder did); it is passed
as ``(1, B·H, K, K)``, the 4-d layout DeBERTa's attention indexes one row per (example, head)
of its ``(B·H, K, d)`` queries.

Rounding: ``k = ⌈(1−ρ)·(N−1) − 10⁻⁹⌉`` (never drop more than asked; the tolerance absorbs
float noise in ``1−ρ``). ``ρ = 0`` keeps every token and runs the blocks exactly as before.
The module has no parameters; its spec is just ``ratio``, ``after`` and ``until``, and the
wrapped list (``wraps = "inner"``) is re-attached on reload.

>>> keep_count(197, 0.55), keep_count(197, 0.0), keep_count(5, 1.0)
(89, 196, 0)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from surgery.modules.registry import SurgeryModule, register_module

__all__ = ["CLSScorer", "TokenSkipLayers", "cls_attention", "keep_count"]


def keep_count(tokens: int, ratio: float) -> int:
    """Number of non-CLS tokens kept out of ``tokens − 1`` when a fraction ``ratio`` is skipped."""
    return max(0, min(tokens - 1, math.ceil((1.0 - ratio) * (tokens - 1) - 1e-9)))


def _mask_row(
    mask: torch.Tensor | None, bsz: int, tokens: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(additive mask of the CLS query row (B, 1|H, T) or None, valid keys (B, T))."""
    valid = torch.ones(bsz, tokens, dtype=torch.bool)
    if mask is None:
        return None, valid
    row = (
        mask[..., 0, :] if mask.dim() == 4 else mask.reshape(mask.shape[0], 1, -1)
    )  # (B|1, H|1, T)
    row = row[..., :tokens]
    if row.dtype == torch.bool or not row.is_floating_point():  # DeBERTa: a 0/1 int mask
        row = row.bool()
        keep = row
        additive = torch.zeros(row.shape, dtype=torch.float32, device=row.device).masked_fill(
            ~row, -math.inf
        )
    else:
        keep = row > torch.finfo(row.dtype).min / 2
        additive = row.float()
    valid = keep.any(dim=1).expand(bsz, tokens)  # (B, T)
    return additive, valid


def cls_attention(
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    num_heads: int,
    head_dim: int,
    scaling: float,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """CLS query's softmax attention to every key, averaged over heads; padding gets −∞.

    ``q_out`` ``(B, T, nq·d)`` and ``k_out`` ``(B, T, nk·d)`` are projection outputs; head ``i``
    uses query group ``i // (h/nq)`` and key group ``i // (h/nk)`` (plain MHA: ``nq = nk = h``).
    Returns ``(B, T)``.
    """
    bsz, tokens, _ = k_out.shape
    nq, nk = q_out.shape[-1] // head_dim, k_out.shape[-1] // head_dim
    heads = torch.arange(num_heads, device=q_out.device)
    q_cls = q_out[:, 0].reshape(bsz, nq, head_dim)[:, heads // (num_heads // nq)]  # (B, h, d)
    k = k_out.reshape(bsz, tokens, nk, head_dim).transpose(1, 2)[
        :, heads // (num_heads // nk)
    ]  # (B, h, T, d)
    return _softmax_row(q_cls, k, scaling, mask)


@dataclass(frozen=True)
class CLSScorer:
    """Where a block's attention makes its queries and keys (from the graph's patterns).

    ``q``/``k`` are module paths relative to the block; ``q_starts``/``k_starts`` the first
    output feature of every head slot (each head reads ``head_dim`` consecutive features);
    ``scaling`` multiplies ``q·k``.

    >>> s = CLSScorer("attention.q_lin", "attention.k_lin", (0, 8), (0, 8), 8, 0.35)
    >>> CLSScorer.from_dict(s.to_dict()) == s
    True
    """

    q: str
    k: str
    q_starts: tuple[int, ...]
    k_starts: tuple[int, ...]
    head_dim: int
    scaling: float

    @property
    def num_heads(self) -> int:
        return len(self.q_starts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**d, "q_starts": list(self.q_starts), "k_starts": list(self.k_starts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLSScorer:
        return cls(
            str(d["q"]),
            str(d["k"]),
            tuple(int(i) for i in d["q_starts"]),
            tuple(int(i) for i in d["k_starts"]),
            int(d["head_dim"]),
            float(d["scaling"]),
        )

    def scores(
        self, q_out: torch.Tensor, k_out: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The CLS query's softmax attention to every key, averaged over heads, from the
        projections' outputs ``(B, T, ·)``; padding gets −∞. Returns ``(B, T)``."""
        d = torch.arange(self.head_dim, device=q_out.device)
        qi = torch.tensor(self.q_starts, device=q_out.device)[:, None] + d  # (h, d)
        ki = torch.tensor(self.k_starts, device=k_out.device)[:, None] + d  # (h, d)
        q_cls = q_out[:, 0][:, qi]  # (B, h, d)
        k = k_out[:, :, ki].transpose(1, 2)  # (B, h, T, d)
        return _softmax_row(q_cls, k, self.scaling, mask)


def _softmax_row(
    q_cls: torch.Tensor, k: torch.Tensor, scaling: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean over heads of ``softmax(q_cls·kᵀ·scaling + mask row)`` with padding at −∞."""
    bsz, _, tokens, _ = k.shape
    scores = torch.einsum("bhd,bhtd->bht", q_cls.float(), k.float()) * scaling  # (B, h, T)
    additive, valid = _mask_row(mask, bsz, tokens)
    if additive is not None:
        scores = scores + additive.to(scores.device)
    probs = scores.softmax(dim=-1).mean(dim=1)  # (B, T)
    return probs.masked_fill(~valid.to(probs.device), -math.inf)


def _take_relative(rel: torch.Tensor, idx: torch.Tensor, heads: int) -> torch.Tensor:
    """DeBERTa's ``relative_pos`` ``(1|B, N, N)`` at the kept positions ``idx`` ``(B, K)``, as
    ``(1, B·H, K, K)``: row ``b·H + h`` serves head ``h`` of example ``b``."""
    bsz, kept = idx.shape
    full = rel.reshape(-1, *rel.shape[-2:]).expand(bsz, -1, -1)  # (B, N, N)
    rows = torch.take_along_dim(full, idx[:, :, None].expand(-1, -1, full.shape[-1]), dim=1)
    both = torch.take_along_dim(rows, idx[:, None, :].expand(-1, kept, -1), dim=2)  # (B, K, K)
    return both.repeat_interleave(heads, dim=0).unsqueeze(0)  # (1, B·H, K, K)


def _take_tokens(mask: torch.Tensor, idx: torch.Tensor, tokens: int) -> torch.Tensor:
    """The attention mask restricted to the kept tokens ``idx`` (B, K) on its query/key axes."""
    bsz = idx.shape[0]
    out = mask
    if out.shape[0] != bsz:
        out = out.expand(bsz, *out.shape[1:])
    for dim in (-1, -2) if out.dim() == 4 else (-1,):
        if out.shape[dim] != tokens:
            continue
        shape = [bsz] + [1] * (out.dim() - 1)
        shape[dim] = idx.shape[1]
        index = idx.reshape(shape)
        size = list(out.shape)
        size[dim] = idx.shape[1]
        out = torch.take_along_dim(out, index.expand(size), dim=dim)
    return out


@dataclass
class _State:
    """What block D hands to the following blocks during one forward pass."""

    active: bool = False
    full: torch.Tensor | None = None  # (B, N, C) block-D outputs of all tokens
    idx: torch.Tensor | None = None  # (B, 1+k) kept positions, ascending
    mask: torch.Tensor | None = None  # attention mask cut to the kept tokens
    relative: torch.Tensor | None = None  # DeBERTa's relative_pos at the kept tokens
    tokens: int = 0


def _replace_mask(
    args: tuple[Any, ...], kwargs: dict[str, Any], mask: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (mask, *args[1:]), kwargs
    if "attention_mask" in kwargs:
        kwargs = {**kwargs, "attention_mask": mask}
    return args, kwargs


def _get_mask(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else kwargs.get("attention_mask")


def _with_hidden(out: Any, hidden: torch.Tensor) -> Any:
    return hidden if isinstance(out, torch.Tensor) else (hidden, *out[1:])


class _Step:
    """A block as yielded by iteration: calls it, then selects / runs reduced / scatters back."""

    def __init__(
        self, owner: TokenSkipLayers, layer: nn.Module, index: int, state: _State, last: bool
    ) -> None:
        self._owner, self._layer, self._index, self._state, self._last = (
            owner,
            layer,
            index,
            state,
            last,
        )

    def __getattr__(self, name: str) -> Any:  # code that inspects blocks sees the block
        return getattr(self._layer, name)

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self._index == self._owner.after:
            return self._select(hidden_states, args, kwargs)
        st = self._state
        if not st.active:
            return self._layer(hidden_states, *args, **kwargs)
        args, kwargs = _replace_mask(args, kwargs, st.mask)
        if st.relative is not None and "relative_pos" in kwargs:
            kwargs = {**kwargs, "relative_pos": st.relative}
        out = self._layer(hidden_states, *args, **kwargs)
        if not self._last:
            return out
        assert st.full is not None and st.idx is not None
        x = out if isinstance(out, torch.Tensor) else out[0]  # (B, 1+k, C)
        index = st.idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, 1+k, C)
        full = st.full.scatter(1, index, x.to(st.full.dtype))  # (B, N, C)
        st.active = False
        return _with_hidden(out, full)

    def _select(
        self, hidden_states: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        st = self._state
        st.active = False
        tokens = hidden_states.shape[1]
        kept = keep_count(tokens, self._owner.ratio)
        if kept >= tokens - 1:  # nothing to skip: run exactly as the unwrapped model
            return self._layer(hidden_states, *args, **kwargs)
        scorer = self._owner.scorer or _module_scorer(self._layer, self._index)
        q_mod, k_mod = self._layer.get_submodule(scorer.q), self._layer.get_submodule(scorer.k)
        seen: dict[str, torch.Tensor] = {}
        handles = [  # the first call: DeBERTa runs its projections again on position embeddings
            q_mod.register_forward_hook(lambda _m, _i, o: seen.setdefault("q", o)),
            k_mod.register_forward_hook(lambda _m, _i, o: seen.setdefault("k", o)),
        ]
        try:
            out = self._layer(hidden_states, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        x = out if isinstance(out, torch.Tensor) else out[0]  # (B, N, C)
        mask = _get_mask(args, kwargs)
        scores = scorer.scores(seen["q"], seen["k"], mask)  # (B, N)
        scores[:, 0] = math.inf  # CLS always stays
        idx = scores.topk(kept + 1, dim=1).indices.sort(dim=1).values  # (B, 1+k)
        st.active, st.full, st.idx, st.tokens = True, x, idx, tokens
        st.mask = _take_tokens(mask, idx, tokens) if isinstance(mask, torch.Tensor) else mask
        rel = kwargs.get("relative_pos")
        st.relative = (
            _take_relative(rel, idx, scorer.num_heads)
            if isinstance(rel, torch.Tensor) and tuple(rel.shape[-2:]) == (tokens, tokens)
            else None
        )
        reduced = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, 1+k, C)
        if self._index == self._owner.last_block():  # nothing follows: scatter right away
            st.active = False
            return out
        return _with_hidden(out, reduced)


def _module_scorer(block: nn.Module, index: int) -> CLSScorer:
    """The scorer of a wrapper saved without one: the block's attention by the module rules
    (``query``/``key`` or ``q_proj``/``k_proj``, heads in contiguous rows)."""
    from surgery.transformer_arch import attention_of_block

    found = attention_of_block(block)
    if found is None:
        raise RuntimeError(f"block {index} has no attention to score tokens with")
    rel, site = found
    attn: Any = block.get_submodule(rel)
    names = ("query", "key") if site.family == "separate" else ("q_proj", "k_proj")
    d = site.head_dim
    heads = range(site.num_heads)
    return CLSScorer(
        f"{rel}.{names[0]}",
        f"{rel}.{names[1]}",
        tuple(i // (site.num_heads // site.q_heads) * d for i in heads),
        tuple(i // (site.num_heads // site.kv_heads) * d for i in heads),
        d,
        float(getattr(attn, "scaling", d**-0.5)),
    )


@register_module
class TokenSkipLayers(SurgeryModule):
    """Token skipping after block ``after`` until block ``until`` (inclusive; default: the last).

    >>> blocks = nn.ModuleList([nn.Identity() for _ in range(4)])
    >>> m = TokenSkipLayers(ratio=0.5, after=1)
    >>> m.inner = blocks
    >>> len(m), m[0] is blocks[0], m.spec()
    (4, True, {'ratio': 0.5, 'after': 1, 'until': None})
    """

    wraps = "inner"

    def __init__(
        self,
        ratio: float,
        after: int,
        until: int | None = None,
        scorer: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        if until is not None and until <= after:
            raise ValueError(f"until ({until}) must come after block {after}")
        self.ratio = float(ratio)
        self.after = int(after)
        self.until = until
        self.scorer = CLSScorer.from_dict(scorer) if scorer is not None else None
        self.inner: nn.ModuleList | None = None  # set by the pass, or by the loader on reload

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"ratio": self.ratio, "after": self.after, "until": self.until}
        if self.scorer is not None:
            spec["scorer"] = self.scorer.to_dict()
        return spec

    def _blocks(self) -> nn.ModuleList:
        if self.inner is None:
            raise RuntimeError("TokenSkipLayers has no wrapped blocks (`inner` is unset)")
        return self.inner

    def last_block(self) -> int:
        return self.until if self.until is not None else len(self._blocks()) - 1

    def __len__(self) -> int:
        return len(self._blocks())

    def __getitem__(self, index: int | slice) -> Any:
        return self._blocks()[index]

    def __iter__(self) -> Iterator[Any]:
        blocks = self._blocks()
        last = self.last_block()
        state = _State()  # one per pass over the blocks, so concurrent loops never share
        for i, layer in enumerate(blocks):
            if self.after <= i <= last:
                yield _Step(self, layer, i, state, last=i == last)
            else:
                yield layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("TokenSkipLayers is iterated like the ModuleList it wraps, not called")

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, after={self.after}, until={self.until}"
