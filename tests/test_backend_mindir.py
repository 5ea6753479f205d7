"""MindIR backend: the aten graph rebuilt as a MindSpore cell, exported, reloaded, run on CPU.

Needs MindSpore (``pip install mindspore==2.10.0``): without it every lowering test skips with
the backend's own reason. The translation rules are tested op by op on small modules where
MindSpore's defaults differ from torch's (exact GELU, layer-norm epsilon, masks, dtype
promotion) or where MindSpore has no CPU kernel (einsum and its diagonals, transposed
convolution, scatter reductions), then on
surgered tiny BERT, GPT-2 and a token-skipping ViT through the shared ``verify``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import surgery
from surgery.backends import LoweringError, get_backend, verify
from surgery.backends.mindir import MindirBackend, generate_cell_source, mapped_ops
from surgery.check import check
from surgery.inputs import Inputs
from surgery.manager import Manager, Run
from surgery.report import report_markdown
from tests.helpers_models import tiny_bert, tiny_gpt2, tiny_vit


@pytest.fixture(scope="module")
def backend() -> MindirBackend:
    b = MindirBackend("cpu")
    ok, why = b.is_available()
    if not ok:
        pytest.skip(why)
    return b


def _lowered_close(
    backend: MindirBackend,
    model: nn.Module,
    *args: Tensor,
    tmp_path: Path,
    tol: float = 1e-5,
) -> list[Tensor]:
    """Lower ``model`` and assert the reloaded MINDIR reproduces torch on ``args``."""
    ins = Inputs(args, {})
    low = backend.lower(model, ins, tmp_path)
    with torch.no_grad():
        ref = model(*args)
    refs = list(ref) if isinstance(ref, tuple) else [ref]
    outs = low(ins)
    assert len(outs) == len(refs)
    for r, o in zip(refs, outs):
        assert o.dtype == r.dtype and o.shape == r.shape
        if r.is_floating_point():
            torch.testing.assert_close(o, r, rtol=tol, atol=tol)
        else:
            assert torch.equal(o, r)
    return outs


# --- op by op -------------------------------------------------------------------------------


class _Gelu(nn.Module):
    def __init__(self, approximate: str) -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate=self.approximate)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_keeps_torch_approximation(
    approximate: str, backend: MindirBackend, tmp_path: Path
) -> None:
    x = torch.linspace(-4, 4, 256).reshape(4, 64)
    (out,) = _lowered_close(backend, _Gelu(approximate).eval(), x, tmp_path=tmp_path, tol=1e-6)
    other = F.gelu(x, approximate="tanh" if approximate == "none" else "none")
    assert (out - other).abs().max() > 1e-4  # the two modes differ by more than the tolerance


def test_layer_norm_epsilon_from_the_node(backend: MindirBackend, tmp_path: Path) -> None:
    # A large epsilon: MindSpore's default (1e-7) would miss the tolerance by far.
    torch.manual_seed(0)
    ln = nn.LayerNorm(16, eps=0.5)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    model = nn.Sequential(ln, nn.LayerNorm(16, elementwise_affine=False, eps=1e-12)).eval()
    _lowered_close(backend, model, torch.randn(2, 3, 16) * 0.3, tmp_path=tmp_path)


class _Attention(nn.Module):
    """Masks from an integer input, softmax over a non-last dim, matmul and bmm."""

    def forward(self, q: Tensor, k: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        scores = q @ k.transpose(-1, -2) / 4  # (B, T, T)
        keep = mask[:, None, :].to(torch.bool)  # (B, 1, T) from int64
        masked = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        probs = torch.softmax(masked, dim=-1)
        cols = torch.softmax(scores, dim=1)
        where = torch.where(mask[:, :, None] > 0, q, torch.zeros((), dtype=q.dtype))
        return torch.bmm(probs, k), cols, where, keep & (mask[:, :, None] == 1)


def test_masks_softmax_matmul(backend: MindirBackend, tmp_path: Path) -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    _lowered_close(backend, _Attention().eval(), q, k, mask, tmp_path=tmp_path)


class _Sdpa(nn.Module):
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        bool_mask = mask[:, None, None, :].bool()  # (B, 1, 1, S)
        return (
            F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask),
            F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3),
        )


def test_scaled_dot_product_attention(backend: MindirBackend, tmp_path: Path) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    _lowered_close(backend, _Sdpa().eval(), q, k, v, mask, tmp_path=tmp_path)


class _Indexing(nn.Module):
    """Embedding, integer promotion, slicing, select, split, cat, index and cumsum."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.register_buffer("positions", torch.arange(8).unsqueeze(0), persistent=False)

    def forward(self, ids: Tensor) -> tuple[Tensor, ...]:
        e = self.emb(ids) + self.emb(self.positions[:, : ids.shape[1]])  # (B, T, 6)
        a, b = e.split([2, 4], dim=-1)
        scaled = ids * 0.5  # int64 * float -> float32, as torch promotes
        rows = torch.arange(ids.shape[0])[:, None]
        picked = e[rows, ids % 3]  # advanced indexing on leading dims
        return torch.cat([b, a], dim=-1)[:, 1:-1], e[:, 0], scaled, picked, ids.cumsum(-1)


