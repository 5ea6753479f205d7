"""Benchmark: 2:4 `SparseLinear` (dense-masked) vs dense `Linear`, CPU (and CUDA if present).

Prints one JSON object. On CPU the sparse layer runs ``W ⊙ mask`` then a dense GEMM, so it is
expected to be no faster (slightly slower: the mask multiply). With CUDA (sm ≥ 8.0) it also
times fp16 dense vs ``to_sparse_semi_structured`` kernels, the only place 2:4 can pay off.

    python bench/sparsity.py                       # 4096×4096, tokens 32×128
    python bench/sparsity.py --features 1024 --tokens 1024
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from surgery.modules.sparse import SparseLinear, semi_structured_available


def timed(
    fn: Callable[[], torch.Tensor], warmup: int, repeats: int, sync: Callable[[], None]
) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {
        "median_ms": round(1e3 * statistics.median(times), 3),
        "min_ms": round(1e3 * min(times), 3),
        "max_ms": round(1e3 * max(times), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=32 * 128)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    f = args.features
    dense = nn.Linear(f, f).eval()
    sparse = SparseLinear.from_linear(dense, 2, 4).eval()
    x = torch.randn(args.tokens, f)
    report: dict[str, object] = {
        "benchmark": "sparse_2of4_linear",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": {"in": f, "out": f, "tokens": args.tokens},
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    with torch.no_grad():
        cpu = {
            "dense_linear": timed(lambda: dense(x), args.warmup, args.repeats, lambda: None),
            "sparse_linear_dense_masked": timed(
                lambda: sparse(x), args.warmup, args.repeats, lambda: None
            ),
        }
    cpu["speedup_sparse_vs_dense"] = round(  # type: ignore[assignment]
        cpu["dense_linear"]["median_ms"] / cpu["sparse_linear_dense_masked"]["median_ms"], 3
    )
    report["cpu"] = cpu
    if torch.cuda.is_available():
        sync = torch.cuda.synchronize
        cuda: dict[str, object] = {"device": torch.cuda.get_device_name()}
        d16 = nn.Linear(f, f).half().cuda().eval()
        s16 = SparseLinear.from_linear(d16, 2, 4).eval()
        xc = x.half().cuda()
        reps = max(args.repeats, 50)
        with torch.no_grad():
            cuda["dense_fp16"] = timed(lambda: d16(xc), 5, reps, sync)
            cuda["sparse_dense_masked_fp16"] = timed(lambda: s16(xc), 5, reps, sync)
            if semi_structured_available():
                try:
                    fast = s16.to_semi_structured()
                    cuda["semi_structured_fp16"] = timed(lambda: fast(xc), 5, reps, sync)
                    cuda["max_abs_diff_semi_vs_masked"] = float((fast(xc) - s16(xc)).abs().max())
                    cuda["speedup_semi_vs_dense"] = round(
                        cuda["dense_fp16"]["median_ms"] / cuda["semi_structured_fp16"]["median_ms"],
                        3,  # type: ignore[index]
                    )
                except Exception as exc:  # report, never hide, a failing conversion
                    cuda["semi_structured_error"] = f"{type(exc).__name__}: {exc}"
            else:
                cuda["semi_structured_error"] = "not available (needs sm >= 8.0)"
        report["cuda"] = cuda
    else:
        report["cuda"] = None
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
