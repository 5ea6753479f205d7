"""MindIR backend: the aten graph rebuilt as a MindSpore cell, exported, reloaded, run on CPU.

Needs MindSpore (``pip install mindspore==2.10.0``): without it every lowering test skips with
the backend's own reason. The translation rules are tested op by op on small modules where
MindSpore's defaults differ from torch's (exact GELU, layer-norm epsilon, masks, dtype
promotion), then on surgered tiny BERT and GPT-2 through the shared ``verify``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import surgery
from surgery.backends import LoweringError, get_backend, verify
from surgery.backends.mindir_backend import MindirBackend, generate_cell_source, mapped_ops
from surgery.check import check
from surgery.inputs import Inputs
from surgery.manager import Manager, Run
from tests.helpers_models import tiny_bert, tiny_gpt2


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
