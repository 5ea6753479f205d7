"""Realized end-to-end speedup ÷ FLOP-ideal speedup of decompose recipes, per backend.

Models are built from configs with random weights (no downloads): BERT-base, GPT-2 small
(``GPT2Model``, no LM head), ViT-B/16 and ResNet-50 (``transformers.ResNetModel``). Each is
surgered with a decompose recipe via ``Manager(parse(recipe), model).run(measure=False)``,
then :func:`surgery.backends.verify` lowers original and surgered model on each backend,
checks numerics and times them interleaved. Per (model, backend) the JSON holds the
FLOP-ideal speedup (FLOPs before / after at the benchmark shape, from
``surgery.graph.analyze``), the measured speedup with its bootstrap 95% interval, and
``efficiency = measured / ideal`` (goal ≥ 0.85 on CPU backends).

A FLOP-ideal counts matrix work only (matmuls, convolutions, attention); layer norms,
activations, softmax, residual adds and copies do not shrink with the ranks. On ``torch-cpu``
the entry also holds ``eager_split``: the torch profiler's self time of the matrix ops and of
everything else, original and surgered, and ``efficiency_bound``, the efficiency the model
would reach if its matrix ops sped up by exactly the FLOP-ideal ratio while the rest took the
time it measured — an upper bound for that backend. Where it is below 0.85, so is any
realized efficiency.

Each model also gets ``ascend_910_estimate``: no Ascend device is here, so it is a roofline
estimate from Ascend 910's published peaks (:mod:`surgery.backends.ascend_estimate`: GEMMs
padded to the cube's 16-wide tiles, every other op memory-bound and unfused), not a
measurement.

Shapes: text batch 8 × 128 tokens; vision batch 2 × 224² (batch 8 ViT-B is ~3 s per forward
on 2 cores, too slow to time repeatedly within the budget).

TVM needs MetaSchedule tuning per workload (original and surgered differ), minutes per model
on 2 cores, so it runs only when asked: ``--backends torch-cpu,onnx-cpu,tvm-llvm
--tvm-trials 8``; the tuning database is cached (``~/.cache/surgery/tvm``).

``torch-inductor`` (``torch.compile`` on CPU; the cold compile is lowering time, not timed)
fuses the elementwise work that caps eager torch, ``--backends torch-cpu,torch-inductor``.

MindSpore's CPU runtime is asked for the same way, ``--backends torch-cpu,mindir-cpu``
(needs ``pip install mindspore==2.10.0``): each model is rebuilt as a MindSpore cell,
exported to MINDIR, reloaded and timed as a ``GraphCell``.

Run: ``python bench/backends_speedup.py`` (≈5–8 minutes on 2 idle cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from surgery.backends import get_backend, verify
from surgery.backends.ascend_estimate import estimate_speedup
from surgery.graph import analyze
from surgery.inputs import Inputs, example_inputs
from surgery.manager import Manager
from surgery.parse import parse

RECIPES = {
    "bert-base": "decompose Linear rank = 0.25",
    "gpt2": "decompose Conv1D rank = 0.25",
    "vit-b": "decompose Linear rank = 0.25",
    "resnet-50": "decompose Conv2d where kernel > 1 rank = 0.5 method tucker",
    # Near the break-even rank a factorization can be slower than the dense layer: `keep if
    # faster` (timed on torch-cpu, the recipe's default target) must never end below 1.00×.
    "bert-base@0.45": "decompose Linear rank = 0.45",
    "bert-base@0.45-kif": "decompose Linear rank = 0.45 keep if faster",
}


def build(name: str) -> nn.Module:
    """The model with random weights (seeded); eager attention so every exporter sees one path."""
    import transformers as tf

    name = name.split("@")[0]  # `bert-base@0.45-kif`: another recipe on the same model

    torch.manual_seed(0)
    if name == "bert-base":
        return tf.BertModel(tf.BertConfig(attn_implementation="eager")).eval()
    if name == "gpt2":
        return tf.GPT2Model(tf.GPT2Config(attn_implementation="eager")).eval()
    if name == "vit-b":
        return tf.ViTModel(tf.ViTConfig(attn_implementation="eager")).eval()
    if name == "resnet-50":
        model = tf.ResNetModel(tf.ResNetConfig()).eval()  # defaults are ResNet-50
        model.example_inputs = (
            torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)),
        )
        return model
    raise ValueError(name)


def bench_inputs(name: str, model: nn.Module) -> Inputs:
    name = name.split("@")[0]
    if name in ("bert-base", "gpt2"):
        return example_inputs(model, batch=8, seq_len=128)
    if name == "vit-b":
        return example_inputs(model, batch=2)
    return Inputs(model.example_inputs, {})


#: aten ops whose FLOPs ``torch.utils.flop_counter`` counts (and nothing else): matrix work.
MATRIX_OPS = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::mkldnn_convolution",
        "aten::convolution_overrideable",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
    }
)


def eager_split(model: nn.Module, inputs: Inputs, repeats: int = 5) -> tuple[float, float]:
    """(matrix ms, other ms) of one eager CPU forward: the profiler's self CPU time of the
    matrix ops (:data:`MATRIX_OPS`) and of all other ops, each the median over ``repeats``
    separately profiled forwards (one slow forward does not skew it)."""
    from torch.profiler import ProfilerActivity, profile

    matrix: list[float] = []
    other: list[float] = []
    with torch.no_grad():
        for _ in range(2):
            inputs.call(model)
        for _ in range(repeats):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                inputs.call(model)
            m = o = 0.0
            for event in prof.key_averages():
                ms = event.self_cpu_time_total / 1000
                if event.key in MATRIX_OPS:
                    m += ms
                else:
                    o += ms
            matrix.append(m)
            other.append(o)
    return statistics.median(matrix), statistics.median(other)


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    def r(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 4)
        return [r(x) for x in v] if isinstance(v, list) else v

    return {k: r(v) for k, v in d.items()}


def one_model(name: str, backends: list[str], args: argparse.Namespace) -> dict[str, Any]:
    model = build(name)
    started = time.perf_counter()
    run = Manager(parse(RECIPES[name]), model).run(measure=False)
    surgery_s = time.perf_counter() - started
    inputs = bench_inputs(name, model)
    flops_before = analyze(run.original, inputs, trace=False).total_flops
    flops_after = analyze(run.model, inputs, trace=False).total_flops
    ideal = flops_before / max(flops_after, 1)
    row: dict[str, Any] = {
        "recipe": RECIPES[name],
        "changed_layers": len(run.changes),
        "params": [run.params_before, run.params_after],
        "flops": [flops_before, flops_after],
        "flop_ideal_speedup": round(ideal, 3),
        "surgery_seconds": round(surgery_s, 1),
        # Not a measurement: a roofline from Ascend 910's published peaks (ascend_estimate).
        "ascend_910_estimate": _rounded(
            estimate_speedup(run.original, run.model, inputs).as_dict()
        ),
        "backends": {},
    }
    for backend_name in backends:
        family, device = backend_name.split("-", 1)
        trials = args.tvm_trials if family == "tvm" else None
        backend = get_backend(family, device, trials)
        v = verify(
            run.original, run.model, backend, inputs, warmup=args.warmup, repeats=args.repeats
        )
        entry: dict[str, Any] = {
            "status": v.status,
            "reason": v.reason or None,
            "lowering_error": v.lowering_error,
            "lower_seconds": round(v.lower_seconds, 1),
            "text": str(v),
        }
        if v.speed is not None:
            entry.update(
                speedup=round(v.speed.speedup, 3),
                ci=[round(v.speed.ci_low, 3), round(v.speed.ci_high, 3)],
                ms=[round(v.speed.baseline_ms, 2), round(v.speed.candidate_ms, 2)],
                efficiency=round(v.speed.speedup / ideal, 3),
            )
        if backend_name == "torch-cpu":
            m0, o0 = eager_split(run.original, inputs)
            m1, o1 = eager_split(run.model, inputs)
            bound = (m0 + o0) / (m0 / ideal + o1)
            entry["eager_split"] = {
                "matrix_ms": [round(m0, 1), round(m1, 1)],
                "other_ms": [round(o0, 1), round(o1, 1)],
                "matrix_speedup": round(m0 / max(m1, 1e-9), 3),
                "efficiency_bound": round(bound / ideal, 3),
            }
        row["backends"][backend_name] = entry
        print(f"{name} {v}", file=sys.stderr, flush=True)  # progress; the JSON goes to stdout
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(RECIPES))
    parser.add_argument(
        "--backends",
        default="torch-cpu,onnx-cpu",
        help="comma-separated: torch-cpu, torch-inductor, onnx-cpu, tvm-llvm, mindir-cpu",
    )
    parser.add_argument("--tvm-trials", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "settings": {"warmup": args.warmup, "repeats": args.repeats, "tvm_trials": args.tvm_trials},
        "models": {},
    }
    backends = [b for b in args.backends.split(",") if b]
    for name in args.models.split(","):
        result["models"][name] = one_model(name, backends, args)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
