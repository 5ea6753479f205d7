"""Streamed surgery (`surgery.stream`): the same output as in memory, layer by layer."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import surgery
from surgery.load import load_model
from surgery.stream import StreamError, stream_apply, streaming_refusals


def _llama(directory: Path, *, tied: bool = False, dtype: torch.dtype = torch.bfloat16) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    model: Any = LlamaForCausalLM(config)
    model.to(dtype)
    model.save_pretrained(directory, max_shard_size="40KB")  # several shards
    return directory


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = _llama(tmp_path_factory.mktemp("llama") / "model")
    assert len(list(path.glob("model-*.safetensors"))) > 2
    return path


def _in_memory(recipe: str, model: Path, out: Path) -> surgery.Run:
    run = surgery.Manager(surgery.parse(recipe), load_model(model)).run(measure=False)
    surgery.save_run(run, out, recipe_source=recipe)
    return run


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


RECIPES = {
    "fraction": "decompose Linear rank = 0.25\n",
    "energy-then-absolute": (
        'decompose Linear where name ~ "*mlp*" rank = energy 0.8\ndecompose Linear rank = 8\n'
    ),
}


@pytest.mark.parametrize(
    "name",
    # the second runs each of its two statements over every layer, through a scratch file
    ["fraction", pytest.param("energy-then-absolute", marks=pytest.mark.slow)],
)
def test_a_streamed_decompose_is_bitwise_the_in_memory_one(
    name: str, llama: Path, tmp_path: Path
) -> None:
    recipe = RECIPES[name]
    mem = _in_memory(recipe, llama, tmp_path / "mem")
    run = stream_apply(surgery.parse(recipe), llama, tmp_path / "stream", recipe_source=recipe)
    for f in ("model.safetensors", "surgery.json", "config.json", "recipe.surg"):
        assert (tmp_path / "mem" / f).read_bytes() == (tmp_path / "stream" / f).read_bytes(), f
    assert [c.as_dict() for c in run.changes] == [c.as_dict() for c in mem.changes]
    assert run.changes, "the recipe changed nothing: the comparison would prove little"
    for a, b in zip(mem.steps, run.steps, strict=True):
        assert a.plan.as_dict() == b.plan.as_dict()
        assert a.params == b.params
    assert (run.params_after, run.flops_after) == (mem.params_after, mem.flops_after)
    assert sorted(p.name for p in (tmp_path / "stream").iterdir()) == sorted(
        p.name for p in (tmp_path / "mem").iterdir()
    )
    plan = json.loads((tmp_path / "stream" / "plan.json").read_text())
    assert plan["drift"] is None and any("not measured" in w for w in plan["warnings"])
    # `surgery load` rebuilds the streamed output as it rebuilds the in-memory one
    rebuilt, streamed = surgery.load(tmp_path / "mem"), surgery.load(tmp_path / "stream")
    assert type(streamed.get_submodule("model.layers.0.mlp.up_proj")).__name__ == "LowRankLinear"
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, streamed(input_ids=ids).logits)


@pytest.mark.slow
def test_tied_weights_are_saved_once_as_in_memory(tmp_path: Path) -> None:
    model = _llama(tmp_path / "tied", tied=True)
    recipe = "decompose Linear rank = 0.25\n"
    _in_memory(recipe, model, tmp_path / "mem")
    run = stream_apply(surgery.parse(recipe), model, tmp_path / "stream")
    mem, streamed = (
        tmp_path / "mem" / "model.safetensors",
        tmp_path / "stream" / "model.safetensors",
    )
    a, b = load_file(mem), load_file(streamed)
    assert a.keys() == b.keys()
    assert ("lm_head.weight" in b) != ("model.embed_tokens.weight" in b)  # one name kept
    assert all(torch.equal(a[k], b[k]) for k in a)
    # safetensors orders the metadata map arbitrarily: compare it parsed
    assert _header(mem) == _header(streamed)
    assert any(r.path == "lm_head" and r.action == "skip" for r in run.steps[0].plan.rows)


def test_statements_that_need_the_whole_model_are_refused_by_line(
    llama: Path, tmp_path: Path
) -> None:
    recipe = surgery.parse(
        "decompose Linear rank = 0.25\n"
        "decompose Linear rank = 0.5 method svd-llm\n"
        "sparsify Linear 2:4\n"
        "heal steps 10\n"
    )
    found = streaming_refusals(recipe)
    assert [(d.code, d.span.line if d.span else None) for d in found] == [
        ("S0380", 2),
        ("S0380", 3),
        ("S0380", 4),
    ]
    assert "method svd-llm" in found[0].message and "`sparsify`" in found[1].message
    with pytest.raises(StreamError) as err:
        stream_apply(recipe, llama, tmp_path / "out")
    assert len(err.value.diagnostics) == 3
    assert not (tmp_path / "out").exists()


def test_a_failure_leaves_no_output(
    llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import surgery.stream as stream

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stream, "_write_manifest", broken)
    with pytest.raises(OSError):
        stream_apply(surgery.parse("decompose Linear rank = 0.25"), llama, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no OUT, no temporary, no scratch file


def test_a_model_that_is_not_a_safetensors_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(StreamError) as err:
        stream_apply(surgery.parse("decompose Linear rank = 0.25"), tmp_path / "m", tmp_path / "o")
    assert err.value.diagnostic.code == "S0381" and "safetensors" in err.value.diagnostic.message
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_streamed_split_is_the_in_memory_one(tmp_path: Path) -> None:
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(0)
    config = VideoMAEConfig(
        image_size=16,
        patch_size=8,
        num_channels=3,
        num_frames=4,
        tubelet_size=2,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        # with biases, transformers saves `query.bias` under another name (its key conversion),
        # which streaming (each weight read by its name in the model) refuses
        qv_bias=False,
    )
    model: Any = VideoMAEModel(config)
    model.save_pretrained(tmp_path / "video", max_shard_size="20KB")
    recipe = "split Conv3d exact\n"
    mem = _in_memory(recipe, tmp_path / "video", tmp_path / "mem")
    run = stream_apply(surgery.parse(recipe), tmp_path / "video", tmp_path / "stream")
    assert [c.path for c in run.changes] == [c.path for c in mem.changes] != []
    for f in ("model.safetensors", "surgery.json"):
        assert (tmp_path / "mem" / f).read_bytes() == (tmp_path / "stream" / f).read_bytes(), f
