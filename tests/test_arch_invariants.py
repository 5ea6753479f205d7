"""The exactness invariants of issue 16 on every family of the coverage matrix.

For each tiny random-weight model of ``tests/helpers_models.py:ARCHS`` (float64, eval mode),
through the real passes and the exported graph's analysis:

* ``group kv = H`` with ``H`` the model's own key/value heads leaves every output identical
  (Swin's stages have different head counts: ``H`` is the first stage's, whose output must not
  change); CNNs are refused with the reason of :data:`tests.test_arch_matrix.REFUSED`;
* ``skip tokens 0% after block 1`` is identity wherever token skipping applies, and every other
  family is refused with the matrix's reason;
* a full-rank ``decompose`` is exact: every ``Linear`` (HF ``Conv1D``) weight is first made
  rank ``R`` (its SVD truncated), so that ``decompose Linear rank = R`` keeps the whole spectrum
  while still saving parameters (a factorization at ``min(in, out)`` never does, and the pass
  skips it); the decomposed model must equal the model it was applied to. CNNs without a
  ``Linear`` do the same with ``k×k`` kernels of multilinear rank ``(R', R')`` and
  ``decompose Conv2d rank = R'`` (Tucker-2).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from torch import nn

from surgery.graph import analyze
from surgery.inputs import Inputs, example_inputs, flatten_outputs
from surgery.parse import parse
from surgery.passes import pass_for
from surgery.passes.base import PassContext, PassError
from surgery.transformer_arch import first_tensor, get_module, is_hf_conv1d
from tests.helpers_models import ARCHS
from tests.test_arch_matrix import REFUSED

RANK = 4  # of every Linear made low-rank (break-even of the tiny 32-wide layers is ≥ 10)
CONV_RANK = 2  # per Tucker mode of every k×k kernel made low-rank


@functools.cache
def _base(family: str) -> tuple[nn.Module, Inputs, Any]:
    """The family's float64 model, its example inputs and the analysis of its exported graph."""
    model = ARCHS[family]().double().eval()
    ex = example_inputs(model).to(torch.float64)
    return model, ex, analyze(model, ex)


def _run(family: str, line: str, model: nn.Module | None = None) -> tuple[nn.Module, Inputs, list]:  # type: ignore[type-arg]
    """``line`` planned and applied on a copy of the family's model (or on ``model``)."""
    base, ex, analysis = _base(family)
    model = copy.deepcopy(base) if model is None else model
    p = pass_for(parse(line + "\n").statements[0])
    p.context = PassContext(analysis=analysis, example=ex)
    plan = p.plan(model)
    return model, ex, p.apply(model, plan)


def _outputs(model: nn.Module, ex: Inputs) -> list[torch.Tensor]:
    return flatten_outputs(ex.call(model))


def _refusal(family: str, key: str, line: str) -> None:
    with pytest.raises(PassError) as err:
        _run(family, line)
    assert REFUSED[(family, key)] in err.value.diagnostic.message + " ".join(
        err.value.diagnostic.notes
    )


def _kv_heads(family: str) -> int:
    _, _, analysis = _base(family)
    selfs = [m for m in analysis.graph.graph.get("attention", []) if not m.cross]
    return selfs[0].kv_heads


# --- group kv = heads ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(ARCHS))
def test_group_kv_equal_to_heads_is_identity(family: str) -> None:
    if (family, "R3") in REFUSED:
        _refusal(family, "R3", "group kv = 2")
        return
    base, ex, _ = _base(family)
    line = f"group kv = {_kv_heads(family)}"
    if family == "swin":  # heads per stage 2, 4: kv = 2 leaves the first stage as it was
        first = "encoder.layers.0"
        model, _, _ = _run(family, line)
        seen: list[torch.Tensor] = []
        for m in (base, model):
            h = get_module(m, first).register_forward_hook(
                lambda _m, _a, out: seen.append(first_tensor(out))
            )
            try:
                ex.call(m)
            finally:
                h.remove()
        assert torch.equal(seen[0], seen[1])
        return
    model, _, changes = _run(family, line)
    assert changes == []
    for got, want in zip(_outputs(model, ex), _outputs(base, ex), strict=True):
        assert torch.equal(got, want)


# --- skip tokens 0% ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(ARCHS))
def test_skip_no_tokens_is_identity(family: str) -> None:
    line = "skip tokens 0% after block 1"
    if (family, "R4") in REFUSED:
        _refusal(family, "R4", line)
        return
    base, ex, _ = _base(family)
    model, _, changes = _run(family, line)
    assert changes
    for got, want in zip(_outputs(model, ex), _outputs(base, ex), strict=True):
        assert torch.equal(got, want)


# --- full-rank decompose ----------------------------------------------------------------------


def _low_rank_linears(model: nn.Module, rank: int) -> int:
    """Truncate every dense weight to ``rank`` singular values in place; how many there were."""
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) or is_hf_conv1d(m):
                w: torch.Tensor = m.weight  # type: ignore[assignment]
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                w.copy_((u[:, :rank] * s[:rank]) @ vh[:rank])
                n += 1
    return n


def _mode_project(w: torch.Tensor, mode: int, rank: int) -> torch.Tensor:
    """``w`` with its mode-``mode`` fibres projected on the top ``rank`` left singular vectors."""
    moved = w.movedim(mode, 0)
    flat = moved.reshape(moved.shape[0], -1)
    u = torch.linalg.svd(flat, full_matrices=False)[0][:, :rank]
    return (u @ (u.T @ flat)).reshape(moved.shape).movedim(0, mode)


def _low_rank_convs(model: nn.Module, rank: int) -> int:
    """Give every ungrouped ``Conv2d`` kernel multilinear rank ``≤ (rank, rank)`` in place."""
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.groups == 1:
                w = _mode_project(_mode_project(m.weight, 0, rank), 1, rank)
                m.weight.copy_(w)
                n += 1
    return n


@pytest.mark.parametrize("family", list(ARCHS))
def test_full_rank_decompose_is_exact(family: str) -> None:
    base, ex, _ = _base(family)
    model = copy.deepcopy(base)
    if _low_rank_linears(model, RANK):
        line = f"decompose Linear rank = {RANK}"
    else:  # a CNN without dense layers (ResNet)
        assert _low_rank_convs(model, CONV_RANK)
        line = f"decompose Conv2d rank = {CONV_RANK}"
    reference = copy.deepcopy(model)
    model, _, changes = _run(family, line, model)
    assert changes, f"{family}: `{line}` changed nothing"
    for got, want in zip(_outputs(model, ex), _outputs(reference, ex), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