def test_indexing_and_promotion(backend: MindirBackend, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 3, 4, 9], [0, 5, 6, 7, 8]])
    _lowered_close(backend, _Indexing().eval(), ids, tmp_path=tmp_path)


def test_convolution_batch_norm_pooling(backend: MindirBackend, tmp_path: Path) -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        bn,
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=(0, 1), groups=2, bias=False),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()
    _lowered_close(backend, model, torch.randn(2, 4, 16, 16), tmp_path=tmp_path, tol=1e-4)


def test_kxk_convolutions_run_as_im2col_on_cpu(backend: MindirBackend, tmp_path: Path) -> None:
    """MindSpore's CPU k×k conv kernel is ~100× slower than its ``Im2Col`` + 1×1 conv: on
    ``cpu`` every conv but a plain ungrouped 1×1 one takes that exact form (a batched matmul
    when grouped), whatever its stride, dilation, padding or kernel shape; on Ascend every
    conv stays one conv."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 16, stride=16),  # a ViT patch embedding
        nn.Conv2d(6, 5, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(1, 2)),
        nn.Conv2d(5, 4, 1),
        nn.Conv2d(4, 4, 1, stride=2),  # a ResNet shortcut: slow as a strided 1×1 Conv2D
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False),  # depthwise
        nn.Conv2d(6, 6, 1, groups=3),
    ).eval()
    x = torch.randn(2, 3, 64, 48)
    _lowered_close(backend, model, x, tmp_path=tmp_path, tol=1e-4)
    program = torch.export.export(model, (x,))
    cpu, _ = generate_cell_source(program)
    ascend, _ = generate_cell_source(program, device="ascend")
    assert cpu.count("ops.Im2Col(") == 6 and cpu.count("ops.conv2d(") == 4
    assert "ops.Im2Col(ksizes=(16, 16), strides=(16, 16)" in cpu
    assert "ops.Im2Col(" not in ascend and ascend.count("ops.conv2d(") == 7
    conv1d = nn.Conv1d(4, 6, 5, stride=2, padding=3, dilation=2, groups=2).eval()
    _lowered_close(backend, conv1d, torch.randn(2, 4, 21), tmp_path=tmp_path / "1d", tol=1e-5)


class _Residual(nn.Module):
    """A ResNet block's in-place ops: ``ReLU(inplace=True)`` and ``out += identity``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        out += x
        return self.act(out)


def test_in_place_ops_whose_input_dies(backend: MindirBackend, tmp_path: Path) -> None:
    torch.manual_seed(0)
    _lowered_close(backend, _Residual().eval(), torch.randn(1, 4, 6, 6), tmp_path=tmp_path)


def test_conv1d_and_silu(backend: MindirBackend, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 5, 3, padding=2, dilation=2), nn.SiLU()).eval()
    _lowered_close(backend, model, torch.randn(2, 3, 12), tmp_path=tmp_path)


