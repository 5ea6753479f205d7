"""The recipe as a ``torch.compile`` backend: what compiling costs, and what the rewritten graph
runs at, eagerly and through inductor.

A 4-layer MLP (``--width``, default 1024; random weights) on ``--batch`` rows, with
``decompose Linear rank = 0.25``. For each way of running it the benchmark prints the compile
time (the first call, which traces, rewrites and compiles; inductor's on-disk cache is kept, so
a second run measures warm compiles) and the median latency of later calls:

* ``eager``: the model as it is;
* ``inductor``: ``torch.compile(model)`` (inductor, no surgery);
* ``surgery+eager``: ``compile_backend(recipe, compiler="eager")`` (the rewritten GraphModule);
* ``surgery+inductor``: ``compile_backend(recipe, compiler="inductor")``.

It also reports the parameters the rewritten graph computes with and the relative output
difference against the module path (``pass_for`` on a copy of the model), which should be 0
for the eager graph and float rounding for inductor.

Run: ``python bench/compile_backend.py`` (≈ 1–2 minutes on 2 cores with a warm inductor cache;
the first inductor compile on a machine can take a minute by itself).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from typing import Any

import torch
from torch import nn

from surgery.fx_surgery import compile_backend
from surgery.graph import analyze
from surgery.inputs import Inputs
from surgery.parse import parse
from surgery.passes import PassContext, pass_for

RECIPE = "decompose Linear rank = 0.25"


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers).eval()


def _latency(fn: Any, x: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    model = _model(args.width)
    x = torch.randn(args.batch, args.width)
    reference = copy.deepcopy(model)
    example = Inputs((x,), {})
    pass_for(parse(RECIPE).statements[0], PassContext(analysis=analyze(reference, example))).run(
        reference
    )
    with torch.no_grad():
        expected = reference(x)
    results: dict[str, Any] = {}
    ways: dict[str, Any] = {
        "eager": None,
        "inductor": "inductor",
        "surgery+eager": compile_backend(RECIPE, compiler="eager"),
        "surgery+inductor": compile_backend(RECIPE, compiler="inductor"),
    }
    for name, backend in ways.items():
        torch._dynamo.reset()
        fn = model if backend is None else torch.compile(model, backend=backend)
        t = time.perf_counter()
        with torch.no_grad():
            out = fn(x)
        first = time.perf_counter() - t
        row: dict[str, Any] = {
            "first_call_s": round(first, 3),
            "latency_ms": round(1e3 * _latency(fn, x, args.repeats), 3),
        }
        if name.startswith("surgery"):
            report = backend.reports[0]
            row["params_before"] = report.params_before
            row["params_after"] = report.params_after
            row["rel_diff_vs_module_path"] = float((out - expected).norm() / expected.norm())
        results[name] = row
    print(
        json.dumps(
            {
                "benchmark": "compile_backend",
                "recipe": RECIPE,
                "model": f"MLP 4×Linear({args.width}, {args.width})",
                "batch": args.batch,
                "torch": torch.__version__,
                "machine": platform.machine(),
                "threads": torch.get_num_threads(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
