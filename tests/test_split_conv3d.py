"""`split Conv3d exact|(2+1)d`: Conv3d with 4D tensors only (2407.16514)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from surgery.facts import Analysis, ModuleInfo
from surgery.graph import analyze
from surgery.inputs import Inputs
from surgery.modules.conv3d import Conv2Plus1d, Conv3dAs2d, conv3d_output_size, separable_factors
from surgery.modules.registry import build
from surgery.parse import parse
from surgery.passes.base import PassContext
from surgery.passes.split import SplitPass

F64 = torch.float64


def _conv(**kw: Any) -> nn.Conv3d:
    torch.manual_seed(0)
    return nn.Conv3d(dtype=F64, **kw)


# --- exact rewrite ------------------------------------------------------------------------------

triples = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))


@settings(max_examples=60, deadline=None)
@given(
    kernel=triples,
    stride=triples,
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2)),
    bias=st.booleans(),
    groups=st.sampled_from([1, 2]),
    taps=st.sampled_from(["stack", "sum"]),
)
def test_exact_split_equals_conv3d(
    kernel: tuple[int, int, int],
    stride: tuple[int, int, int],
    padding: tuple[int, int, int],
    dilation: tuple[int, int, int],
    bias: bool,
    groups: int,
    taps: str,
) -> None:
    assume(groups == 1 or taps == "sum")
    size = (5, 6, 7)  # (T, H, W)
    assume(min(conv3d_output_size(size, kernel, stride, padding, dilation)) >= 1)
    conv = _conv(
        in_channels=4,
        out_channels=6,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
    )
    split = Conv3dAs2d.from_conv(conv, taps=taps)  # type: ignore[arg-type]
    x = torch.randn(2, 4, *size, dtype=F64)
    torch.testing.assert_close(split(x), conv(x), rtol=1e-10, atol=1e-10)
    assert sum(p.numel() for p in split.parameters()) == sum(p.numel() for p in conv.parameters())
    torch.testing.assert_close(split.conv3d_weight(), conv.weight)


def test_exact_split_same_padding_and_gradients() -> None:
    conv = _conv(in_channels=3, out_channels=5, kernel_size=3, padding="same")
    split = Conv3dAs2d.from_conv(conv)
    x = torch.randn(1, 3, 4, 5, 5, dtype=F64, requires_grad=True)
    torch.testing.assert_close(split(x), conv(x))
    (gx,) = torch.autograd.grad(split(x).square().sum(), x)
    (gx_ref,) = torch.autograd.grad(conv(x).square().sum(), x)
    torch.testing.assert_close(gx, gx_ref)


class _Record(TorchDispatchMode):
    """Records (op name, input ranks, output rank) of every aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[int], int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        ranks = [a.dim() for a in args if isinstance(a, torch.Tensor)]
        self.ops.append((str(func), ranks, out.dim() if isinstance(out, torch.Tensor) else -1))
        return out


@pytest.mark.parametrize(
    "module",
    [
        Conv3dAs2d(4, 6, 3, padding=1, taps="stack"),
        Conv3dAs2d(4, 6, 3, padding=1, groups=2, taps="sum"),
        Conv2Plus1d(4, 6, rank=5, kernel_size=3, padding=1, combine="add"),
        Conv2Plus1d(4, 6, rank=5, kernel_size=3, stride=2, padding=1, combine="cat"),
    ],
)
def test_all_conv_compute_is_4d(module: nn.Module) -> None:
    x = torch.randn(2, 4, 5, 6, 6)
    with torch.no_grad(), _Record() as rec:
        module(x)
    convs = [op for op in rec.ops if "convolution" in op[0]]
    assert convs and all(ranks[0] == 4 and ranks[1] == 4 for _, ranks, _ in convs)
    five_d = [i for i, (_, _, out) in enumerate(rec.ops) if out == 5]
    assert five_d == [len(rec.ops) - 1]  # only the returned tensor is 5D


