"""`Linear` means any dense matrix layer: Hugging Face `Conv1D` (GPT-2) is matched by `Linear`
selectors, shown as "Conv1D (Linear-like)", decomposed and sparsified, and the output reloads;
a selector that matches nothing names the layer types the model has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from surgery.cli import main
from surgery.graph import analyze
from surgery.inputs import example_inputs, flatten_outputs
from surgery.load import load_model
from surgery.manager import Manager
from surgery.modules import LowRankLinear
from surgery.modules.sparse import SparseLinear
from surgery.parse import parse
from surgery.passes.sparsify import SparsifyPass
from surgery.save import load, save_run
from surgery.select import is_linear_like, no_match_help, select
from surgery.support import SUPPORT
from tests.helpers_models import tiny_gpt2

CONV1D_PATHS = [
    f"transformer.h.{i}.{p}"
    for i in (0, 1)
    for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


@pytest.fixture()
def gpt2_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    d = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(d, safe_serialization=True)
    return d


def apply(tmp_path: Path, model: Path, text: str) -> tuple[int, Path]:
    recipe = tmp_path / "r.surg"
    recipe.write_text(text)
    out = tmp_path / "out"
    code = main(["apply", str(recipe), str(model), "-o", str(out), "--no-measure", "-q"])
    return code, out


def plan_rows(out: Path, step: int = 0) -> dict[str, dict[str, object]]:
    plan = json.loads((out / "plan.json").read_text())
    return {row["path"]: row for row in plan["steps"][step]["rows"]}


def outputs(model: nn.Module) -> list[torch.Tensor]:
    return flatten_outputs(example_inputs(model, seed=7).call(model.eval()))


def test_linear_selector_matches_conv1d() -> None:
    model = tiny_gpt2()
    sel = parse("decompose Linear rank = 0.5").statements[0].selector
    paths = select(model, analyze(model, example_inputs(model)), sel)
    assert paths == [*CONV1D_PATHS, "lm_head"]
    assert all(is_linear_like(model.get_submodule(p)) for p in CONV1D_PATHS)
    # `Conv1D` alone still selects only those
    sel = parse("decompose Conv1D rank = 0.5").statements[0].selector
    assert select(model, analyze(model, example_inputs(model)), sel) == CONV1D_PATHS


def test_decompose_linear_changes_gpt2_and_reloads_equal(gpt2_dir: Path, tmp_path: Path) -> None:
    run = Manager(parse("decompose Linear rank = 0.5\n"), load_model(gpt2_dir)).run(measure=False)
    rows = {row.path: row for row in run.steps[0].plan.rows}
    assert rows["transformer.h.0.mlp.c_fc"].action != "skip"
    assert any(isinstance(run.model.get_submodule(p), LowRankLinear) for p in CONV1D_PATHS)
    save_run(run, tmp_path / "out")
    rebuilt = load(tmp_path / "out")
    for a, b in zip(outputs(run.model), outputs(rebuilt), strict=True):
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_svd_llm_on_gpt2_fits_conv1d(gpt2_dir: Path, tmp_path: Path) -> None:
    code, out = apply(tmp_path, gpt2_dir, "decompose Linear rank = 0.5 method svd-llm\n")
    assert code == 0
    rows = plan_rows(out)
    changed = [p for p in CONV1D_PATHS if rows[p]["action"] != "skip"]
    assert "transformer.h.0.mlp.c_fc" in changed
    assert rows["transformer.h.0.mlp.c_fc"]["detail"]["method"] == "svd-llm"  # type: ignore[index]
    assert load(out) is not None


def test_sparsify_linear_on_gpt2(gpt2_dir: Path, tmp_path: Path) -> None:
    code, out = apply(tmp_path, gpt2_dir, "sparsify Linear 2:4\n")
    assert code == 0
    rows = plan_rows(out)
    for p in CONV1D_PATHS:
        assert rows[p]["type"] == "Conv1D (Linear-like)" and rows[p]["action"] == "sparsify"
    assert rows["lm_head"]["type"] == "Linear"  # a real Linear keeps its name (tied: skipped)
    assert "Conv1D (Linear-like)" in (out / "report.md").read_text()
    rebuilt = load(out)
    for p in CONV1D_PATHS:
        layer = rebuilt.get_submodule(p)
        assert isinstance(layer, SparseLinear)
        # exactly half the weights of every group of 4 inputs survive
        assert int((layer.weight != 0).sum()) <= layer.weight.numel() // 2
        assert bool((layer.weight[~layer.mask] == 0).all())


def test_sparsify_conv1d_matches_the_dense_layer_on_kept_weights() -> None:
    """The N:M layer computes what the Conv1D computes with the pruned weights zeroed."""
    torch.manual_seed(0)
    model = tiny_gpt2().eval()
    conv = model.get_submodule("transformer.h.0.mlp.c_fc")
    weight = conv.weight.detach().clone()  # [in, out]
    SparsifyPass(parse("sparsify Conv1D 2:4").statements[0])(model)
    sparse = model.get_submodule("transformer.h.0.mlp.c_fc")
    assert isinstance(sparse, SparseLinear)
    x = torch.randn(3, 32)
    expected = x @ (weight * sparse.mask.t()) + conv.bias
    assert torch.allclose(sparse(x), expected, atol=1e-5)


@pytest.mark.skipif(
    "Conv1D" not in SUPPORT["sparsify"].types,
    reason="needs `Conv1D` in the sparsify verb's types (surgery/verbs/sparsify.py)",
)
def test_sparsify_conv1d_recipe_is_accepted(gpt2_dir: Path, tmp_path: Path) -> None:
    code, out = apply(tmp_path, gpt2_dir, "sparsify Conv1D 2:4\n")
    assert code == 0
    assert plan_rows(out)["transformer.h.0.attn.c_attn"]["type"] == "Conv1D"


def test_no_match_names_layer_types_and_suggests() -> None:
    model = tiny_gpt2()
    analysis = analyze(model, example_inputs(model))
    sel = parse("decompose Conv1d rank = 0.5").statements[0].selector
    assert select(model, analysis, sel) == []
    text = no_match_help(model, analysis, sel)
    assert text.startswith("did you mean `Conv1D`?")
    assert "layer types in this model: `Conv1D` (8)" in text
    assert "`Embedding` (2)" in text and "`LayerNorm` (5)" in text
    sel = parse('decompose Linear where name ~ "encoder.*" rank = 0.5').statements[0].selector
    text = no_match_help(model, analysis, sel)
    assert "did you mean" not in text and "nearest modules:" in text
