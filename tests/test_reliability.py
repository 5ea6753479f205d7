"""Runs a careless user or a hostile file can break: each as the user meets it, via the CLI.

Covers the working directory never being imported from, ``--force`` never touching the input
however it is spelled, SIGTERM and SIGKILL leaving nothing behind, byte-identical results
across processes, environment failures (read-only or full disk, a parent that is a file, wrong
calibration tensors) as exit 2, and command-line numbers and targets checked like a recipe's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from surgery.inputs import calibration_inputs
from surgery.load import load_model
from surgery.save import atomic_directory, remove_stale_temporaries
from tests.helpers_models import tiny_bert

ROOT = Path(__file__).resolve().parents[1]
SURGERY = Path(sys.executable).with_name("surgery")
RECIPE = "decompose Linear where out_features >= 64 rank = 0.25\n"


def cli(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    base = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [str(SURGERY), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, **(env or {})},
        timeout=timeout,
    )


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (symlinks not followed) with its bytes."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("model") / "bert"
    tiny_bert().save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    r = tmp_path / "lowrank.surg"
    r.write_text(RECIPE)
    return r


# --- item 3: no code from the working directory ------------------------------------------


@pytest.mark.parametrize("how", ["console-script", "python -m"])
def test_a_module_in_the_working_directory_is_never_imported(
    tmp_path: Path, bert_dir: Path, recipe: Path, how: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "pwned"
    (work / "transformers.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    command = [str(SURGERY)] if how == "console-script" else [sys.executable, "-m", "surgery"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [*command, "plan", str(recipe), str(bert_dir), "-q"],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=300,
    )
    assert not marker.exists(), "a transformers.py in the working directory was imported"
    assert r.returncode == 0, r.stderr


def test_an_explicit_arch_may_still_name_a_module_of_the_working_directory(
    tmp_path: Path,
) -> None:
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def build():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(64, 64))\n"
        "    m.example_inputs = ((torch.ones(2, 64),), {})\n"
        "    return m\n"
    )
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = torch.nn.Sequential(torch.nn.Linear(64, 64)).state_dict()
    save_file(weights, str(tmp_path / "w.safetensors"))
    (tmp_path / "r.surg").write_text("decompose Linear rank = 0.5\n")
    r = cli(
        "apply", "r.surg", "w.safetensors", "--arch", "mymodels:build", "-o", "out",
        "--no-measure", "-q", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    refused = cli("load", "out", cwd=tmp_path)
    assert refused.returncode == 2 and "mymodels:build" in refused.stderr, refused.stderr
    loaded = cli("load", "out", "--arch", "mymodels:build", cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    assert "LowRankLinear" not in loaded.stderr


# --- item 6: --force never destroys the input ------------------------------------------------


def _spellings(tmp_path: Path, bert_dir: Path) -> Iterator[tuple[str, str, Path]]:
    """(model argument, output argument, cwd) pairs that all name the input as the output."""
    link = tmp_path / "model-link"
    link.symlink_to(bert_dir, target_is_directory=True)
    side = tmp_path / "side"
    side.mkdir()
    up = tmp_path / "up-link"
    up.symlink_to(bert_dir.parent, target_is_directory=True)
    yield str(link), str(bert_dir), tmp_path  # input through a symlink, output the real path
    yield str(bert_dir), str(link), tmp_path  # output through a symlink
    yield str(bert_dir), f"{side}/../{os.path.relpath(bert_dir, tmp_path)}", tmp_path
    yield str(bert_dir), str(up), tmp_path  # the output would hold the input
    yield str(bert_dir), str(bert_dir / "nested"), tmp_path  # the output inside the input
    yield str(link), ".", bert_dir.parent  # the output is the working directory


def test_force_never_replaces_the_input_however_it_is_spelled(
    tmp_path: Path, bert_dir: Path, recipe: Path
) -> None:
    work = tmp_path / "w"
    work.mkdir()
    before = tree(bert_dir)
    for model, out, cwd in _spellings(work, bert_dir):
        r = cli("apply", str(recipe), model, "-o", out, "--force", "--no-measure", "-q", cwd=cwd)
        assert r.returncode == 2, (model, out, r.stdout, r.stderr)
        assert "refusing to write" in r.stderr, r.stderr
        assert tree(bert_dir) == before, (model, out)
        assert not (bert_dir / "nested").exists()
        assert leftovers(bert_dir.parent, bert_dir.name) == []


def test_force_refuses_an_output_that_holds_the_recipe(tmp_path: Path, bert_dir: Path) -> None:
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "r.surg").write_text(RECIPE)
    r = cli("apply", str(folder / "r.surg"), str(bert_dir), "-o", str(folder), "--force", "-q")
    assert r.returncode == 2, r.stderr
    assert (folder / "r.surg").read_text() == RECIPE


def test_force_through_a_symlinked_output_writes_the_target_and_leaves_no_temporaries(
    tmp_path: Path, bert_dir: Path, recipe: Path
) -> None:
    real = tmp_path / "real-out"
    real.mkdir()
    (real / "stale.txt").write_text("old output")
    link = tmp_path / "out-link"
    link.symlink_to(real, target_is_directory=True)
    r = cli("apply", str(recipe), str(bert_dir), "-o", str(link), "--force", "--no-measure", "-q")
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and (real / "model.safetensors").is_file()
    assert not (real / "stale.txt").exists()
    assert leftovers(tmp_path, "real-out") == [] and leftovers(tmp_path, "out-link") == []


# --- item 13: signals -----------------------------------------------------------------------

SLOW_RECIPE = RECIPE + "heal steps 100000\n"


def _start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [str(SURGERY), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_temporary(parent: Path, name: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if any(n.endswith(".tmp") for n in leftovers(parent, name)):
            time.sleep(1.0)  # well inside the run (healing), not at its first step
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the run never created its temporary output")


@pytest.mark.slow
def test_sigterm_removes_the_temporary_output(tmp_path: Path, bert_dir: Path) -> None:
    (tmp_path / "r.surg").write_text(SLOW_RECIPE)
    proc = _start(["apply", "r.surg", str(bert_dir), "-o", "out", "--no-measure"], tmp_path)
    _wait_for_temporary(tmp_path, "out", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err and "Traceback" not in err
    assert leftovers(tmp_path, "out") == [] and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_later_run_removes_what_a_sigkill_left(tmp_path: Path, bert_dir: Path) -> None:
    (tmp_path / "r.surg").write_text(SLOW_RECIPE)
    proc = _start(["apply", "r.surg", str(bert_dir), "-o", "out", "--no-measure"], tmp_path)
    _wait_for_temporary(tmp_path, "out", proc)
    proc.kill()
    proc.communicate(timeout=60)
    left = leftovers(tmp_path, "out")
    assert any(n.endswith(".tmp") for n in left), left  # SIGKILL cannot be cleaned up after
    (tmp_path / "r.surg").write_text(RECIPE)
    r = cli("apply", "r.surg", str(bert_dir), "-o", "out", "--no-measure", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert leftovers(tmp_path, "out") == []


def test_a_live_writers_temporaries_are_never_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "f").write_text("x")
        assert remove_stale_temporaries(out) == []  # the lock is held: this writer lives
        assert tmp.is_dir()
    assert (out / "f").is_file() and leftovers(tmp_path, "out") == []
    unproven = tmp_path / ".out.0123.tmp"  # no lock file: staleness cannot be proven
    unproven.mkdir()
    assert remove_stale_temporaries(out) == [] and unproven.is_dir()


def test_a_failed_write_puts_the_previous_output_back(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept").write_text("previous")
    with pytest.raises(RuntimeError), atomic_directory(out, force=True) as tmp:
        (tmp / "new").write_text("x")
        raise RuntimeError("the run failed")
    assert (out / "kept").read_text() == "previous" and not (out / "new").exists()
    assert leftovers(tmp_path, "out") == []


# --- item 12: reproducible across processes -------------------------------------------------


@pytest.mark.slow
def test_heal_is_byte_identical_across_processes(tmp_path: Path, bert_dir: Path) -> None:
    (tmp_path / "r.surg").write_text(
        "decompose Linear rank = 0.5\nheal steps 6 lr 0.01 distill from original\n"
    )
    outputs = []
    # Different string hashing, as separate runs get. (Before the fix, hash seed 3 put the
    # parameters in another order than seeds 1 and 2, and every healed weight differed.)
    for seed in ("1", "2", "3"):
        out = tmp_path / f"out-{seed}"
        r = cli(
            "apply", "r.surg", str(bert_dir), "-o", str(out), "--no-measure", "-q",
            cwd=tmp_path, env={"PYTHONHASHSEED": seed},
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        outputs.append(out)
    for name in ("model.safetensors", "surgery.json"):
        first = (outputs[0] / name).read_bytes()
        assert all((o / name).read_bytes() == first for o in outputs[1:]), name


# --- item 14: the machine's errors are the user's to fix: exit 2 ----------------------------


@contextlib.contextmanager
def _mounted(kind: str, where: Path) -> Iterator[Path]:
    """A small tmpfs (``full``) or a read-only bind mount (``ro``) at ``where``; skips unless
    this process may mount (root in a container that allows it, as on this project's CI)."""
    where.mkdir()
    if kind == "full":
        command = [["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)]]
    else:
        src = where.with_name(where.name + "-src")
        src.mkdir()
        command = [
            ["mount", "--bind", str(src), str(where)],
            ["mount", "-o", "remount,bind,ro", str(where)],
        ]
    for c in command:
        r = subprocess.run(c, capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["umount", str(where)], capture_output=True)
            pytest.skip(f"cannot mount here ({r.stderr.strip() or 'not permitted'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.parametrize("kind", ["full", "ro"])
def test_a_full_or_read_only_disk_is_a_user_error(
    tmp_path: Path, bert_dir: Path, recipe: Path, kind: str
) -> None:
    with _mounted(kind, tmp_path / "disk") as disk:
        r = cli("apply", str(recipe), str(bert_dir), "-o", str(disk / "out"), "--no-measure", "-q")
        assert r.returncode == 2, r.stderr
        assert "error[S0350]" in r.stderr and "internal error" not in r.stderr, r.stderr
        expected = "No space left" if kind == "full" else "Read-only file system"
        assert expected in r.stderr
        assert sorted(p.name for p in disk.iterdir()) == []


def test_an_output_parent_that_is_a_file_is_a_user_error(
    tmp_path: Path, bert_dir: Path, recipe: Path
) -> None:
    (tmp_path / "afile").write_text("x")
    r = cli("apply", str(recipe), str(bert_dir), "-o", str(tmp_path / "afile" / "out"), "-q")
    assert r.returncode == 2, r.stderr
    assert "is not a directory" in r.stderr and "internal error" not in r.stderr


@pytest.mark.parametrize(
    "tensors",
    [
        {"input_ids": torch.zeros(4, 8, 3, dtype=torch.long)},  # one dimension too many
        {"input_ids": torch.rand(4, 8)},  # floats where token ids belong
        {"pixel_values": torch.rand(4, 3, 8, 8)},  # an argument the model does not take
    ],
    ids=["shape", "dtype", "name"],
)
def test_calibration_tensors_the_model_cannot_take_are_a_user_error(
    tmp_path: Path, bert_dir: Path, tensors: dict[str, torch.Tensor]
) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "calib.safetensors"))
    (tmp_path / "r.surg").write_text('calibrate with "calib.safetensors"\n' + RECIPE)
    r = cli("plan", str(tmp_path / "r.surg"), str(bert_dir), "-q")
    assert r.returncode == 2, r.stderr
    assert "calibration" in r.stderr and "internal error" not in r.stderr, r.stderr


# --- item 11 (run time): a huge calibration text is streamed, not read whole ---------------


def test_a_huge_calibration_line_is_streamed(tmp_path: Path, bert_dir: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("abcdefgh")}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    for f in bert_dir.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]").save_pretrained(model_dir)
    text = tmp_path / "calib.txt"
    with text.open("w") as f:
        f.write("a b c\n")
        chunk = "d e f g h " * 100_000  # 1 MB
        for _ in range(64):  # one 64 MB line
            f.write(chunk)
        f.write("\nb c d\n")
    loaded = load_model(model_dir)
    tracemalloc.start()
    try:
        batches = calibration_inputs(text, loaded, samples=3, batch=3, seq_len=16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.0f} MiB: the file was read whole"
    ids = batches[0].kwargs["input_ids"]
    assert tuple(ids.shape) == (3, 16)


def test_a_calibration_text_that_is_not_utf8_names_its_line(tmp_path: Path, bert_dir: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    (tmp_path / "r.surg").write_text('calibrate with "calib.txt"\n' + RECIPE)
    r = cli("plan", str(tmp_path / "r.surg"), str(bert_dir), "-q")
    assert r.returncode == 2, r.stderr
    assert "line 3 is not UTF-8" in r.stderr


# --- item 15: command-line values follow the recipe's rules ---------------------------------


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-heal-steps", "-3"),
        ("--trials", "-5"),
        ("--trials", "0"),
        ("--repeats", "0"),
        ("--warmup", "-1"),
        ("--trials", "many"),
    ],
)
def test_negative_counts_are_refused(bert_dir: Path, recipe: Path, flag: str, value: str) -> None:
    from surgery.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["plan", str(recipe), str(bert_dir), flag, value])
    assert exc.value.code == 2