def test_exact_refuses_non_zero_padding_mode() -> None:
    conv = nn.Conv3d(2, 2, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode `reflect`"):
        Conv3dAs2d.from_conv(conv)
    model = nn.Sequential(conv)
    p = SplitPass(parse("split Conv3d exact").statements[0])
    p.ensure_context(model)
    plan = p.plan(model)
    assert plan.rows[0].action == "skip" and "padding_mode" in plan.rows[0].note
    assert p.context is not None and p.context.warnings[0].code == "S0360"
    assert not p(model).modified


# --- (2+1)D rewrite -----------------------------------------------------------------------------


@pytest.mark.parametrize("combine", ["add", "cat"])
@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [
        (3, 1, 1, 1),
        ((3, 3, 3), (2, 2, 2), (1, 1, 1), 1),
        ((2, 4, 4), (2, 4, 4), 0, 1),  # VideoMAE-style tubelet
        ((3, 1, 3), (1, 2, 1), (0, 0, 2), (2, 1, 1)),
        ((1, 3, 3), 1, (0, 1, 1), 1),
        ((4, 3, 3), (3, 1, 1), (2, 1, 1), 1),  # even kT: the centre tap is the lower middle
    ],
)
def test_2plus1d_shapes_match(
    combine: str, kernel: Any, stride: Any, padding: Any, dilation: Any
) -> None:
    conv = _conv(
        in_channels=3,
        out_channels=8,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
    )
    x = torch.randn(2, 3, 8, 12, 12, dtype=F64)
    m = Conv2Plus1d.from_conv(conv, rank=4, combine=combine)  # type: ignore[arg-type]
    assert m(x).shape == conv(x).shape
    if combine == "add":  # full rank is exact
        full = Conv2Plus1d.from_conv(conv, rank=Conv2Plus1d.full_rank(conv))
        torch.testing.assert_close(full(x), conv(x), rtol=1e-9, atol=1e-9)


def _separable_conv(rank: int, centre_only: list[int] | None = None) -> nn.Conv3d:
    """A 4→6, 3×3×3 conv whose kernel is exactly rank-``rank`` in the time×space split."""
    torch.manual_seed(1)
    temporal = torch.randn(6, 3, rank, dtype=F64)  # [S, kT, R]
    for s in centre_only or []:
        temporal[s, [0, 2]] = 0  # channel s uses only the centre frame
    spatial = torch.randn(rank, 4, 3, 3, dtype=F64)  # [R, C, kH, kW]
    conv = _conv(in_channels=4, out_channels=6, kernel_size=3, stride=(2, 1, 1), padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("sir,rchw->scihw", temporal, spatial))
    return conv


@pytest.mark.parametrize("rank", [1, 3])
def test_separable_init_is_exact_for_separable_kernel(rank: int) -> None:
    conv = _separable_conv(rank)
    m = Conv2Plus1d.from_conv(conv, rank=rank, combine="add")
    x = torch.randn(2, 4, 7, 6, 6, dtype=F64)
    torch.testing.assert_close(m(x), conv(x), rtol=1e-9, atol=1e-9)
    _, _, energy = separable_factors(conv.weight, rank)
    assert float(energy) == pytest.approx(1.0)


@pytest.mark.parametrize("rank", [1, 3])
def test_cat_init_is_exact_when_half_the_channels_are_purely_spatial(rank: int) -> None:
    """`cat`: the spatial branch takes the channels that need no other frame, whichever they are."""
    conv = _separable_conv(rank, centre_only=[1, 4, 5])
    m = Conv2Plus1d.from_conv(conv, rank=rank, combine="cat")
    assert m.spatial_channels == 3 and m.center.out_channels == 3 and m.temporal.out_channels == 3
    x = torch.randn(2, 4, 7, 6, 6, dtype=F64)
    torch.testing.assert_close(m(x), conv(x), rtol=1e-9, atol=1e-9)
    assert Conv2Plus1d.param_count(4, 6, rank, 3, "cat") == sum(p.numel() for p in m.parameters())
    assert Conv2Plus1d.param_count(4, 6, rank, 3, "add") == sum(
        p.numel() for p in Conv2Plus1d.from_conv(conv, rank=rank).parameters()
    )


