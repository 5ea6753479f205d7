"""TVM Relax: ``torch.export`` → ``from_exported_program`` → MetaSchedule tuning → ``tvm.compile``.

Targets: ``llvm`` (the host CPU, with its own ``mcpu`` so vector units are used) and ``cuda``.
Untuned CPU code ran 35–190× slower than eager (BACKENDS.md), so a CPU target is tuned with
MetaSchedule under a trial budget (``target tvm llvm trials N``: at most ``N`` trials per
tuning task). Tuning is the slow part, so its database is kept on disk keyed by the workload
(the Relax module with weights as inputs, the target and the TVM version): a second run of
the same model shapes, or the same architecture with other weights, applies the database
without tuning.

Two measures keep tuning affordable on a small machine:

* candidates are built **in this process**: MetaSchedule's ``LocalBuilder`` starts fresh
  worker processes for every batch, and each worker imports every vendor's tensor intrinsics
  (~40 s here), which made every build time out; a TIR build in-process takes milliseconds;
* weights are graph inputs (``keep_params_as_input``), so the tuned workload does not depend
  on weight values and the cache is shared by every checkpoint of one architecture.

Install (pins matter: ``apache-tvm-ffi`` 0.1.15 segfaults while saving the database)::

    pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 \
        psutil cloudpickle tornado xgboost-cpu
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from surgery.inputs import Inputs

from .base import (
    FlatSignature,
    Lowered,
    LoweringError,
    eval_mode,
    export_program,
    first_line,
)
from .cache import cache_dir

__all__ = ["DEFAULT_TRIALS", "TvmBackend", "TvmLowered", "tuning_dir"]

# Trials per tuning task when the recipe gives none: enough for MetaSchedule to beat eager on
# GEMM-bound graphs (32 per task did, BACKENDS.md), small enough for minutes, not hours.
DEFAULT_TRIALS = 32
_TUNING_TOOLS = ("psutil", "cloudpickle", "tornado", "xgboost")


def _target_spec(device: str) -> dict[str, Any]:
    """The TVM target as a dict (string targets are rejected by this TVM)."""
    if device == "cuda":
        from tvm.target import Target

        return dict(Target.from_device("cuda").export())
    from tvm.target import codegen

    return {
        "kind": "llvm",
        # Without mcpu LLVM emits baseline x86-64 (SSE2) and tuning cannot use AVX units.
        "mcpu": str(codegen.llvm_get_system_cpu()),
        "num-cores": os.cpu_count() or 1,
    }


def tuning_dir(script: str, target: dict[str, Any]) -> Path:
    """Where the MetaSchedule database of one workload lives: ``<cache>/tvm/<hash>``."""
    import tvm

    key = json.dumps(
        {"tvm": tvm.__version__, "target": target, "module": script}, sort_keys=True, default=str
    )
    return cache_dir("tvm") / hashlib.sha256(key.encode()).hexdigest()[:20]


class _Quiet:
    """MetaSchedule logs every trial to stdout; keep its per-task log files only."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("tvm.s_tir.meta_schedule")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)


def _in_process_builder() -> Any:
    """A MetaSchedule builder compiling candidates in this process (see the module doc)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder

    @derived_object
    class InProcessBuilder(PyBuilder):  # type: ignore[misc]
        def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
            import tvm
            from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
            from tvm.support.tar import tar

            results = []
            for item in build_inputs:
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(item.mod)
                    built = tvm.driver.build(mod, target=item.target)
                    path = os.path.join(tempfile.mkdtemp(prefix="surgery-ms-"), "mod.tar")
                    built.export_library(path, fcompile=tar)
                    results.append(BuilderResult(path, None))
                except Exception as exc:  # a bad candidate is a failed trial, not an error
                    results.append(BuilderResult(None, f"build failed: {first_line(exc)}"))
            return results

    return InProcessBuilder()


class TvmLowered(Lowered):
    """A Relax virtual machine with the model's weights bound as trailing arguments."""

    def __init__(
        self,
        name: str,
        signature: FlatSignature,
        vm: Any,
        params: list[Any],
        device: Any,
        artifacts: list[Path],
    ) -> None:
        super().__init__(name, signature, artifacts)
        self.vm = vm
        self.params = params
        self.dev = device

    def _args(self, tensors: list[Tensor]) -> list[Any]:
        import tvm

        return [
            tvm.runtime.tensor(t.detach().cpu().contiguous().numpy(), self.dev) for t in tensors
        ]

    def _outputs(self, out: Any) -> list[Tensor]:
        items = [out] if hasattr(out, "numpy") else list(out)
        return [torch.from_numpy(np.asarray(o.numpy())) for o in items]

    def run_flat(self, tensors: list[Tensor]) -> list[Tensor]:
        out = self.vm["main"](*self._args(tensors), *self.params)
        self.dev.sync()
        return self._outputs(out)

    def bind(self, inputs: Inputs) -> Callable[[], None]:
        args = [*self._args(self.signature.tensors(inputs)), *self.params]
        main = self.vm["main"]

        def once() -> None:
            main(*args)
            self.dev.sync()  # CUDA kernels are asynchronous; a no-op on CPU

        return once


