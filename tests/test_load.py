"""Tests for `surgery.load`: every supported format, and every bad input as a ModelLoadError."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from surgery.load import LoadedModel, ModelLoadError, load_model, rebuild_base, save_base_files
from tests.helpers_models import tiny_bert, tiny_mlp

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
    loaded = load_model(path)
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
    rebuilt = rebuild_base(loaded.base, out)
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
    assert type(rebuild_base(loaded.base, tmp_path)).__name__ == "TinyMLP"


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
    assert loaded.kind == "pickle" and loaded.base == {"kind": "pickle"}
    assert type(loaded.model).__name__ == "TinyMLP" and not loaded.model.training
    assert _digest(path) == before
    with pytest.raises(ModelLoadError, match="pickle"):
        rebuild_base(loaded.base, tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.pt2")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pt2"])
def test_corrupt_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(os.urandom(512))
    before = _digest(path)
    with pytest.raises(ModelLoadError) as err:
        load_model(path, arch=ARCH)
    assert str(path) in str(err.value)
    assert _digest(path) == before


def test_truncated_pt2(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt2"
    torch.export.save(torch.export.export(tiny_mlp(), (torch.randn(3, 8),)), str(path))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ModelLoadError, match=re.escape(str(path))):
        load_model(path)


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unknown model format"):
        load_model(path)


def test_loaded_model_is_plain_data() -> None:
    lm = LoadedModel(model=tiny_mlp(), kind="pickle", source=Path("x.pt"), base={"kind": "pickle"})
    assert lm.model_dir is None and lm.config is None and lm.example_inputs is None