def test_2plus1d_error_non_increasing_in_rank() -> None:
    conv = _conv(in_channels=4, out_channels=6, kernel_size=3, padding=1)
    x = torch.randn(1, 4, 5, 6, 6, dtype=F64)
    with torch.no_grad():
        ref = conv(x)
    with torch.no_grad():
        errors = [
            float((Conv2Plus1d.from_conv(conv, rank=r)(x) - ref).norm()) for r in (1, 4, 9, 18)
        ]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-9


def test_2plus1d_refuses_groups() -> None:
    conv = nn.Conv3d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="grouped"):
        Conv2Plus1d.from_conv(conv, rank=2)
    model = nn.Sequential(conv)
    p = SplitPass(parse("split Conv3d (2+1)d").statements[0])
    p.ensure_context(model)
    assert p.plan(model).rows[0].action == "skip"
    assert p.context is not None and p.context.warnings[0].code == "S0361"


# --- save / reload ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [
        Conv3dAs2d(4, 6, (3, 2, 3), stride=(2, 1, 1), padding=1, dtype="float64"),
        Conv3dAs2d(4, 6, 3, groups=2, bias=False, dtype="float64"),
        Conv2Plus1d(4, 6, rank=3, kernel_size=3, padding=1, combine="add", dtype="float64"),
        Conv2Plus1d(
            4, 6, rank=3, kernel_size=3, stride=2, combine="cat", bias=False, dtype="float64"
        ),
        Conv2Plus1d.from_conv(_separable_conv(2), rank=2, combine="cat", spatial_channels=2),
    ],
)
def test_save_reload(module: nn.Module) -> None:
    assert isinstance(module, Conv3dAs2d | Conv2Plus1d)
    rebuilt = build(module.registry_name(), module.spec())
    rebuilt.load_state_dict(module.state_dict())
    x = torch.randn(2, 4, 6, 7, 7, dtype=F64)
    assert torch.equal(rebuilt(x), module(x))
    assert all(t.dim() <= 4 for t in module.state_dict().values())


# --- the pass, end to end -----------------------------------------------------------------------


