"""`TuckerConv2d`: full ranks reproduce the Conv2d, spec round-trips, grouped convs refused."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from surgery.modules.registry import build, registered
from surgery.modules.tucker_conv import TuckerConv2d

FAST = settings(max_examples=25, deadline=None)


def conv64(*args: object, **kwargs: object) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(*args, **kwargs, dtype=torch.float64)  # type: ignore[arg-type]


@FAST
@given(
    C=st.integers(1, 5),
    S=st.integers(1, 5),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_full_ranks_reproduce_conv(
    C: int,
    S: int,
    kh: int,
    kw: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    bias: bool,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    conv = nn.Conv2d(
        C, S, (kh, kw), stride=stride, padding=padding, dilation=dilation, bias=bias
    ).double()
    t = TuckerConv2d.from_conv(conv, rank_out=S, rank_in=C)
    x = torch.randn(2, C, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(t(x), conv(x), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(t.weight, conv.weight, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "replicate"])
def test_padding_modes_and_same_padding(padding_mode: str) -> None:
    conv = conv64(3, 4, 3, padding=1, padding_mode=padding_mode)
    t = TuckerConv2d.from_conv(conv, rank_out=4, rank_in=3)
    x = torch.randn(1, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(t(x), conv(x), rtol=1e-9, atol=1e-9)
    same = conv64(3, 4, 3, padding="same")
    t2 = TuckerConv2d.from_conv(same, rank_out=4, rank_in=3)
    with torch.no_grad():
        torch.testing.assert_close(t2(x), same(x), rtol=1e-9, atol=1e-9)
    assert t2.spec()["padding"] == "same"


def test_error_non_increasing_in_ranks() -> None:
    conv = conv64(6, 8, 3, padding=1)
    # HOSVD truncation projects W onto nested subspaces, so the *weight* error is monotone
    # (the output error on one input need not be)
    with torch.no_grad():
        errs = [
            float(
                (
                    TuckerConv2d.from_conv(conv, rank_out=r, rank_in=min(r, 6)).weight - conv.weight
                ).norm()
            )
            for r in range(1, 9)
        ]
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(errs))
    assert errs[-1] < 1e-9


def test_structure_and_spec_round_trip() -> None:
    conv = conv64(8, 16, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    t = TuckerConv2d.from_conv(conv, rank_out=6, rank_in=4)
    assert t.first.weight.shape == (4, 8, 1, 1) and t.first.bias is None
    assert t.core.weight.shape == (6, 4, 3, 5) and t.core.bias is None
    assert t.core.stride == (2, 1) and t.core.padding == (1, 2) and t.core.dilation == (1, 2)
    assert t.last.weight.shape == (16, 6, 1, 1) and t.last.bias is not None
    spec = t.spec()
    assert json.loads(json.dumps(spec)) == spec
    assert spec["kernel_size"] == [3, 5] and spec["dtype"] == "float64"
    assert registered()["TuckerConv2d"] is TuckerConv2d
    rebuilt = build("TuckerConv2d", spec)
    rebuilt.load_state_dict(t.state_dict())
    x = torch.randn(1, 8, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), t(x))


def test_parameter_count() -> None:
    t = TuckerConv2d(8, 16, rank_in=4, rank_out=6, kernel_size=3)
    expected = 8 * 4 + 4 * 6 * 9 + 6 * 16 + 16
    assert sum(p.numel() for p in t.parameters()) == expected


def test_grouped_conv_refused() -> None:
    conv = nn.Conv2d(8, 8, 3, groups=2)
    with pytest.raises(ValueError, match="grouped convolution"):
        TuckerConv2d.from_conv(conv, rank_out=4, rank_in=4)


@pytest.mark.parametrize(("rank_in", "rank_out"), [(0, 2), (5, 2), (2, 0), (2, 9)])
def test_bad_ranks_refused(rank_in: int, rank_out: int) -> None:
    with pytest.raises(ValueError, match="rank_"):
        TuckerConv2d(4, 8, rank_in=rank_in, rank_out=rank_out, kernel_size=3)
