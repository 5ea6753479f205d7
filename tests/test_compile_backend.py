"""Matrix passes on FX graphs (`surgery.fx_surgery`): a `torch.compile` backend and
`torch.export` programs compute what the module passes compute, factor for factor."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from surgery.fx_surgery import (
    GraphSurgeryError,
    compile_backend,
    rewrite_exported,
    rewrite_graph,
)
from surgery.graph import analyze
from surgery.inputs import Inputs
from surgery.modules.sparse import SparseLinear, nm_mask
from surgery.parse import parse
from surgery.passes import PassContext, pass_for
from tests.helpers_models import tiny_bert, tiny_gpt2


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def module_path(model: nn.Module, text: str, example: Inputs | None) -> nn.Module:
    """The recipe carried out by the module passes on a copy of ``model``."""
    model = copy.deepcopy(model)
    for stmt in parse(text).statements:
        context = PassContext(analysis=analyze(model, example), example=example)
        pass_for(stmt, context).run(model)
    return model


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 16)
    ).eval()


def compiled(model: nn.Module, text: str, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """Outputs of ``model`` compiled (eagerly) with the recipe's backend, and the backend."""
    backend = compile_backend(text, compiler="eager")
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(*args, **kwargs)
    return out, backend


def run(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        return model(*args, **kwargs)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- torch.compile on an MLP --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "decompose Linear rank = 0.25",
        "decompose Linear rank = 12",
        'decompose Linear where params > 5K and name ~ "2" rank = energy 0.8',
        "decompose Linear where in_features == 64 and out_features > 16 rank = 0.25",
        "decompose Linear budget flops 50%",
        "decompose Linear budget params 60% by sensitivity",
        "decompose Linear rank = 0.25 method svd-llm",
        "decompose Linear rank = 0.25 method asvd",
        "sparsify Linear where out_features >= 64 2:4\ndecompose Linear rank = 0.25",
    ],
)
def test_backend_equals_the_module_path_on_an_mlp(text: str) -> None:
    model = mlp()
    x = torch.randn(4, 10, 64)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    out, backend = compiled(model, text, x)
    reference = module_path(model, text, Inputs((x,), {}))
    assert torch.allclose(out, run(reference, x), rtol=0, atol=1e-6)
    assert rel(out, run(model, x)) > 1e-3  # the computation changed
    report = backend.reports[0]
    assert report.params_after < report.params_before == sum(p.numel() for p in model.parameters())
    # sparse layers are stored dense (weight and mask): only factors change the count
    saved = sum(
        r.params_before - r.params_after
        for p in report.plans
        if p.keyword == "decompose"
        for r in p.changed_rows
    )
    assert report.params_after == report.params_before - saved
    # the model handed to torch.compile is not touched
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_low_rank_error_is_the_truncation_error() -> None:
    """One layer at rank r: the output error is exactly that of the rank-r SVD weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).eval()
    x = torch.randn(8, 64)
    out, _ = compiled(model, "decompose Linear rank = 8", x)
    layer = model[0]
    assert isinstance(layer, nn.Linear)
    u, s, vh = torch.linalg.svd(layer.weight.detach().double())
    w8 = (u[:, :8] * s[:8]) @ vh[:8]
    expected = x.double() @ w8.T + layer.bias.detach().double()
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert rel(out, run(model, x)) > 0.1


def test_full_rank_is_exact() -> None:
    torch.manual_seed(0)
    # A rank-4 weight decomposed at rank 4 keeps every singular value.
    low = nn.Linear(48, 48)
    with torch.no_grad():
        low.weight.copy_(torch.randn(48, 4) @ torch.randn(4, 48) / 8)
    model = nn.Sequential(low, nn.ReLU(), nn.Linear(48, 48)).eval()
    x = torch.randn(5, 48)
    out, backend = compiled(model, 'decompose Linear where name ~ "0" rank = 4', x)
    assert [c.path for c in backend.reports[0].changes] == ["0"]
    assert torch.allclose(out, run(model, x), atol=1e-5)
    # Full rank saves nothing: every layer stays dense, the graph computes what it did.
    torch._dynamo.reset()
    out, backend = compiled(model, "decompose Linear rank = 1.0", x)
    assert backend.reports[0].changes == []
    assert torch.equal(out, run(model, x))
    assert all(r.action == "skip" for r in backend.reports[0].plans[0].rows)


def _nm_ok(weight: torch.Tensor, n: int, m: int) -> bool:
    groups = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
    return bool((groups == n).all())


def test_sparsify_2_4_on_an_mlp() -> None:
    model = mlp()
    x = torch.randn(3, 64)
    out, backend = compiled(model, "sparsify Linear 2:4", x)
    gm = backend.reports[0].graph_module
    sparse = [m for m in gm.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 3
    for layer in sparse:
        assert _nm_ok(layer.weight * layer.mask, 2, 4)
    reference = module_path(model, "sparsify Linear 2:4", None)
    assert torch.equal(out, run(reference, x))
    for path in ("0", "2", "4"):
        got, want = gm.get_submodule(path), reference.get_submodule(path)
        assert isinstance(got, SparseLinear) and isinstance(want, SparseLinear)
        assert torch.equal(got.mask, want.mask)


def test_factors_are_fitted_once_across_recompilations() -> None:
    """A data-aware method is fitted on the first call's inputs; a recompilation for a new
    shape reuses those factors, so every graph computes the same layer."""
    model = mlp()
    text = "decompose Linear rank = 0.25 method svd-llm"
    backend = compile_backend(text, compiler="eager")
    fn = torch.compile(model, backend=backend)
    x, y = torch.randn(4, 10, 64), torch.randn(5, 7, 64)
    with torch.no_grad():
        first, second = fn(x), fn(y)
    reference = module_path(model, text, Inputs((x,), {}))
    assert len(backend.reports) == 2
    assert {c.action for c in backend.reports[1].changes} == {"reused"}
    assert torch.allclose(first, run(reference, x), atol=1e-6)
    assert torch.allclose(second, run(reference, y), atol=1e-6)


@pytest.mark.slow
def test_inductor_compiles_the_rewritten_graph() -> None:
    model = mlp()
    x = torch.randn(4, 64)
    text = "decompose Linear rank = 0.25"
    backend = compile_backend(text, compiler="inductor")
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    assert torch.allclose(out, run(module_path(model, text, None), x), atol=1e-5)


# --- transformers ------------------------------------------------------------------------------


def test_backend_equals_the_module_path_on_bert() -> None:
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 8))
    text = "decompose Linear rank = 0.5"
    out, backend = compiled(model, text, ids)
    reference = module_path(model, text, Inputs((ids,), {}))
    expected = run(reference, ids).last_hidden_state
    assert torch.allclose(out.last_hidden_state, expected, rtol=0, atol=1e-6)
    assert rel(out.last_hidden_state, run(model, ids).last_hidden_state) > 1e-3
    report = backend.reports[0]
    assert "encoder.layer.0.attention.self.query" in report.layers
    assert report.params_after < report.params_before


@pytest.mark.parametrize("method", ["svd", "svd-llm"])
def test_backend_on_gpt2_addmm_sites(method: str) -> None:
    """GPT-2's projections are HF `Conv1D`: `addmm(bias, x, W)` with `W` [in, out]. `Linear`
    selects them; the module path reaches them as `Conv1D`; `lm_head` is tied to `wte` and
    left alone by both."""
    model = tiny_gpt2()
    ids = torch.randint(0, 100, (2, 8))
    out, backend = compiled(
        model, f"decompose Linear rank = 0.5 method {method}", ids, use_cache=False
    )
    reference = module_path(
        model, f"decompose Conv1D rank = 0.5 method {method}", Inputs((ids,), {"use_cache": False})
    )
    expected = run(reference, ids, use_cache=False).logits
    assert torch.allclose(out.logits, expected, rtol=0, atol=1e-5)
    report = backend.reports[0]
    assert report.skipped == {"transformer.wte.weight": "weight shared with another use (tied)"}
    assert "transformer.h.0.mlp.c_fc" in report.layers
    assert {c.path for c in report.changes} == {
        c
        for c in report.layers
        if not c.endswith("attn.c_proj")  # 32→32 at rank 16: no gain
    }
    assert report.params_after < report.params_before


def test_sparsify_gpt2_conv1d() -> None:
    model: Any = tiny_gpt2()
    ids = torch.randint(0, 100, (2, 8))
    out, backend = compiled(model, "sparsify Linear 2:4", ids, use_cache=False)
    gm = backend.reports[0].graph_module
    c_fc = model.transformer.h[0].mlp.c_fc
    layer = gm.get_submodule("transformer.h.0.mlp.c_fc")
    assert isinstance(layer, SparseLinear)
    assert _nm_ok(layer.weight * layer.mask, 2, 4)  # [out, in]: groups of 4 inputs
    assert torch.equal(layer.mask, nm_mask(c_fc.weight.detach().T.abs(), 2, 4))
    assert torch.equal(layer.weight, c_fc.weight.detach().T * layer.mask)
    assert not torch.equal(out.logits, run(model, ids, use_cache=False).logits)


# --- torch.export ------------------------------------------------------------------------------


def test_exported_program_equals_the_module_path() -> None:
    model = mlp()
    x = torch.randn(4, 64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    text = "decompose Linear rank = 0.25"
    out = rewrite_exported(program, text)
    reference = module_path(model, text, Inputs((x,), {}))
    assert set(out.state_dict) == set(reference.state_dict())
    assert sum(t.numel() for t in out.state_dict.values()) < sum(
        t.numel() for t in program.state_dict.values()
    )
    x7 = torch.randn(7, 64)  # the batch stays dynamic
    with torch.no_grad():
        assert torch.allclose(out.module()(x7), reference(x7), rtol=0, atol=1e-6)
    summary = out.graph_module.meta["surgery"]
    assert [c["path"] for c in summary["changes"]] == ["0", "2", "4"]


def test_exported_gpt2_sparsify_and_decompose() -> None:
    model: Any = tiny_gpt2()
    model.config.use_cache = False
    ids = torch.randint(0, 100, (2, 8))
    program = torch.export.export(model, (ids,))
    out = rewrite_exported(program, "sparsify Linear 2:4")
    masks = {k: v for k, v in out.state_dict.items() if k.endswith(".mask")}
    assert len(masks) == 8  # every Conv1D; the tied lm_head is left alone
    for key, mask in masks.items():
        assert _nm_ok(mask, 2, 4)
        assert _nm_ok(out.state_dict[key.replace(".mask", ".weight")], 2, 4)
    text = "decompose Linear rank = 0.5"
    out = rewrite_exported(program, text)
    reference = module_path(model, "decompose Conv1D rank = 0.5", Inputs((ids,), {}))
    with torch.no_grad():
        got = out.module()(ids).logits
    assert torch.allclose(got, run(reference, ids).logits, rtol=0, atol=1e-5)
    assert "transformer.h.0.mlp.c_fc.first.weight" in out.state_dict


def test_exported_convolutions_use_the_module_passes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 48, 1),
        nn.ReLU(),
        nn.Conv2d(48, 16, 3, stride=2, groups=2),
    ).eval()
    x = torch.randn(2, 8, 12, 12)
    program = torch.export.export(model, (x,))
    text = "decompose Conv2d rank = 0.25"
    out = rewrite_exported(program, text)
    reference = module_path(model, text, Inputs((x,), {}))
    with torch.no_grad():
        assert torch.allclose(out.module()(x), reference(x), rtol=0, atol=1e-6)
    rows = {r["path"]: r for p in out.graph_module.meta["surgery"]["plans"] for r in p["rows"]}
    assert rows["0"]["action"] == rows["2"]["action"] == "decompose"  # Tucker-2, 1×1 pair
    assert "grouped convolution" in rows["4"]["note"]
    assert "0.core.weight" in out.state_dict and "2.first.weight" in out.state_dict


def test_exported_calibration_inputs() -> None:
    model = mlp()
    x, calib = torch.randn(2, 64), torch.randn(64, 64)
    with pytest.raises(GraphSurgeryError, match="dynamic dimensions"):  # static batch of 2
        rewrite_exported(
            torch.export.export(model, (x,)),
            "decompose Linear rank = 0.25 method asvd",
            calibration=[((calib,), {})],
        )
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    text = "decompose Linear rank = 0.25 method svd-llm"
    out = rewrite_exported(program, text, calibration=[((calib,), {})])
    reference = copy.deepcopy(model)
    context = PassContext(
        analysis=analyze(reference, Inputs((x,), {})),
        example=Inputs((x,), {}),
        calibration=[Inputs((calib,), {})],
    )
    pass_for(parse(text).statements[0], context).run(reference)
    with torch.no_grad():
        assert torch.allclose(out.module()(x), reference(x), rtol=0, atol=1e-6)


# --- functional graphs of other shapes ---------------------------------------------------------


class Functional(nn.Module):
    """Matrix calls written by hand: ``x @ W``, ``x @ V.t()`` and a weight used twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(32, 48) / 6)  # [in, out]
        self.v = nn.Parameter(torch.randn(32, 48) / 6)  # [out, in]
        self.shared = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ self.w)
        h = h @ self.v.t()
        return self.shared(self.shared(h))