class _Einsum(nn.Module):
    """The equations the passes produce (token scoring, Tucker kernels) and the odd cases."""

    def forward(self, a: Tensor, b: Tensor, u: Tensor, v: Tensor) -> tuple[Tensor, ...]:
        core = a[:, :, :3, :3]  # (4, 3, 3, 3) as [r_out, r_in, kh, kw]
        return (
            torch.einsum("bhd,bhtd->bht", a[:, :, 0], b),  # skip tokens' CLS scores
            torch.einsum("oikl,so,ic->sckl", core, u, v),  # a Tucker kernel, three operands
            torch.einsum("...td,...sd", b, b),  # ellipsis, implicit output
            torch.einsum("bhtd,xhtd->bhd", b, b[:1]),  # a broadcast batch dim of size 1
            torch.einsum("ijkl->lj", a),  # a sum and a transpose, one operand
            torch.einsum("ij,ij->", u, u),  # a full contraction to a 0-d tensor
            torch.einsum("i,j->ij", u[0], v[0]),  # an outer product
        )


def test_einsum_lowered_to_batched_matmuls(backend: MindirBackend, tmp_path: Path) -> None:
    torch.manual_seed(0)
    a, b = torch.randn(4, 3, 5, 6), torch.randn(4, 3, 7, 6)
    u, v = torch.randn(2, 4), torch.randn(3, 2)
    _lowered_close(backend, _Einsum().eval(), a, b, u, v, tmp_path=tmp_path)
    source = (tmp_path / "model_cell.py").read_text()
    assert "einsum" not in source and "ops.matmul" in source  # MindSpore's Einsum has no CPU kernel


class _EinsumDiagonal(nn.Module):
    """Repeated subscripts in one operand: diagonals, taken before the contraction."""

    def forward(self, m: Tensor, b: Tensor, c: Tensor, k: Tensor) -> tuple[Tensor, ...]:
        return (
            torch.einsum("ii->", m),  # a trace
            torch.einsum("ii", m),  # the same, implicit output
            torch.einsum("ii->i", m),  # the diagonal itself
            torch.einsum("bii->bi", b),  # a batch of diagonals
            torch.einsum("iij,jk->ik", c, k),  # a diagonal, then a contraction
            torch.einsum("ijij->ji", c.reshape(3, 2, 3, 2)),  # two repeated subscripts
            torch.einsum("iii->i", c[:, :, :3]),  # a subscript three times
            torch.einsum("bii,bi->b", b, b[:, 0]),  # a diagonal contracted with a batch
        )


def test_einsum_diagonal(backend: MindirBackend, tmp_path: Path) -> None:
    torch.manual_seed(0)
    m, b = torch.randn(4, 4), torch.randn(2, 5, 5)
    c, k = torch.randn(3, 3, 4), torch.randn(4, 2)
    c[0, 1] = math.inf  # off the diagonal: a mask-and-sum would turn it into nan
    _lowered_close(backend, _EinsumDiagonal().eval(), m, b, c, k, tmp_path=tmp_path, tol=1e-6)
    source = (tmp_path / "model_cell.py").read_text()
    assert "einsum" not in source and "diagonal" not in source


class _Selection(nn.Module):
    """Top-k, sort, take_along_dim, scatter and a write into a view (skip tokens' selection)."""

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        scores = x.mean(-1)  # (B, T)
        scores[:, 0] = math.inf  # a fill_ of a select: the first token always wins
        top = scores.topk(4, dim=1)
        idx = top.indices.sort(dim=1).values  # (B, 4) int64, ascending
        low = torch.topk(x, 2, dim=1, largest=False).values
        desc = torch.sort(x, dim=-1, descending=True)
        kept = torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[-1]))
        cut = torch.take_along_dim(mask, idx[:, None, :], dim=-1)  # (B, 1, 4) from (B, 1, T)
        full = torch.zeros_like(x).scatter(1, idx[:, :, None].expand(-1, -1, x.shape[-1]), kept)
        ones = x.scatter(1, idx[:, :, None], 1.0)  # a value into part of the rows
        return top.values, idx, low, desc.values, desc.indices, cut, full, ones, mask.any(-1)