class R2Plus1Net(nn.Module):
    """A tiny video CNN with R(2+1)D-like stages, built as plain Conv3d layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(3, 16, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn = nn.BatchNorm3d(16)
        self.block = nn.Sequential(
            nn.Conv3d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 32, 3, stride=2, padding=1)
        )
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(torch.relu(self.bn(self.stem(x))))
        return self.head(y.mean(dim=(2, 3, 4)))


def test_exact_pass_end_to_end_preserves_outputs() -> None:
    torch.manual_seed(0)
    model = R2Plus1Net().double().eval()
    x = torch.randn(2, 3, 6, 16, 16, dtype=F64)
    before = model(x)
    result = SplitPass(parse("split Conv3d exact").statements[0])(model)
    assert result.modified
    assert [type(m).__name__ for m in (model.stem, model.block[0], model.block[2])] == [
        "Conv3dAs2d"
    ] * 3
    torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)


def test_2plus1d_pass_plan_with_measured_flops() -> None:
    torch.manual_seed(0)
    model = R2Plus1Net().eval()
    x = torch.randn(1, 3, 6, 16, 16)
    analysis = analyze(model, Inputs((x,), {}))
    stmt = parse('split Conv3d where name ~ "block.*" (2+1)d cat rank = 0.25').statements[0]
    p = SplitPass(stmt, PassContext(analysis=analysis))
    plan = p.plan(model)
    rows = {r.path: r for r in plan.rows}
    assert set(rows) == {"block.0", "block.2"}
    for row in rows.values():
        assert row.action == "split" and row.detail["combine"] == "cat"
        assert row.flops_before > 0 and 0 < row.flops_after < row.flops_before
        assert row.params_after < row.params_before
    changes = p.apply(model, plan)
    assert {c.path for c in changes} == {"block.0", "block.2"}
    assert isinstance(model.block[0], Conv2Plus1d) and model(x).shape == (1, 5)
    assert sum(p.numel() for p in model.block[0].parameters()) == rows["block.0"].params_after


def test_2plus1d_default_rank_saves_parameters_and_skips_tiny_layers() -> None:
    model = nn.Sequential(nn.Conv3d(16, 16, 3, padding=1), nn.Conv3d(1, 1, (3, 1, 1)))
    p = SplitPass(parse("split Conv3d (2+1)d").statements[0])
    p.ensure_context(model)
    plan = p.plan(model)
    big, tiny = plan.rows
    assert big.action == "split" and big.params_after < big.params_before
    assert tiny.action == "skip" and "fewer parameters" in tiny.note


@pytest.mark.parametrize(
    ("source", "code"),
    [
        ("split Conv3d exact rank = 4", "S0204"),  # check
        ("split Conv3d exact add", "S0204"),
        ("split Conv3d fancy", "S0102"),  # grammar: the only modes
        ("split Conv3d (2+1)d mul", "S0103"),  # grammar: the only combinations
    ],
)
def test_the_front_end_rejects_what_split_does_not_revalidate(source: str, code: str) -> None:
    from surgery.check import check
    from surgery.diagnostics import DiagnosticError

    try:
        found = [d.code for d in check(parse(source))]
    except DiagnosticError as exc:
        found = [d.code for d in exc.diagnostics]
    assert code in found


def _tiny_videomae() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.VideoMAEConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        num_frames=4,
        tubelet_size=2,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    return transformers.VideoMAEModel(config).eval()


def test_videomae_tubelet_exact_and_2plus1d() -> None:
    model = _tiny_videomae()
    pixels = torch.randn(2, 4, 3, 32, 32)  # (B, T, C, H, W): VideoMAE permutes to Conv3d order
    before = model(pixel_values=pixels).last_hidden_state
    result = SplitPass(parse("split Conv3d exact").statements[0])(model)
    assert result.modified
    assert isinstance(model.embeddings.patch_embeddings.projection, Conv3dAs2d)
    torch.testing.assert_close(
        model(pixel_values=pixels).last_hidden_state, before, rtol=1e-5, atol=1e-5
    )

    model = _tiny_videomae()
    stmt = parse("split Conv3d (2+1)d add rank = 0.25").statements[0]
    p = SplitPass(stmt, PassContext(analysis=analyze(model, Inputs((), {"pixel_values": pixels}))))
    plan = p.plan(model)
    [row] = plan.rows
    assert row.action == "split", row.note
    assert row.detail["rank"] == 16 and 0 < row.detail["energy"] < 1
    assert row.flops_after < row.flops_before
    p.apply(model, plan)
    assert isinstance(model.embeddings.patch_embeddings.projection, Conv2Plus1d)
    assert model(pixel_values=pixels).last_hidden_state.shape == before.shape


def test_hand_built_analysis_is_enough() -> None:
    """The pass needs only module facts: a hand-built Analysis works without surgery.graph."""
    import networkx as nx

    model = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1))
    info = ModuleInfo(
        path="0", type="Conv3d", params=sum(p.numel() for p in model.parameters()), flops=0
    )
    analysis = Analysis(
        modules={"0": info},
        blocks=[],
        graph=nx.DiGraph(),
        traced=False,
        total_params=info.params,
        total_flops=0,
    )
    result = SplitPass(
        parse("split Conv3d (2+1)d rank = 8").statements[0], PassContext(analysis=analysis)
    )(model)
    assert result.modified and isinstance(model[0], Conv2Plus1d) and model[0].rank == 8