def test_matmul_on_parameters_and_a_layer_called_twice() -> None:
    model = Functional().eval()
    x = torch.randn(3, 32)
    out, backend = compiled(model, "decompose Linear rank = 4", x)
    report = backend.reports[0]
    assert sorted(report.layers) == ["shared", "v", "w"]
    assert {c.path for c in report.changes} == {"shared", "v", "w"}
    # `shared` runs twice through one replacement, like a module called twice.
    calls = [n for n in report.graph_module.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls].count("shared") == 2

    def low(w: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(w.detach().double())
        return ((u[:, :4] * s[:4]) @ vh[:4]).float()

    h = torch.relu(x @ low(model.w.T).T)
    h = h @ low(model.v).T
    shared = model.shared
    for _ in range(2):
        h = h @ low(shared.weight).T + shared.bias
    assert torch.allclose(out, h.detach(), atol=1e-5)


def test_rewrite_graph_leaves_module_calls_to_the_module_path() -> None:
    gm = torch.fx.symbolic_trace(mlp())
    report = rewrite_graph(gm, "decompose Linear rank = 0.25")
    assert report.layers == [] and report.changes == []


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("group kv = 2", ["`group` is not a matrix pass", "<recipe>:1:1"]),
        (
            "decompose Linear rank = 0.5\nskip tokens 50% after block 1",
            ["`skip` is not a matrix pass", "2:1"],
        ),
        ("decompose Linear where block < 1 rank = 0.5", ["`where block`", "name ~"]),
        ("decompose Linear where speedup > 1.5 rank = 0.5", ["`where speedup`"]),
        ("decompose Linear rank = 0.5 progressive 3 steps", ["`progressive`"]),
        ("decompose Linear rank = 0.5 keep if faster", ["`keep if faster`"]),
        ("decompose Lienar rnak = 0.5", ["rnak"]),
        ("heal steps 10 distill from original", ["`heal` is not a matrix pass"]),
    ],
)
def test_bad_recipes_fail_when_the_backend_is_made(text: str, words: list[str]) -> None:
    with pytest.raises(GraphSurgeryError) as info:
        compile_backend(text)
    for word in words:
        assert word in str(info.value)


