"""`surgery apply` with healing on data: bad data is a located error and writes no OUT; the
curves land in OUT; `--resume` continues from `OUT.partial/`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgery.cli import main
from tests.test_heal_data import sentences, tiny_encoder, word_tokenizer


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    tiny_encoder().save_pretrained(str(d))
    word_tokenizer(d)
    return d


def _apply(tmp_path: Path, model_dir: Path, recipe: str, *extra: str) -> int:
    (tmp_path / "r.surg").write_text(recipe)
    return main(
        [
            "apply",
            str(tmp_path / "r.surg"),
            str(model_dir),
            "-o",
            str(tmp_path / "out"),
            "--no-measure",
            "-q",
            *extra,
        ]
    )


@pytest.mark.parametrize(
    ("files", "heal", "where", "message"),
    [
        ({}, 'heal steps 2 on "nope.txt"', "r.surg:2:17", "does not exist"),
        (
            {"t.jsonl": '{"body": "a cat"}\n'},
            'heal steps 2 on "t.jsonl" field "text"',
            "r.surg:2:33",
            "no field `text`",
        ),
        ({"t.txt": "\n\n"}, 'heal steps 2 on "t.txt"', "r.surg:2:17", "holds no text"),
    ],
)
def test_bad_data_is_a_located_error_and_no_out(
    tmp_path: Path,
    model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    files: dict[str, str],
    heal: str,
    where: str,
    message: str,
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    code = _apply(tmp_path, model_dir, f"decompose Linear rank = 0.5\n{heal}\n")
    err = capsys.readouterr().err
    assert code == 2
    assert "S0370" in err and message in err and where in err, err
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_curves_are_written_and_checkpoints_removed(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "t.txt").write_text("\n".join(sentences(24)) + "\n")
    recipe = (
        "decompose Linear rank = 0.5\n"
        'heal steps 4 on "t.txt" batch 4 eval 25% eval every 2 steps checkpoint every 2 steps\n'
    )
    assert _apply(tmp_path, model_dir, recipe) == 0
    out = tmp_path / "out"
    losses = [json.loads(x) for x in (out / "heal-losses.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (out / "heal-evals.jsonl").read_text().splitlines()]
    assert [x["step"] for x in losses] == [1, 2, 3, 4]
    assert [x["step"] for x in evals] == [0, 2, 4] and all("drift" in x for x in evals)
    assert not (tmp_path / "out.partial").exists()
    assert "heal-losses.jsonl" in capsys.readouterr().out


def test_resume_continues_a_killed_run(tmp_path: Path, model_dir: Path) -> None:
    """A run whose heal fails mid-way (here: killed by an exception after its checkpoint)
    leaves OUT.partial/; `--resume` reaches the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    import surgery.heal as heal_module

    (tmp_path / "t.txt").write_text("\n".join(sentences(24)) + "\n")
    recipe = (
        'decompose Linear rank = 0.5\nheal steps 4 on "t.txt" batch 4 checkpoint every 2 steps\n'
    )
    assert _apply(tmp_path, model_dir, recipe) == 0
    whole = load_file(str(tmp_path / "out" / "model.safetensors"))

    original = heal_module._step
    calls = {"n": 0}

    def dying(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed during step 4 (after the step-2 checkpoint)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    heal_module._step = dying  # type: ignore[assignment]
    try:
        assert _apply(tmp_path, model_dir, recipe, "--force") == 130
    finally:
        heal_module._step = original
    assert (tmp_path / "out.partial" / "heal-0" / "step-2" / "state.json").is_file()
    assert _apply(tmp_path, model_dir, recipe, "--force", "--resume") == 0
    resumed = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    assert all((whole[k] == resumed[k]).all() for k in whole)
    assert not (tmp_path / "out.partial").exists()
