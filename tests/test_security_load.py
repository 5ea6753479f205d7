"""Loading a model or an output never runs code chosen by the files, unless the caller opts in.

Each attack artifact is built here: a `.pt2` whose weight entry (or saved example inputs) is a
pickle with a `__reduce__` payload, a `surgery.json` naming `os:abort` / `code:interact` / a
module shipped in the output, a `config.json` with `auto_map`, tokenizer files that are links
to files elsewhere, and pickles that refer to blocked modules. A payload writes a marker file
when it runs; the tests assert that the marker never appears.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import surgery
from surgery.load import ModelLoadError, load_model, save_base_files
from surgery.save import FORMAT, load, write_model
from tests.helpers_models import tiny_bert, tiny_mlp

ROOT = Path(__file__).resolve().parents[1]
ARCH = "tests.helpers_models:tiny_mlp"


class _OpenPayload:
    """Unpickling this creates ``marker``: a stand-in for any code a crafted file runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


class _BlockedPayload:
    """Unpickling this calls ``os.mkdir(marker)``: a global from a module torch blocks."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (self.marker,))


# --- item 1: `.pt2` programs are unpickled by torch.export.load ---------------------------------


def _crafted_pt2(tmp_path: Path, slot: str, marker: Path) -> Path:
    """A real exported program with one entry replaced by a pickle that creates ``marker``.

    ``slot="weight"``: the `fc1.bias` weight is flagged `use_pickle` (torch then calls
    `torch.load(weights_only=False)` on it). ``slot="example inputs"``: the saved example
    inputs, which torch retries with `weights_only=False` after any failure — an entry no
    `use_pickle` flag announces.
    """
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(tiny_mlp(), (torch.randn(3, 8),)), str(good))
    evil = tmp_path / f"evil-{slot.replace(' ', '-')}.pt2"
    payload = pickle.dumps(_OpenPayload(marker), protocol=2)
    with zipfile.ZipFile(good) as zin:
        names = zin.namelist()
        (config_name,) = [n for n in names if n.endswith("data/weights/model_weights_config.json")]
        config = json.loads(zin.read(config_name))
        entry = config["config"]["fc1.bias"]
        entry["use_pickle"] = True
        weight_name = config_name.rsplit("/", 1)[0] + "/" + entry["path_name"]
        with zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                data = zin.read(info.filename)
                if slot == "weight" and info.filename == config_name:
                    data = json.dumps(config).encode()
                elif slot == "weight" and info.filename == weight_name:
                    data = payload
                elif slot == "example inputs" and info.filename.endswith(
                    "data/sample_inputs/model.pt"
                ):
                    data = payload
                zout.writestr(info, data)
    return evil


SLOTS = ["weight", "example inputs"]


@pytest.mark.parametrize("slot", SLOTS)
def test_crafted_pt2_really_runs_code_in_torch_export_load(tmp_path: Path, slot: str) -> None:
    """The artifacts are real attacks (if torch ever loads them safely, revisit `_load_export`)."""
    marker = tmp_path / "marker"
    evil = _crafted_pt2(tmp_path, slot, marker)
    try:
        torch.export.load(str(evil))
    except Exception:
        pass  # the payload has run by the time torch notices the entry is not a tensor
    assert marker.exists()


@pytest.mark.parametrize("slot", SLOTS)
def test_crafted_pt2_is_refused_and_its_payload_never_runs(tmp_path: Path, slot: str) -> None:
    marker = tmp_path / "marker"
    evil = _crafted_pt2(tmp_path, slot, marker)
    with pytest.raises(ModelLoadError) as err:
        load_model(evil)
    assert not marker.exists()
    msg, help_text = str(err.value), err.value.help or ""
    assert str(evil) in msg and "unpickles" in msg and "--trust-pickle" in msg
    assert "--trust-pickle" in help_text and "--arch module:factory" in help_text
    assert "weights_only" not in msg + help_text


def test_planted_base_pt2_in_an_output_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = _crafted_pt2(tmp_path, "weight", marker)
    out = tmp_path / "out"
    out.mkdir()
    (out / "base.pt2").write_bytes(evil.read_bytes())
    save_file(tiny_mlp().state_dict(), str(out / "model.safetensors"))
    manifest = {
        "format": FORMAT,
        "base": {"kind": "export", "program": "base.pt2"},
        "dtype": "float32",
        "modules": [],
    }
    (out / "surgery.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="--trust-pickle") as err:
        load(out)
    assert not marker.exists()
    assert "trust_pickle=True" in (err.value.help or "")


def test_trusted_pt2_output_round_trips(tmp_path: Path) -> None:
    model = tiny_mlp()
    x = torch.randn(3, 8)
    path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    loaded = load_model(path, trust_pickle=True)
    out = tmp_path / "out"
    write_model(loaded.model, loaded.base, out)
    save_base_files(loaded, out)
    with pytest.raises(ModelLoadError, match="--trust-pickle"):
        load(out)
    again = load(out, trust_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


# --- item 2: `surgery.json` never chooses code to run ------------------------------------------


def _factory_output(tmp_path: Path, arch: str) -> Path:
    """An output of the tiny MLP whose `surgery.json` records ``arch`` as its factory."""
    out = tmp_path / "out"
    write_model(tiny_mlp(), {"kind": "factory", "arch": ARCH}, out)
    manifest = json.loads((out / "surgery.json").read_text())
    manifest["base"]["arch"] = arch
    (out / "surgery.json").write_text(json.dumps(manifest))
    return out


_LOAD_SCRIPT = """\
import sys
import surgery
try:
    surgery.load(sys.argv[1])