def test_recipe_files_and_missing_files(tmp_path: Path) -> None:
    recipe = tmp_path / "r.surg"
    recipe.write_text("decompose Linear rank = 0.25\ntruncate blocks keep 1 uniform\n")
    with pytest.raises(GraphSurgeryError, match=r"r\.surg:2:1"):
        compile_backend(str(recipe))
    recipe.write_text("decompose Linear rank = 0.25\n")
    assert compile_backend(recipe).recipe.statements[0].verb == "decompose"
    with pytest.raises(GraphSurgeryError, match="cannot read recipe"):
        compile_backend(str(tmp_path / "missing.surg"))
    with pytest.raises(GraphSurgeryError, match="compiler"):
        compile_backend("decompose Linear rank = 0.25", compiler="tvm")  # type: ignore[arg-type]


def test_data_aware_method_without_inputs_is_refused() -> None:
    gm = torch.export.export(Functional(), (torch.randn(2, 32),)).module()
    code = gm.code
    text = 'decompose Linear where name ~ "v" rank = 4\ndecompose Linear rank = 4 method svd-llm'
    with pytest.raises(GraphSurgeryError, match=r"line 2: .*needs calibration inputs"):
        rewrite_graph(gm, text)
    assert gm.code == code  # a recipe that fails changes nothing


def test_exported_program_without_example_inputs() -> None:
    program = torch.export.export(mlp(), (torch.randn(2, 64),))
    program.example_inputs = None  # e.g. a program built by hand
    with pytest.raises(GraphSurgeryError, match="example_inputs"):
        rewrite_exported(program, "decompose Linear rank = 0.25")