class TvmBackend:
    """``tvm-llvm`` (host CPU, tuned) or ``tvm-cuda``.

    ``trials``: MetaSchedule trials per tuning task (``DEFAULT_TRIALS`` when None; 0 builds
    untuned code, which on CPU is far slower than eager and only good for numerics checks).
    """

    def __init__(self, device: str = "llvm", *, trials: int | None = None) -> None:
        if device not in ("llvm", "cuda"):
            raise ValueError(f"tvm backend device must be `llvm` or `cuda`, got `{device}`")
        if trials is not None and trials < 0:
            raise ValueError(f"trials must be ≥ 0, got {trials}")
        self.device = device
        self.name = f"tvm-{device}"
        self.trials = DEFAULT_TRIALS if trials is None else trials

    @classmethod
    def for_target(cls, device: str, trials: int | None = None) -> TvmBackend:
        """``target tvm llvm|cuda [trials N]``."""
        return cls(device, trials=trials)

    def is_available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("tvm") is None:
            return False, (
                "TVM is not installed: `pip install apache-tvm==0.27.0.post1 "
                "apache-tvm-ffi==0.1.14.post1 psutil cloudpickle tornado xgboost-cpu`"
            )
        try:
            import tvm
            from tvm.relax.frontend.torch import from_exported_program  # noqa: F401
        except Exception as exc:
            return False, f"TVM cannot be imported: {first_line(exc)}"
        if self.device == "cuda":
            if not tvm.runtime.enabled("cuda"):
                return False, "this TVM build has no CUDA runtime (the PyPI wheel is CPU-only)"
            if not tvm.cuda(0).exist:
                return False, "no CUDA device is visible to TVM"
        if self.trials > 0:
            missing = [m for m in _TUNING_TOOLS if importlib.util.find_spec(m) is None]
            if missing:
                return False, (
                    f"MetaSchedule tuning needs {', '.join(missing)}: "
                    "`pip install psutil cloudpickle tornado xgboost-cpu`"
                )
        return True, ""

    def lower(self, model: nn.Module, example_inputs: Inputs, workdir: Path) -> TvmLowered:
        import tvm
        from tvm import relax
        from tvm.relax.frontend.torch import from_exported_program

        with eval_mode(model):
            program, signature = export_program(model, example_inputs)
        try:
            with warnings.catch_warnings():  # torch pytree deprecations raised inside the importer
                warnings.simplefilter("ignore", FutureWarning)
                mod = from_exported_program(program, keep_params_as_input=True)
            mod, params = relax.frontend.detach_params(mod)
        except Exception as exc:
            raise LoweringError(
                f"TVM could not import the exported program: {first_line(exc)}"
            ) from exc
        spec = _target_spec(self.device)
        target = tvm.target.Target(spec)
        try:
            with target:
                mod = tvm.transform.Sequential(
                    [
                        relax.transform.DecomposeOpsForInference(),
                        relax.transform.CanonicalizeBindings(),
                        relax.get_pipeline("zero"),
                    ]
                )(mod)
                mod = self._schedule(mod, target, spec)
            executable = tvm.compile(mod, target=target)
        except LoweringError:
            raise
        except Exception as exc:
            raise LoweringError(f"TVM compilation failed: {first_line(exc)}") from exc
        dev = tvm.cuda(0) if self.device == "cuda" else tvm.cpu(0)
        vm = relax.VirtualMachine(executable, dev)
        weights = [tvm.runtime.tensor(p.numpy(), dev) for p in params.get("main", [])]
        workdir.mkdir(parents=True, exist_ok=True)
        library = workdir / "model.so"
        weights_file = workdir / "model.params"
        try:
            executable.export_library(str(library))
            tvm.runtime.save_param_dict_to_file(
                {f"p{i}": p for i, p in enumerate(params.get("main", []))}, str(weights_file)
            )
            artifacts = [library, weights_file]
        except Exception as exc:  # no C toolchain: the model still runs, nothing to ship
            raise LoweringError(
                f"TVM could not write the compiled library: {first_line(exc)}"
            ) from exc
        return TvmLowered(self.name, signature, vm, weights, dev, artifacts)

    def _schedule(self, mod: Any, target: Any, spec: dict[str, Any]) -> Any:
        """Apply tuned schedules (tuning first when the cache lacks them)."""
        from tvm import relax, tirx

        if self.trials == 0:
            if self.device == "cuda":  # GPU kernels need some schedule to bind threads
                from tvm.s_tir import dlight

                return dlight.ApplyDefaultSchedule(dlight.gpu.Fallback())(mod)
            return mod
        work = tuning_dir(mod.script(show_meta=False), spec)
        meta = work / "surgery.json"
        tuned = json.loads(meta.read_text())["trials"] if meta.is_file() else 0
        if tuned < self.trials:
            tasks = sum(1 for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))
            from tvm.s_tir import meta_schedule as ms

            work.mkdir(parents=True, exist_ok=True)
            try:
                with _Quiet():
                    ms.relax_integration.tune_relax(
                        mod,
                        params={},
                        target=target,
                        work_dir=str(work),
                        # Per-task budget, so every task is tuned (a global budget alone can
                        # leave tasks untouched).
                        max_trials_global=self.trials * max(tasks, 1),
                        max_trials_per_task=self.trials,
                        num_trials_per_iter=min(64, max(self.trials, 1)),
                        builder=_in_process_builder(),
                        runner=ms.runner.LocalRunner(timeout_sec=60),
                        seed=0,
                    )
            except Exception as exc:
                shutil.rmtree(work, ignore_errors=True)  # never leave a half-written database
                raise LoweringError(f"MetaSchedule tuning failed: {first_line(exc)}") from exc
            meta.write_text(json.dumps({"trials": self.trials, "tasks": tasks, "target": spec}))
        mod = relax.transform.MetaScheduleApplyDatabase(str(work))(mod)
        if self.device == "cuda":  # functions MetaSchedule did not tune still need a schedule
            from tvm.s_tir import dlight

            mod = dlight.ApplyDefaultSchedule(dlight.gpu.Fallback())(mod)
        return mod