def test_topk_sort_scatter_and_view_writes(backend: MindirBackend, tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 7, 5)
    mask = torch.tensor([[[1.0, 0, 1, 1, 0, 1, 1]], [[0.0, 0, 0, 0, 0, 0, 0]]])
    outs = _lowered_close(backend, _Selection().eval(), x, mask, tmp_path=tmp_path)
    assert (outs[1][:, 0] == 0).all()  # the view write reached top-k: token 0 is kept


def test_write_into_a_view_read_afterwards_is_refused() -> None:
    class StaleView(nn.Module):
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            y = x * 2
            first = y[:, 0]  # a view taken before the write, read after it
            y[:, 0] = 1.0
            return y, first + 1

    with pytest.raises(LoweringError, match=r"fill_ writes into `mul` while its view"):
        generate_cell_source(torch.export.export(StaleView(), (torch.ones(2, 3),)))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_conv_padding_same(backend: MindirBackend, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding="same"),
        nn.Conv2d(4, 4, (2, 4), padding="same", dilation=(1, 1)),  # uneven: extra at the end
        nn.Conv2d(4, 2, 3, padding="valid"),
    ).eval()
    _lowered_close(backend, model, torch.randn(1, 3, 9, 8), tmp_path=tmp_path, tol=1e-4)
    conv1d = nn.Conv1d(2, 3, 4, padding="same", dilation=2).eval()
    _lowered_close(backend, conv1d, torch.randn(2, 2, 11), tmp_path=tmp_path / "1d", tol=1e-5)


def test_transposed_convolution(backend: MindirBackend, tmp_path: Path) -> None:
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0))
    grouped = nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2, dilation=2, bias=False)
    model = nn.Sequential(up, nn.ReLU(), grouped).eval()
    _lowered_close(backend, model, torch.randn(2, 4, 5, 6), tmp_path=tmp_path, tol=1e-4)
    conv1d = nn.ConvTranspose1d(3, 2, 4, stride=3, padding=1).eval()
    _lowered_close(backend, conv1d, torch.randn(2, 3, 7), tmp_path=tmp_path / "1d", tol=1e-5)


