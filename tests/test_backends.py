"""Backends: lowering numerics per available backend, verify() results and their text.

Backends that are not installed, or whose device is missing (CUDA here), skip with the
backend's own reason. No timing is asserted: only that timing ran and has the right form.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import surgery
from surgery.backends import (
    EXPECT_ON,
    TARGET_SUPPORT,
    FlatSignature,
    LoweringError,
    Verification,
    get_backend,
    run_targets,
    verify,
)
from surgery.backends.base import Lowered
from surgery.check import BACKENDS
from surgery.contracts import contract_value
from surgery.inputs import Inputs
from surgery.manager import Manager, Run
from surgery.timing import Speedup, measure_speedup_fn
from tests.helpers_models import tiny_bert, tiny_gpt2

SPEED_RE = re.compile(r"speedup \d+\.\d\d× \[\d+\.\d\d, \d+\.\d\d\] on [a-z-]+ ")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tuning databases and latency tables go to a per-test directory, never ~/.cache.
    monkeypatch.setenv("SURGERY_CACHE_DIR", str(tmp_path / "cache"))


def _surgered(factory: object, recipe: str) -> Run:
    assert callable(factory)
    return Manager(surgery.parse(recipe), factory()).run(measure=False)


@pytest.fixture(scope="module")
def bert_run() -> Run:
    return _surgered(tiny_bert, "decompose Linear rank = 0.5")


@pytest.fixture(scope="module")
def gpt2_run() -> Run:
    return _surgered(tiny_gpt2, "decompose Conv1D rank = 0.5")


def _require(backend_name: str, device: str | None = None, trials: int | None = None) -> object:
    backend = get_backend(backend_name, device, trials)
    ok, why = backend.is_available()
    if not ok:
        pytest.skip(why)
    return backend


def _check_numerics(run: Run, backend: object, tmp_path: Path) -> Verification:
    v = verify(run.original, run.model, backend, run.example, warmup=1, repeats=3, workdir=tmp_path)  # type: ignore[arg-type]
    assert v.status == "ok", str(v)
    assert v.lowering_error is not None and v.lowering_error <= 1e-5
    assert v.baseline_error is not None and v.baseline_error <= 1e-5
    assert v.drift_eager is not None and v.drift_eager > 0  # the surgery changed the model
    assert v.speed is not None and v.speed.repeats == 3
    return v


# --- numerics per backend -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["bert", "gpt2"])
def test_torch_cpu_numerics(which: str, bert_run: Run, gpt2_run: Run, tmp_path: Path) -> None:
    run = bert_run if which == "bert" else gpt2_run
    v = _check_numerics(run, _require("torch", "cpu"), tmp_path)
    assert v.lowering_error == 0.0  # eager is the reference itself


@pytest.mark.parametrize("which", ["bert", "gpt2"])
def test_onnx_cpu_numerics(which: str, bert_run: Run, gpt2_run: Run, tmp_path: Path) -> None:
    run = bert_run if which == "bert" else gpt2_run
    v = _check_numerics(run, _require("onnx", "cpu"), tmp_path)
    assert v.artifacts == [tmp_path / "model.onnx"] and v.artifacts[0].stat().st_size > 0


def test_tvm_llvm_untuned_numerics(bert_run: Run, tmp_path: Path) -> None:
    # trials 0: numerics only (untuned CPU code is slow; tuning is tested below, marked slow).
    v = _check_numerics(bert_run, _require("tvm", "llvm", 0), tmp_path)
    assert {p.name for p in v.artifacts} == {"model.so", "model.params"}


@pytest.mark.slow
def test_tvm_llvm_tuned_and_cached(tmp_path: Path) -> None:
    backend = _require("tvm", "llvm", 4)
    from surgery.backends.tvm_backend import TvmBackend

    assert isinstance(backend, TvmBackend)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    ins = Inputs((torch.randn(4, 32),), {})
    low = backend.lower(model, ins, tmp_path / "a")
    torch.testing.assert_close(low(ins)[0], model(ins.args[0]), rtol=1e-5, atol=1e-5)
    cache = Path(str(tmp_path / "cache")) / "tvm"
    (db,) = [p for p in cache.iterdir() if p.is_dir()]
    assert (db / "surgery.json").is_file() and (db / "database_tuning_record.json").is_file()
    # Same architecture, other weights: the tuned database applies, nothing is tuned again.
    records = (db / "database_tuning_record.json").read_text()
    other = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    low2 = backend.lower(other, ins, tmp_path / "b")
    torch.testing.assert_close(low2(ins)[0], other(ins.args[0]), rtol=1e-5, atol=1e-5)
    assert (db / "database_tuning_record.json").read_text() == records


@pytest.mark.slow
def test_torch_inductor_numerics(bert_run: Run, tmp_path: Path) -> None:
    _check_numerics(bert_run, _require("torch", "inductor"), tmp_path)


@pytest.mark.slow
def test_torch_inductor_compiles_every_lowering_in_a_process(tmp_path: Path) -> None:
    # Dynamo caches at most 8 programs per code object; past that it silently runs eagerly.
    # A bench over several models, or the latency table of `keep if faster` (one lowering
    # per candidate layer), lowers more than 8 distinct models in one process.
    import torch._dynamo.config as dynamo_config

    backend = _require("torch", "inductor")
    ins = Inputs((torch.randn(4, 8),), {})
    with dynamo_config.patch(fail_on_recompile_limit_hit=True):  # eager fallback raises
        for width in range(1, 11):  # ten shapes: ten distinct programs
            model = nn.Sequential(nn.Linear(8, width), nn.GELU()).eval()
            low = backend.lower(model, ins, tmp_path)  # type: ignore[attr-defined]
            torch.testing.assert_close(low(ins)[0], model(ins.args[0]))


@pytest.mark.parametrize("target", [("torch", "cuda"), ("onnx", "cuda"), ("tvm", "cuda")])
def test_cuda_numerics(target: tuple[str, str], bert_run: Run, tmp_path: Path) -> None:
    _check_numerics(bert_run, _require(*target, 0), tmp_path)


# --- verify() results -----------------------------------------------------------------------


def test_verify_text_and_dict() -> None:
    torch.manual_seed(0)
    a = nn.Linear(32, 32)
    b = nn.Sequential(nn.Linear(32, 4), nn.Linear(4, 32))
    v = verify(a, b, get_backend("torch"), Inputs((torch.randn(8, 32),), {}), warmup=1, repeats=4)
    text = str(v)
    assert text.startswith("torch-cpu: numerics ok (lowering error 0 ≤ 0.0001; drift ")
    assert SPEED_RE.search(text), text
    d = v.as_dict()
    assert d["status"] == "ok" and d["speed"]["repeats"] == 4 and d["artifacts"] == []


class _Unavailable:
    name, device = "fake-npu", "npu"

    def is_available(self) -> tuple[bool, str]:
        return False, "no NPU here"

    def lower(self, model: nn.Module, example_inputs: Inputs, workdir: Path) -> Lowered:
        raise AssertionError("never lowered when unavailable")


class _Wrong(Lowered):
    """Runs the model but adds 1% noise: a miscompiling backend."""

    def __init__(self, model: nn.Module, signature: FlatSignature) -> None:
        super().__init__("fake-wrong", signature, [])
        self.model = model

    def run_flat(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            out = self.model(*tensors)
        return [out * 1.01]

    def bind(self, inputs: Inputs):  # type: ignore[no-untyped-def]
        raise AssertionError("a backend with wrong numerics is never timed")


class _WrongBackend:
    name, device = "fake-wrong", "cpu"

    def is_available(self) -> tuple[bool, str]:
        return True, ""

    def lower(self, model: nn.Module, example_inputs: Inputs, workdir: Path) -> Lowered:
        return _Wrong(model, FlatSignature.of(example_inputs))


class _Broken(_WrongBackend):
    def lower(self, model: nn.Module, example_inputs: Inputs, workdir: Path) -> Lowered:
        raise LoweringError("exporter does not support `aten::frobnicate`")


def test_verify_unavailable_failed_and_wrong_numerics() -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    ins = Inputs((torch.randn(2, 4),), {})
    v = verify(a, b, _Unavailable(), ins)
    assert v.status == "unavailable" and str(v) == "fake-npu: unavailable: no NPU here"
    v = verify(a, b, _Broken(), ins)
    assert v.status == "failed" and "aten::frobnicate" in str(v)
    v = verify(a, b, _WrongBackend(), ins)
    assert v.status == "numerics failed" and v.speed is None and v.numerics_ok is False
    assert "numerics FAILED (lowering error 0.01 > 0.0001" in str(v) and "not timed" in str(v)


def test_signature_rejects_other_inputs() -> None:
    ins = Inputs((torch.ones(2, 3),), {"use_cache": False})
    sig = FlatSignature.of(ins)
    args, kwargs = sig.rebuild((torch.zeros(2, 3),))
    assert kwargs == {"use_cache": False} and args[0].sum() == 0
    with pytest.raises(LoweringError, match="lower it again"):
        sig.tensors(Inputs((torch.ones(2, 3),), {"use_cache": True}))


# --- what the manager and the checker call --------------------------------------------------


def test_run_targets_and_contract_value(bert_run: Run, tmp_path: Path) -> None:
    inputs = bert_run.calibration[0] if bert_run.calibration else bert_run.example
    results = run_targets(
        bert_run.original,
        bert_run.model,
        inputs,
        [("torch", None, None), ("torch", "cpu", None), ("torch", "cuda", None)],
        tmp_path,
        warmup=1,
        repeats=3,
    )
    assert [v.backend for v in results] == ["torch-cpu", "torch-cuda"]  # duplicate dropped
    assert results[0].ok
    if not torch.cuda.is_available():
        assert results[1].status == "unavailable" and "CUDA" in results[1].reason
    value = contract_value(results, "torch")
    assert value is not None and value[0] > 0 and value[1][0] <= value[1][1]
    assert contract_value(results, "onnx") is None  # not measured is never "met"


def test_contract_reads_the_slowest_target() -> None:
    fast = Speedup("onnx-cpu", 2.0, 1.0, 2.0, 1.9, 2.1, 5, 1)
    slow = Speedup("onnx-cuda", 1.2, 1.0, 1.2, 1.1, 1.3, 5, 1)
    vs = [Verification("onnx-cpu", "ok", 1e-4, speed=fast)]
    vs.append(Verification("onnx-cuda", "ok", 1e-4, speed=slow))
    assert contract_value(vs, "onnx") == (1.2, (1.1, 1.3))
    assert contract_value(vs, "onnx-cpu") == (2.0, (1.9, 2.1))


def test_support_tables_match_the_language() -> None:
    for pair in TARGET_SUPPORT["device"] or ():
        backend, device = pair.split()
        assert device in BACKENDS[backend], pair
        assert get_backend(backend, device).name.startswith(backend)
    assert EXPECT_ON <= set(BACKENDS)
    with pytest.raises(ValueError, match="not implemented"):
        get_backend("mindir", "ascend")


def test_measure_speedup_fn_interleaves() -> None:
    calls: list[str] = []
    s = measure_speedup_fn(
        lambda: calls.append("a"), lambda: calls.append("b"), warmup=1, repeats=4, device="x"
    )
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert s.device == "x" and s.repeats == 4