except surgery.ModelLoadError as exc:
    print("refused:", exc)
"""


@pytest.mark.parametrize("factory", ["os:abort", "code:interact"])
def test_factory_named_by_surgery_json_is_not_called(tmp_path: Path, factory: str) -> None:
    out = _factory_output(tmp_path, factory)
    marker = tmp_path / "marker"
    # In a subprocess: `os:abort` would kill the test run; `code:interact` executes stdin.
    res = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(out)],
        input=f"open({str(marker)!r}, 'w').close()\n",
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert not marker.exists()
    assert res.returncode == 0, res.stderr
    assert f"refused: `{out}` was built from the user factory `{factory}`" in res.stdout


def test_module_shipped_in_the_output_is_not_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"payload_{uuid.uuid4().hex}"
    out = _factory_output(tmp_path, f"{name}:build")
    marker = tmp_path / "marker"
    (out / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\ndef build():\n    raise SystemExit('ran')\n"
    )
    # As when `surgery load .` runs inside OUT: the CLI puts the current directory on sys.path.
    monkeypatch.syspath_prepend(str(out))
    monkeypatch.chdir(out)
    with pytest.raises(ModelLoadError, match="not called unless you ask for it"):
        load(out)
    assert not marker.exists() and name not in sys.modules


def test_recorded_factory_runs_only_on_request(tmp_path: Path) -> None:
    model = tiny_mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # differ from what the factory builds
    out = tmp_path / "out"
    write_model(model, {"kind": "factory", "arch": ARCH}, out)
    with pytest.raises(ModelLoadError) as err:
        surgery.load(out)
    assert f"user factory `{ARCH}`" in str(err.value)
    assert f"--arch {ARCH}" in (err.value.help or "")
    assert "trust_code=True" in (err.value.help or "")
    x = torch.randn(2, 8)
    for again in (surgery.load(out, trust_code=True), surgery.load(out, arch=ARCH)):
        with torch.no_grad():
            torch.testing.assert_close(again(x), model(x))


def test_caller_arch_wins_over_the_recorded_factory(tmp_path: Path) -> None:
    out = _factory_output(tmp_path, "os:abort")
    assert type(load(out, arch=ARCH)).__name__ == "TinyMLP"


def test_recorded_factory_is_shown_escaped(tmp_path: Path) -> None:
    out = _factory_output(tmp_path, "evil\x1b[2J:f\nfake line")
    with pytest.raises(ModelLoadError) as err:
        load(out)
    text = str(err.value) + (err.value.help or "")
    assert "\x1b" not in text and "\n" not in text
    assert "evil\\x1b[2J:f\\nfake line" in text


# --- item 4: Hugging Face remote code --------------------------------------------------------


def _remote_code_dir(tmp_path: Path, marker: Path, model_type: str = "bert") -> Path:
    """A BERT directory whose config maps `AutoModel` to a class in a shipped Python file."""
    d = tmp_path / "remote"
    tiny_bert().save_pretrained(d, safe_serialization=True)
    (d / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import BertModel\n\n\n"
        "class EvilModel(BertModel):\n"
        "    pass\n"
    )
    config = json.loads((d / "config.json").read_text())
    config.update(
        model_type=model_type,
        architectures=["EvilModel"],
        auto_map={"AutoModel": "modeling_evil.EvilModel"},
    )
    (d / "config.json").write_text(json.dumps(config, indent=2))
    return d


@pytest.mark.parametrize("model_type", ["bert", "evil-net"])
def test_config_with_auto_map_is_refused(tmp_path: Path, model_type: str) -> None:
    marker = tmp_path / "marker"
    d = _remote_code_dir(tmp_path, marker, model_type)
    with pytest.raises(ModelLoadError) as err:
        load_model(d)
    cfg = d / "config.json"
    line = next(i for i, t in enumerate(cfg.read_text().splitlines(), 1) if '"auto_map"' in t)
    msg = str(err.value)
    assert f"`{cfg}` line {line}: key `auto_map`" in msg
    assert "`modeling_evil.EvilModel`" in msg
    assert "--trust-remote-code" in (err.value.help or "")
    assert not marker.exists()


def test_trust_remote_code_opts_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.dynamic_module_utils as dmu

    # transformers copies the model's Python files into its module cache and puts that on
    # sys.path: keep both inside this test.
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
        monkeypatch.delitem(sys.modules, name)
    marker = tmp_path / "marker"
    d = _remote_code_dir(tmp_path, marker)
    loaded = load_model(d, trust_remote_code=True)
    assert type(loaded.model).__name__ == "EvilModel" and marker.exists()
    for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
        monkeypatch.delitem(sys.modules, name)


def _calls_without_trust_remote_code(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and (
                node.func.attr == "from_pretrained"
                or (
                    node.func.attr == "from_config"
                    and isinstance(node.func.value, (ast.Name, ast.Attribute))
                    and "Auto" in ast.unparse(node.func.value)
                )
            )
            and not any(k.arg == "trust_remote_code" for k in node.keywords)
        ):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_transformers_loader_says_trust_remote_code() -> None:
    files = [p for d in ("surgery", "backends", "bench") for p in (ROOT / d).rglob("*.py")]
    assert files
    assert [c for p in files for c in _calls_without_trust_remote_code(p)] == []


# --- item 5: side files that are links -------------------------------------------------------


def test_symlinked_side_files_are_not_copied(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:secret\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text('{"secret": true}')
    d = tmp_path / "bert"
    tiny_bert().save_pretrained(d, safe_serialization=True)
    (d / "vocab.txt").symlink_to(secret)  # the `/etc/passwd` case
    (d / "tokenizer.json").write_text("{}")
    (d / "special_tokens_map.json").symlink_to(d / "tokenizer.json")  # a link, even inside
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text("{}")
    (d / "1_Pooling" / "leak.json").symlink_to(secret)
    (d / "1_Pooling" / "sub").symlink_to(outside, target_is_directory=True)
    (d / "2_Dense").symlink_to(outside, target_is_directory=True)
    loaded = load_model(d)
    out = tmp_path / "out"
    skipped = save_base_files(loaded, out)
    copied = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert copied == ["1_Pooling", "1_Pooling/config.json", "tokenizer.json"]
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert set(skipped) == {
        d / "vocab.txt",
        d / "special_tokens_map.json",
        d / "1_Pooling" / "leak.json",
        d / "1_Pooling" / "sub",
        d / "2_Dense",
    }


def test_hub_cache_snapshot_links_are_copied(tmp_path: Path) -> None:
    """In the Hugging Face hub cache every file is a link into the repository's `blobs/`."""
    repo = tmp_path / "models--tiny--bert"
    snap = repo / "snapshots" / "abc123"
    tiny_bert().save_pretrained(snap, safe_serialization=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "f00d").write_text("[PAD]\n[UNK]\n")
    (snap / "vocab.txt").symlink_to(Path("../../blobs/f00d"))
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (snap / "merges.txt").symlink_to(secret)
    out = tmp_path / "out"
    skipped = save_base_files(load_model(snap), out)
    assert (out / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    assert not (out / "vocab.txt").is_symlink()
    assert skipped == [snap / "merges.txt"] and not (out / "merges.txt").exists()


# --- item 16: pickles with blocked globals -----------------------------------------------------


def test_blocked_global_pickle_explains_trust_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _BlockedPayload(marker)}, str(path))
    with pytest.raises(ModelLoadError) as err:
        load_model(path, arch=ARCH)
    msg, help_text = str(err.value), err.value.help or ""
    assert not marker.exists()
    assert "holds pickled Python objects" in msg and "mkdir" in msg
    assert "--trust-pickle" in help_text and "runs any code" in help_text
    assert "only for a file you made yourself or fully trust" in help_text
    assert "safetensors" in help_text
    assert "weights_only" not in msg + help_text and "add_safe_globals" not in msg + help_text


def test_pickled_module_message_has_no_torch_advice(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(tiny_mlp(), str(path))
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    text = str(err.value) + (err.value.help or "")
    assert "`tests.helpers_models.TinyMLP`" in text
    assert "weights_only" not in text and "add_safe_globals" not in text


def test_damaged_pickle_is_unreadable_not_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(pickle.PROTO + bytes([2]) + b"\xff" * 32)  # an opcode no pickle has
    with pytest.raises(ModelLoadError) as err:
        load_model(path, arch=ARCH)
    msg = str(err.value)
    assert "is not a readable torch file" in msg
    assert "weights_only" not in msg + (err.value.help or "")
