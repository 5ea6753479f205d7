"""``torchrun --nproc_per_node 2 -m surgery apply ...`` as a user runs it: real processes on
gloo, a tiny Hugging Face model directory, a recipe that decomposes then heals.

Both ranks build the same surgered model and heal their shares of each global batch; only
rank 0 prints and writes ``OUT``. The 2-rank result equals a one-process ``surgery apply``
of the same recipe within float32 reassociation (DDP averages two shard gradients instead of
taking one mean): the same tolerance as ``tests/test_distributed.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

WORDS = "the a cat dog sat ran on under mat tree red blue small big quickly home".split()
RECIPE = """\
calibrate with "train.txt" samples 8
decompose Linear where name ~ "*.intermediate.*" rank = 0.5
heal steps 6 on "train.txt" max length 12 batch 4 lr 0.001 seed 3
"""


def _recipe(directory: Path) -> Path:
    """The recipe and its training text (global batches of 4: two sentences per rank)."""
    g = torch.Generator().manual_seed(1)
    lines = [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g).tolist())
        for _ in range(40)
    ]
    (directory / "train.txt").write_text("\n".join(lines) + "\n")
    recipe = directory / "recipe.surg"
    recipe.write_text(RECIPE)
    return recipe


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    d = tmp_path_factory.mktemp("bert")
    BertModel(cfg).eval().save_pretrained(d)
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(d)
    return d


def _apply(args: list[str], launcher: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*launcher, "-m", "surgery", "apply", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        cwd=ROOT,
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_torchrun_apply_heals_on_two_ranks_like_one_process(
    tmp_path: Path, model_dir: Path, mode: str
) -> None:
    recipe = _recipe(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    common = [str(recipe), str(model_dir), "--no-measure", "-q"]
    single = _apply([*common, "-o", str(one)], [sys.executable])
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launched = _apply(
        [*common, "-o", str(two), "--parallel", mode], [*torchrun, "--nproc_per_node", "2"]
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    # Only rank 0 prints the plan and writes OUT (once, no stray temporaries beside it).
    assert launched.stdout.count("wrote ") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one",
        "recipe.surg",
        "train.txt",
        "two",
    ]
    a = load_file(one / "model.safetensors")
    b = load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # ... and the output reloads.
    loaded = subprocess.run(
        [sys.executable, "-m", "surgery", "load", str(two)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=ROOT,
    )
    assert loaded.returncode == 0, loaded.stderr


def test_parallel_without_torchrun_is_a_clear_error(tmp_path: Path, model_dir: Path) -> None:
    recipe = _recipe(tmp_path)
    out = tmp_path / "out"
    done = _apply(
        [str(recipe), str(model_dir), "-o", str(out), "--parallel", "ddp", "--no-measure"],
        [sys.executable],
    )
    assert done.returncode == 2, done.stderr
    assert "S0004" in done.stderr and "torchrun" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
