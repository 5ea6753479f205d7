"""The typed program between a recipe and the manager, and the one writer of `OUT/`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from surgery import ast
from surgery.parse import parse
from surgery.program import (
    DEFAULT_BATCH,
    DEFAULT_SAMPLES,
    CalibrationSpec,
    HealStep,
    PassStep,
    TargetSpec,
    lower,
)

ROOT = Path(__file__).resolve().parents[1]


def test_lowering_needs_no_torch() -> None:
    code = (
        "import sys, glob\n"
        "from surgery.parse import parse\n"
        "from surgery.program import lower\n"
        "for f in sorted(glob.glob('recipes/*.surg')):\n"
        "    lower(parse(open(f).read()))\n"
        "assert 'torch' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_configuration_comes_out_of_the_steps() -> None:
    p = lower(
        parse(
            'target onnx cpu trials 3\ncalibrate with "c.pt" batch 4\n'
            "decompose Linear rank = 0.5\nexpect params < 50%\ntarget tvm\n"
        )
    )
    assert p.calibration == CalibrationSpec("c.pt", DEFAULT_SAMPLES, 4)
    assert p.targets == (TargetSpec("onnx", "cpu", 3), TargetSpec("tvm"))
    assert [c.metric.value for c in p.contracts] == ["params"]
    assert [s.statement.verb for s in p.steps] == ["decompose"]
    assert lower(parse("group kv = 2")).calibration == CalibrationSpec(
        None, DEFAULT_SAMPLES, DEFAULT_BATCH
    )


def test_heal_steps_carry_their_freeze_and_regularizers() -> None:
    p = lower(
        parse(
            "decompose Linear rank = 0.5\nfreeze first-factor\nregularize nuclear 1e-4\n"
            "heal steps 5\nfreeze core\nheal steps 7\n"
        )
    )
    first, second = (s for s in p.steps if isinstance(s, HealStep))
    assert first.freeze is not None and first.freeze.what.value == "first-factor"
    assert second.freeze is not None and second.freeze.what.value == "core"  # the last one
    assert [r.strength.value for r in first.regularizers] == [1e-4]
    assert len(second.regularizers) == 1  # every regularize written before it
    assert (first.steps, second.steps) == (5, 7)


def test_a_progressive_family_knows_its_members_and_its_heal() -> None:
    p = lower(parse("decompose Linear rank = 0.5 progressive 3 steps\ngroup kv = 2\nheal steps 4"))
    family, group, heal = p.steps
    assert isinstance(family, PassStep) and isinstance(heal, HealStep)
    assert family.members == 3 and family.heal_between == heal
    assert not family.kept_after_next_heal  # `group` runs between it and the heal
    assert isinstance(group, PassStep) and group.members == 1 and group.kept_after_next_heal
    p = lower(parse("decompose Linear rank = 0.5 progressive 2 steps\nheal steps 4"))
    assert isinstance(p.steps[0], PassStep) and p.steps[0].kept_after_next_heal


def test_run_only_statements_are_not_steps() -> None:
    source = "\n".join(
        [
            "target torch",
            'calibrate with "x.pt"',
            "expect drift < 0.1",
            "freeze core",
            "regularize nuclear 1e-4",
            "heal steps 3",
        ]
    )
    p = lower(parse(source))
    assert [type(s).__name__ for s in p.steps] == ["HealStep"]
    assert all(isinstance(s.statement, ast.Heal | ast.StatementNode) for s in p.steps)


def test_every_recipe_lowers_to_steps_in_recipe_order() -> None:
    for path in sorted((ROOT / "recipes").glob("*.surg")):
        recipe = parse(path.read_text())
        p = lower(recipe)
        lines = [s.statement.span.line for s in p.steps]
        assert lines == sorted(lines), path.name
        work = [s for s in recipe.statements if s.verb not in ("target", "calibrate", "expect")]
        work = [s for s in work if s.verb not in ("freeze", "regularize")]
        assert [s.statement for s in p.steps] == work, path.name


# --- one writer of OUT/ for the CLI and the Python API --------------------------------------


def _tree(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_the_api_writes_the_same_output_as_the_cli(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    import surgery
    from surgery.cli import main
    from tests.helpers_models import tiny_bert

    bert = tmp_path / "bert"
    tiny_bert().save_pretrained(bert, safe_serialization=True)
    recipe = tmp_path / "family.surg"
    recipe.write_text(
        "decompose Linear where out_features >= 64 rank = 0.5 progressive 2 steps\n"
        "heal steps 2 distill from original\n"
    )
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    args = ["apply", str(recipe), str(bert), "-o", str(cli_out), "--no-measure", "-q"]
    assert main(args) == 0

    source = recipe.read_text()
    run = surgery.Manager(surgery.parse(source), surgery.load_model(bert), recipe_dir=tmp_path).run(
        measure=False
    )
    surgery.save_run(run, api_out, recipe_source=source, recipe=str(recipe), model=str(bert))

    cli_files, api_files = _tree(cli_out), _tree(api_out)
    assert cli_files.keys() == api_files.keys()
    assert {"step-1/surgery.json", "step-2/surgery.json", "report.md"} <= cli_files.keys()
    for name in ("surgery.json", "step-1/surgery.json", "step-2/surgery.json", "recipe.surg"):
        assert cli_files[name].read_text() == api_files[name].read_text(), name
    for name in ("model.safetensors", "step-1/model.safetensors"):
        a, b = load_file(cli_files[name]), load_file(api_files[name])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # Each member records only the changes made before it was kept.
    changes = [json.loads(cli_files[f"{d}surgery.json"].read_text())["changes"] for d in
               ("step-1/", "step-2/", "")]  # fmt: skip
    assert 0 < len(changes[0]) < len(changes[1]) == len(changes[2])
    assert changes[1][: len(changes[0])] == changes[0]
    assert surgery.load(api_out / "step-1") is not None


def test_saving_a_run_of_a_plain_module_needs_its_base(tmp_path: Path) -> None:
    import surgery
    from surgery.save import OutputError
    from tests.helpers_models import wide_mlp

    run = surgery.Manager(parse("decompose Linear rank = 2"), wide_mlp()).run(measure=False)
    with pytest.raises(OutputError, match=r"not loaded by `surgery\.load_model`"):
        surgery.save_run(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