def test_a_target_is_checked_by_the_recipes_rule(tmp_path: Path, bert_dir: Path) -> None:
    in_recipe = tmp_path / "t.surg"
    in_recipe.write_text("target mindir ascend\n" + RECIPE)
    from_recipe = cli("plan", str(in_recipe), str(bert_dir), "-q")
    recipe = tmp_path / "r.surg"
    recipe.write_text(RECIPE)
    from_flag = cli("plan", str(recipe), str(bert_dir), "--target", "mindir:ascend", "-q")
    assert from_recipe.returncode == from_flag.returncode == 2
    first = next(line for line in from_recipe.stderr.splitlines() if line.startswith("error"))
    assert first in from_flag.stderr, (from_recipe.stderr, from_flag.stderr)
    for bad in ("nosuch", "onnx:nosuch", "onnx:", ":cpu", "onnx:cpu:x"):
        r = cli("plan", str(recipe), str(bert_dir), "--target", bad, "-q")
        assert r.returncode == 2 and "internal error" not in r.stderr, (bad, r.stderr)


def test_sigterm_handler_is_restored_after_main(bert_dir: Path, recipe: Path) -> None:
    from surgery.cli import main

    before = signal.getsignal(signal.SIGTERM)
    assert main(["check", str(recipe)]) == 0
    assert signal.getsignal(signal.SIGTERM) == before
