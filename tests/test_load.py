"""Tests for `surgery.load`: every supported format, and every bad input as a ModelLoadError."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.load import LoadedModel, ModelLoadError, load_model, rebuild_base, save_base_files
from tests.helpers_models import tiny_bert, tiny_gpt2, tiny_mlp

ARCH = "tests.helpers_models:tiny_mlp"


def _digest(path: Path) -> str:
    if path.is_dir():
        return "".join(_digest(p) for p in sorted(path.rglob("*")) if p.is_file())
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bert"
    tiny_bert().save_pretrained(d, safe_serialization=True)
    (d / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    (d / "modules.json").write_text("[]")
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text("{}")
    return d


def test_hf_dir_round_trip(hf_dir: Path, tmp_path: Path) -> None:
    before = _digest(hf_dir)
    loaded = load_model(hf_dir)
    assert _digest(hf_dir) == before  # loading never writes
    assert loaded.kind == "hf" and loaded.model_dir == hf_dir and loaded.config is not None
    assert not loaded.model.training
    assert loaded.model.config._attn_implementation == "eager"
    assert loaded.base["class"] == "BertModel"
    ids = torch.randint(0, 100, (2, 8))
    ref = tiny_bert()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state
        )

    out = tmp_path / "out"
    base = json.loads(json.dumps(loaded.base))  # JSON-serialisable
    save_base_files(loaded, out)
    assert {p.name for p in out.iterdir()} == {"vocab.txt", "modules.json", "1_Pooling"}
    rebuilt = rebuild_base(base, out)
    assert type(rebuilt).__name__ == "BertModel"
    assert rebuilt.state_dict().keys() == loaded.model.state_dict().keys()


def test_hf_config_file_path_is_accepted(hf_dir: Path) -> None:
    assert load_model(hf_dir / "config.json").kind == "hf"


def test_hf_dir_without_weights(tmp_path: Path) -> None:
    tiny_bert().config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(tmp_path)


def test_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(tmp_path)


def test_hf_dir_with_corrupt_weights(hf_dir: Path) -> None:
    (hf_dir / "model.safetensors").write_bytes(os.urandom(256))
    with pytest.raises(ModelLoadError, match=re.escape(str(hf_dir))):
        load_model(hf_dir)


def test_pt2_program(tmp_path: Path) -> None:
    model = tiny_mlp()
    x = torch.randn(3, 8)
    path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    before = _digest(path)
    with pytest.raises(ModelLoadError, match="--trust-pickle"):
        load_model(path)  # torch.export.load unpickles: see tests/test_security_load.py
    loaded = load_model(path, trust_pickle=True)
    assert _digest(path) == before
    assert loaded.kind == "export" and loaded.base == {"kind": "export", "program": "base.pt2"}
    assert loaded.example_inputs is not None
    args, kwargs = loaded.example_inputs
    torch.testing.assert_close(args[0], x)
    assert kwargs == {}
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))
    assert {name for name, _ in loaded.model.named_children()} >= {"fc1", "fc2"}

    out = tmp_path / "out"
    save_base_files(loaded, out)
    assert (out / "base.pt2").is_file()
    with pytest.raises(ModelLoadError, match="--trust-pickle"):
        rebuild_base(loaded.base, out)
    rebuilt = rebuild_base(loaded.base, out, trust_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_state_dict_with_arch(tmp_path: Path, suffix: str) -> None:
    model = tiny_mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # differ from the factory's weights
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), str(path))
    before = _digest(path)
    loaded = load_model(path, arch=ARCH)
    assert _digest(path) == before
    assert loaded.kind == "state_dict"
    assert loaded.base == {"kind": "factory", "arch": ARCH}
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))
    with pytest.raises(ModelLoadError, match="user factory"):
        rebuild_base(loaded.base, tmp_path)  # the recorded factory runs only on request
    assert type(rebuild_base(loaded.base, tmp_path, trust_code=True)).__name__ == "TinyMLP"
    assert type(rebuild_base(loaded.base, tmp_path, arch=ARCH)).__name__ == "TinyMLP"


def test_state_dict_without_arch(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(tiny_mlp().state_dict(), str(path))
    with pytest.raises(ModelLoadError, match="--arch module:factory") as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_state_dict_key_mismatch(tmp_path: Path) -> None:
    sd = tiny_mlp().state_dict()
    sd["extra.weight"] = sd.pop("fc2.weight")
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelLoadError) as err:
        load_model(path, arch=ARCH)
    msg = str(err.value)
    assert "`fc2.weight`" in msg and "`extra.weight`" in msg and str(path) in msg


@pytest.mark.parametrize(
    "arch",
    [
        "no_such_module_xyz:f",
        "tests.helpers_models:nope",
        "nocolon",
        ARCH.replace("tiny_mlp", "broken_factory"),
    ],
)
def test_bad_arch(tmp_path: Path, arch: str) -> None:
    path = tmp_path / "w.safetensors"
    save_file(tiny_mlp().state_dict(), str(path))
    with pytest.raises(ModelLoadError):
        load_model(path, arch=arch)


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(tiny_mlp(), str(path))
    before = _digest(path)
    with pytest.raises(ModelLoadError, match="arbitrary code") as err:
        load_model(path)
    assert err.value.help is not None and "--trust-pickle" in err.value.help
    loaded = load_model(path, trust_pickle=True)
    assert loaded.kind == "pickle" and loaded.base == {"kind": "pickle", "file": "base.pt"}
    assert type(loaded.model).__name__ == "TinyMLP" and not loaded.model.training
    assert _digest(path) == before
    out = tmp_path / "out"
    save_base_files(loaded, out)  # an output keeps a copy of the pickled module ...
    assert _digest(out / "base.pt") == before
    with pytest.raises(ModelLoadError, match="--trust-pickle"):  # ... unpickled only on request
        rebuild_base(loaded.base, out)
    assert type(rebuild_base(loaded.base, out, trust_pickle=True)).__name__ == "TinyMLP"


def test_pickled_hf_model_is_rebuilt_from_its_config(tmp_path: Path) -> None:
    """A pickled transformers model needs no pickle to rebuild: its class and config do."""
    path = tmp_path / "gpt2.pt"
    torch.save(tiny_gpt2(), str(path))
    loaded = load_model(path, trust_pickle=True)
    assert loaded.kind == "pickle" and loaded.base["kind"] == "hf"
    assert loaded.base["class"] == "GPT2LMHeadModel" and loaded.config is not None
    out = tmp_path / "out"
    save_base_files(loaded, out)
    assert not (out / "base.pt").exists()
    assert type(rebuild_base(loaded.base, out)).__name__ == "GPT2LMHeadModel"


@pytest.mark.parametrize(
    ("base", "match"),
    [
        ({"kind": "pickle"}, "holds no copy of it"),
        ({"kind": "pickle", "file": "../elsewhere.pt"}, "not a file name inside"),
        ({"kind": "pickle", "file": "base.pt"}, "missing"),
    ],
)
def test_pickled_base_records_are_checked(tmp_path: Path, base: dict[str, Any], match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        rebuild_base(base, tmp_path, trust_pickle=True)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.pt2")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pt2"])
def test_corrupt_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(os.urandom(512))
    before = _digest(path)
    with pytest.raises(ModelLoadError) as err:
        load_model(path, arch=ARCH, trust_pickle=True)
    assert str(path) in str(err.value)
    assert "weights_only" not in str(err.value)
    assert _digest(path) == before


def test_truncated_pt2(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt2"
    torch.export.save(torch.export.export(tiny_mlp(), (torch.randn(3, 8),)), str(path))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ModelLoadError, match=re.escape(str(path))):
        load_model(path, trust_pickle=True)


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unknown model format"):
        load_model(path)


def test_loaded_model_is_plain_data() -> None:
    lm = LoadedModel(model=tiny_mlp(), kind="pickle", source=Path("x.pt"), base={"kind": "pickle"})
    assert lm.model_dir is None and lm.config is None and lm.example_inputs is None


# --- weights that do not cover the model (item 7) --------------------------------------------


def _drop_keys(directory: Path, count: int) -> list[str]:
    """Remove ``count`` tensors from ``directory/model.safetensors``; return their names."""
    weights = directory / "model.safetensors"
    state = load_file(str(weights))
    dropped = sorted(state)[:count]
    for key in dropped:
        del state[key]
    save_file(state, str(weights), metadata={"format": "pt"})
    return dropped


@pytest.mark.parametrize("factory", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_hf_checkpoint_missing_a_key_is_an_error(tmp_path: Path, factory: Any) -> None:
    d = tmp_path / "model"
    factory().save_pretrained(d, safe_serialization=True)
    assert load_model(d).kind == "hf"  # complete (GPT-2's tied `lm_head` is not missing)
    (key,) = _drop_keys(d, 1)
    with pytest.raises(ModelLoadError) as err:
        load_model(d)
    msg = str(err.value)
    assert f"`{key}`" in msg and "1 missing key " in msg and str(d) in msg
    assert "randomly initialised" in msg
    assert err.value.help is not None and "save_pretrained" in err.value.help


def test_hf_checkpoint_missing_many_keys_names_five_and_counts(tmp_path: Path) -> None:
    d = tmp_path / "bert"
    tiny_bert().save_pretrained(d, safe_serialization=True)
    dropped = _drop_keys(d, 7)
    with pytest.raises(ModelLoadError) as err:
        load_model(d)
    msg = str(err.value)
    assert "7 missing keys" in msg and "and 2 more" in msg
    assert sum(f"`{k}`" in msg for k in dropped) == 5


# --- malformed surgery.json (item 14) ----------------------------------------------------------


def _output(tmp_path: Path) -> Path:
    """A valid output: tiny BERT with one `LowRankLinear`, rebuilt without any opt-in."""
    from surgery.modules import LowRankLinear
    from surgery.save import write_model

    model = tiny_bert()
    model.encoder.layer[0].intermediate.dense = LowRankLinear(32, 64, rank=4)
    out = tmp_path / "out"
    write_model(model, {"kind": "hf", "class": "BertModel"}, out)
    return out


def _edit(manifest: dict[str, Any], change: str) -> Any:
    record = manifest["modules"][0]
    edits: dict[str, Any] = {
        "not an object": lambda: [manifest],
        "missing base": lambda: manifest.pop("base"),
        "base not an object": lambda: manifest.update(base="factory"),
        "unknown base kind": lambda: manifest["base"].update(kind="magic"),
        "factory without arch": lambda: manifest.update(base={"kind": "factory"}),
        "factory arch not a string": lambda: manifest.update(
            base={"kind": "factory", "arch": ["os", "abort"]}
        ),
        "hf config not an object": lambda: manifest["base"].update(config=3),
        "hf class not a string": lambda: manifest["base"].update({"class": None}),
        "hf unknown model type": lambda: manifest["base"]["config"].update(model_type="nope"),
        "export program outside": lambda: manifest.update(
            base={"kind": "export", "program": "../evil.pt2"}
        ),
        "export program absolute": lambda: manifest.update(
            base={"kind": "export", "program": "/tmp/evil.pt2"}
        ),
        "wrong format": lambda: manifest.update(format="surgery/99"),
        "modules not a list": lambda: manifest.update(modules={"fc1": record}),
        "record not an object": lambda: manifest.update(modules=["fc1"]),
        "record missing spec": lambda: record.pop("spec"),
        "record spec not an object": lambda: record.update(spec=[8, 16, 2]),
        "record missing path": lambda: record.pop("path"),
        "record unknown class": lambda: record.update({"class": "NoSuchModule"}),
        "record bad spec keys": lambda: record.update(spec={"nope": 1}),
        "record bad spec values": lambda: record["spec"].update(rank=-3),
        "record path not in model": lambda: record.update(path="no.such.module"),
        "dtype Tensor": lambda: manifest.update(dtype="Tensor"),
        "dtype foo": lambda: manifest.update(dtype="foo"),
        "dtype number": lambda: manifest.update(dtype=123),
        "dtype integer": lambda: manifest.update(dtype="int64"),
        "dtype null": lambda: manifest.update(dtype=None),
    }
    result = edits[change]()
    return result if change == "not an object" else manifest


MALFORMED = [
    "not an object",
    "missing base",
    "base not an object",
    "unknown base kind",
    "factory without arch",
    "factory arch not a string",
    "hf config not an object",
    "hf class not a string",
    "hf unknown model type",
    "export program outside",
    "export program absolute",
    "wrong format",
    "modules not a list",
    "record not an object",
    "record missing spec",
    "record spec not an object",
    "record missing path",
    "record unknown class",
    "record bad spec keys",
    "record bad spec values",
    "record path not in model",
    "dtype Tensor",
    "dtype foo",
    "dtype number",
    "dtype integer",
    "dtype null",
]


@pytest.mark.parametrize("change", MALFORMED)
def test_malformed_manifest_is_a_load_error(tmp_path: Path, change: str) -> None:
    from surgery.save import load

    out = _output(tmp_path)
    dense = load(out).encoder.layer[0].intermediate.dense
    assert type(dense).__name__ == "LowRankLinear"  # valid as written
    manifest_path = out / "surgery.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(_edit(manifest, change)))
    with pytest.raises(ModelLoadError) as err:  # never KeyError / TypeError / AttributeError
        load(out)
    msg = str(err.value)
    assert str(out) in msg or "transformers" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("text", ["{", "", "\xff\xfe", "[" * 100_000])
def test_unreadable_manifest_is_a_load_error(tmp_path: Path, text: str) -> None:
    from surgery.save import load

    out = _output(tmp_path)
    (out / "surgery.json").write_text(text, encoding="latin-1")
    with pytest.raises(ModelLoadError, match="is not valid JSON"):
        load(out)


def test_bad_dtype_message_names_the_value(tmp_path: Path) -> None:
    from surgery.save import load

    out = _output(tmp_path)
    manifest = json.loads((out / "surgery.json").read_text())
    manifest["dtype"] = "Tensor"
    (out / "surgery.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="`dtype` `Tensor`, which is not a floating-point"):
        load(out)


def test_arch_is_refused_for_a_base_that_is_not_a_factory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="only to an output built from a user factory"):
        rebuild_base({"kind": "hf", "class": "BertModel", "config": {}}, tmp_path, arch=ARCH)


# --- outputs of every input format reload (issue 16) -----------------------------------------


def _apply(tmp_path: Path, model: Path, text: str, *flags: str) -> tuple[int, Path]:
    from surgery.cli import main

    recipe = tmp_path / "r.surg"
    recipe.write_text(text)
    out = tmp_path / "out"
    code = main(["apply", str(recipe), str(model), "-o", str(out), "--no-measure", "-q", *flags])
    return code, out


def test_pickled_module_output_loads_with_trust_pickle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from surgery.cli import main
    from surgery.save import load

    path = tmp_path / "whole.pt"
    torch.manual_seed(0)
    torch.save(tiny_mlp(), str(path))
    code, out = _apply(tmp_path, path, "decompose Linear rank = 0.5\n", "--trust-pickle")
    assert code == 0
    assert (out / "base.pt").is_file()
    capsys.readouterr()
    assert main(["load", str(out)]) == 2
    err = capsys.readouterr().err
    assert "S0311" in err and "--trust-pickle" in err and "Traceback" not in err
    assert main(["load", str(out), "--trust-pickle"]) == 0
    assert "ran the example inputs" in capsys.readouterr().out
    rebuilt = load(out, trust_pickle=True)
    assert any(type(m).__name__ == "LowRankLinear" for m in rebuilt.modules())


def test_dynamic_batch_pt2_applies_and_reloads(tmp_path: Path) -> None:
    """A program exported with a dynamic batch dimension (its graphs hold fake tensors of
    symbolic size, which `copy.deepcopy` cannot copy) is surgered, saved and reloaded."""
    from surgery.cli import main
    from surgery.save import load

    torch.manual_seed(0)
    model = tiny_mlp().eval()
    x = torch.randn(4, 8)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    path = tmp_path / "dyn.pt2"
    torch.export.save(program, str(path))
    code, out = _apply(tmp_path, path, "decompose Linear rank = 0.5\n", "--trust-pickle")
    assert code == 0
    assert main(["load", str(out), "--trust-pickle"]) == 0
    rebuilt = load(out, trust_pickle=True)
    assert rebuilt(torch.randn(7, 8)).shape == (7, 4)  # still any batch size


def test_nested_replacement_is_recorded_and_reloads(tmp_path: Path) -> None:
    """`sparsify` on the factors of a `decompose`d layer: the N:M factors are recorded inside
    the low-rank module, and the output reloads to the same outputs."""
    from surgery.manager import Manager
    from surgery.modules import LowRankLinear
    from surgery.modules.sparse import SparseLinear
    from surgery.parse import parse
    from surgery.save import load, save_run, surgery_modules

    torch.manual_seed(0)
    d = tmp_path / "bert"
    tiny_bert().save_pretrained(d, safe_serialization=True)
    recipe = parse(
        'decompose Linear where name ~ "*.intermediate.dense" rank = 0.5\n'
        'sparsify Linear where name ~ "*.intermediate.dense.*" 2:4\n'
    )
    run = Manager(recipe, load_model(d)).run(measure=False)
    layer = run.model.get_submodule("encoder.layer.0.intermediate.dense")
    assert isinstance(layer, LowRankLinear) and isinstance(layer.first, SparseLinear)
    paths = [r["path"] for r in surgery_modules(run.model)]
    assert "encoder.layer.0.intermediate.dense.first" in paths
    save_run(run, tmp_path / "out")
    rebuilt = load(tmp_path / "out")
    ins = run.example
    for a, b in zip(ins.call(run.model).values(), ins.call(rebuilt).values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_load_of_a_model_that_fails_to_run_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import surgery.inputs
    from surgery.cli import main

    path = tmp_path / "whole.pt"
    torch.save(tiny_mlp(), str(path))
    code, out = _apply(tmp_path, path, "decompose Linear rank = 0.5\n", "--trust-pickle")
    assert code == 0
    wrong = surgery.inputs.Inputs((torch.zeros(2, 5),), {})  # TinyMLP takes 8 features
    monkeypatch.setattr(surgery.inputs, "example_inputs", lambda model: wrong)
    capsys.readouterr()
    assert main(["load", str(out), "--trust-pickle"]) == 2
    err = capsys.readouterr().err
    assert "S0311" in err and "does not run on its example inputs" in err
    assert "Traceback" not in err