class _ConvTranspose3dAten(nn.Module):
    """``aten.convolution`` with ``transposed=True``, as some exporters spell it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 2, 3, 2) * 0.3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.aten.convolution.default(
            x, self.weight, None, [1, 2, 1], [0, 1, 1], [1, 1, 2], True, [0, 1, 1], 1
        )


def test_transposed_convolution_3d(backend: MindirBackend, tmp_path: Path) -> None:
    torch.manual_seed(0)
    up = nn.ConvTranspose3d(
        4, 6, (3, 2, 3), stride=(2, 1, 3), padding=(1, 0, 1), output_padding=(1, 0, 2)
    )
    # A depth dilation (spread into the kernel) and output_padding >= stride (< dilation).
    grouped = nn.ConvTranspose3d(
        6, 4, 3, stride=1, padding=(2, 1, 0), output_padding=(1, 0, 0), dilation=(3, 2, 1), groups=2
    )
    model = nn.Sequential(up, nn.ReLU(), grouped).eval()
    _lowered_close(backend, model, torch.randn(2, 4, 3, 5, 4), tmp_path=tmp_path, tol=1e-5)
    source = (tmp_path / "model_cell.py").read_text()
    assert "ops.Conv3DTranspose" in source
    aten = _ConvTranspose3dAten().eval()
    _lowered_close(backend, aten, torch.randn(1, 4, 3, 4, 5), tmp_path=tmp_path / "aten", tol=1e-5)


def test_transposed_convolution_3d_in_float64_is_refused() -> None:
    model = nn.ConvTranspose3d(2, 2, 2).double().eval()
    program = torch.export.export(model, (torch.ones(1, 2, 3, 3, 3, dtype=torch.float64),))
    with pytest.raises(LoweringError, match=r"3-d transposed convolution in torch.float64"):
        generate_cell_source(program)


class _ScatterReduce(nn.Module):
    """Every scatter reduction, with duplicate indices and an index smaller than ``src``."""

    def forward(self, x: Tensor, index: Tensor, src: Tensor) -> tuple[Tensor, ...]:
        rows = index[:2] % 3  # (2, 3): dim 0 scatters across rows
        outs = [
            x.scatter(1, index, src, reduce="add"),
            x.scatter(1, index, src, reduce="multiply"),
            x.scatter(1, index, 1.5, reduce="add"),
            x.scatter(0, rows, -2.0, reduce="multiply"),
            x.scatter_add(1, index, src),
            torch.scatter_add(x, 0, rows, src),
        ]
        for reduce in ("sum", "prod", "amax", "amin", "mean"):
            for include_self in (True, False):
                outs.append(x.scatter_reduce(1, index, src, reduce, include_self=include_self))
        outs.append(x.scatter_reduce(0, rows, src, "mean", include_self=False))
        return tuple(outs)


class _ScatterReduceInt(nn.Module):
    def forward(self, x: Tensor, index: Tensor, src: Tensor) -> tuple[Tensor, ...]:
        return tuple(
            x.scatter_reduce(1, index, src, reduce, include_self=include_self)
            for reduce in ("sum", "prod", "amax", "amin", "mean")
            for include_self in (True, False)
        )


@pytest.mark.filterwarnings("ignore:The reduce argument of torch.scatter")
def test_scatter_reductions(backend: MindirBackend, tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, src = torch.randn(3, 5), torch.randn(3, 4)
    index = torch.tensor([[0, 0, 2], [4, 4, 4], [1, 3, 3]])  # duplicates; column 4 of src unread
    _lowered_close(backend, _ScatterReduce().eval(), x, index, src, tmp_path=tmp_path, tol=1e-6)
    xi, si = torch.randint(-9, 10, (3, 5)), torch.randint(-9, 10, (3, 4))
    model = _ScatterReduceInt().eval()
    _lowered_close(backend, model, xi, index, si, tmp_path=tmp_path / "int")  # mean floors


def test_scatter_reduction_on_bool_is_refused() -> None:
    class Any(nn.Module):
        def forward(self, x: Tensor, index: Tensor, src: Tensor) -> Tensor:
            return x.scatter_add(1, index, src)

    args = (
        torch.zeros(2, 3, dtype=torch.bool),
        torch.tensor([[0], [2]]),
        torch.ones(2, 1, dtype=torch.bool),
    )
    with pytest.raises(LoweringError, match=r"scatter with reduction 'sum' on torch.bool"):
        generate_cell_source(torch.export.export(Any(), args))


class _Unmapped(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.cumprod(x, dim=1) + 1


def test_unmapped_op_names_the_op_and_node() -> None:
    program = torch.export.export(_Unmapped(), (torch.ones(2, 3),))
    with pytest.raises(
        LoweringError,
        match=r"^mindir: no mapping for aten\.cumprod\.default \(used by node `cumprod`\)$",
    ):
        generate_cell_source(program)


def test_generated_source_folds_constants() -> None:
    class M(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x + torch.arange(4).float()  # arange depends on nothing: a constant

    source, state = generate_cell_source(torch.export.export(M(), (torch.ones(4),)))
    assert "arange" not in source and "v0 = ops.add(x0, self.c0)" in source
    assert torch.equal(state.consts[0][1], torch.arange(4).float())
    assert "aten.scaled_dot_product_attention.default" in mapped_ops()


# --- surgered models, the artifact, the target ----------------------------------------------


def _surgered(factory: object, recipe: str) -> Run:
    assert callable(factory)
    return Manager(surgery.parse(recipe), factory()).run(measure=False)


@pytest.mark.parametrize(
    ("factory", "recipe"),
    [(tiny_bert, "decompose Linear rank = 0.5"), (tiny_gpt2, "decompose Conv1D rank = 0.5")],
    ids=["bert", "gpt2"],
)
def test_surgered_model_numerics(
    factory: object, recipe: str, backend: MindirBackend, tmp_path: Path
) -> None:
    run = _surgered(factory, recipe)
    v = verify(run.original, run.model, backend, run.example, warmup=1, repeats=3, workdir=tmp_path)
    assert v.status == "ok", str(v)
    assert v.lowering_error is not None and v.lowering_error <= 1e-5
    assert v.baseline_error is not None and v.baseline_error <= 1e-5
    assert v.drift_eager is not None and v.drift_eager > 0  # the surgery changed the model
    assert v.speed is not None and v.speed.repeats == 3 and v.speed.device == "mindir-cpu"
    assert v.artifacts == [tmp_path / "model.mindir", tmp_path / "model_cell.py"]
    assert "LowRank" not in v.artifacts[1].read_text()  # plain MindSpore ops, no torch modules


def test_skip_tokens_vit_numerics(backend: MindirBackend, tmp_path: Path) -> None:
    # einsum scoring, a write into a view, top-k, sort, take_along_dim, gather, scatter
    run = _surgered(tiny_vit, "skip tokens 50% after block 0")
    v = verify(run.original, run.model, backend, run.example, warmup=1, repeats=3, workdir=tmp_path)
    assert v.status == "ok", str(v)
    assert v.lowering_error is not None and v.lowering_error <= 1e-5
    assert v.drift_eager is not None and v.drift_eager > 0  # tokens were skipped


def test_mindir_file_reloads_on_its_own(backend: MindirBackend, tmp_path: Path) -> None:
    import mindspore as ms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh()).eval()
    x = torch.randn(3, 8)
    backend.lower(model, Inputs((x,), {}), tmp_path)
    cell = ms.nn.GraphCell(ms.load(str(tmp_path / "model.mindir")))
    (out,) = cell(ms.Tensor(x.numpy()))
    torch.testing.assert_close(torch.from_numpy(out.asnumpy()), model(x), rtol=1e-6, atol=1e-6)
    # Lowering again into the same directory replaces the (read-only) file.
    backend.lower(model, Inputs((x,), {}), tmp_path)


def test_mindir_target_reports_a_labelled_ascend_estimate(
    backend: MindirBackend, tmp_path: Path
) -> None:
    """`target mindir` times MindSpore's CPU runtime and, beside it, estimates Ascend; the
    report never lets the estimate read as a measurement."""
    recipe = "decompose Linear rank = 0.5\ntarget mindir"
    run = Manager(surgery.parse(recipe), tiny_bert()).run(
        warmup=1, repeats=3, workdir=tmp_path / "lowered"
    )
    (v,) = run.verifications
    assert v.ok and v.speed is not None and v.speed.device == "mindir-cpu"
    assert v.estimate is not None and v.estimate.spec.name == "Ascend 910"
    assert v.as_dict()["estimate"]["kind"] == "estimate (roofline), not a measurement"
    text = report_markdown(run, recipe="r.surg", model="tiny-bert", recipe_source=recipe)
    (line,) = [ln for ln in text.splitlines() if ln.startswith("- mindir-cpu")]
    assert "on mindir-cpu" in line and "Ascend 910 estimate" in line
    assert line.endswith("not a measurement)")
    assert "roofline estimate from the device's published peak" in text


def test_ascend_is_never_measured_here() -> None:
    ascend = MindirBackend("ascend")
    ok, why = ascend.is_available()
    assert ascend.name == "mindir-ascend"
    if not ok:
        assert "Ascend" in why or "MindSpore" in why
    with pytest.raises(ValueError, match="not implemented"):
        get_backend("mindir", "ascend")
    assert get_backend("mindir").name == "mindir-cpu"


def test_recipe_targets_mindir() -> None:
    ok = check(
        surgery.parse("decompose Linear rank = 0.5\ntarget mindir\nexpect speedup >= 1 on mindir")
    )
    assert ok == []
    (d,) = check(surgery.parse("target mindir ascend"))
    assert d.code == "S0209" and "mindir cpu" in (d.help or "")
