"""Benchmark: Conv3d vs its 4D-only rewrites (exact and (2+1)D) on a video-shaped input, CPU.

Prints one JSON object: per variant the median / min / max wall time of ``repeats`` timed
forwards (after ``warmup`` untimed ones), parameters, and the max abs difference to Conv3d.

    python bench/conv3d.py                      # (2, 64, 16, 56, 56), 3×3×3, 64→64
    python bench/conv3d.py --size 28 --repeats 3
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

from surgery.modules.conv3d import Conv2Plus1d, Conv3dAs2d


def timed(fn: Callable[[], torch.Tensor], warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {
        "median_ms": round(1e3 * statistics.median(times), 2),
        "min_ms": round(1e3 * min(times), 2),
        "max_ms": round(1e3 * max(times), 2),
    }


def default_rank(conv: nn.Conv3d, combine: str) -> int:
    """The largest rank with fewer parameters than ``conv`` (what `split ... (2+1)d` picks)."""
    before = sum(p.numel() for p in conv.parameters())
    kt, kh, kw = conv.kernel_size
    for r in range(Conv2Plus1d.full_rank(conv), 0, -1):
        n = Conv2Plus1d.param_count(
            conv.in_channels,
            conv.out_channels,
            r,
            (kt, kh, kw),
            combine,
            conv.bias is not None,  # type: ignore[arg-type]
        )
        if n < before:
            return r
    return 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--kernel", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    c, k = args.channels, args.kernel
    conv = nn.Conv3d(c, c, k, padding=k // 2).eval()
    x = torch.randn(args.batch, c, args.frames, args.size, args.size)
    variants: dict[str, nn.Module] = {
        "conv3d": conv,
        "exact_stack": Conv3dAs2d.from_conv(conv, taps="stack"),
        "exact_sum": Conv3dAs2d.from_conv(conv, taps="sum"),
    }
    for combine in ("add", "cat"):
        variants[f"2plus1d_{combine}"] = Conv2Plus1d.from_conv(
            conv,
            rank=default_rank(conv, combine),
            combine=combine,  # type: ignore[arg-type]
        )
    variants["2plus1d_add_rank_half_params"] = Conv2Plus1d.from_conv(
        conv, rank=default_rank(conv, "add") // 2, combine="add"
    )
    results: dict[str, dict[str, object]] = {}
    with torch.no_grad():
        ref = conv(x)
        for name, module in variants.items():
            module.eval()
            out = module(x)
            entry: dict[str, object] = dict(timed(lambda m=module: m(x), args.warmup, args.repeats))
            entry["params"] = sum(p.numel() for p in module.parameters())
            entry["max_abs_diff_vs_conv3d"] = float((out - ref).abs().max())
            entry["rel_err_vs_conv3d"] = float((out - ref).norm() / ref.norm())
            if isinstance(module, Conv2Plus1d):
                entry["rank"] = module.rank
            results[name] = entry
    base = float(results["conv3d"]["median_ms"])  # type: ignore[arg-type]
    for entry in results.values():
        entry["speedup_vs_conv3d"] = round(base / float(entry["median_ms"]), 3)  # type: ignore[arg-type]
    print(
        json.dumps(
            {
                "benchmark": "conv3d_4d_rewrites",
                "device": "cpu",
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "threads": args.threads,
                "input": list(x.shape),
                "kernel": [k, k, k],
                "warmup": args.warmup,
                "repeats": args.repeats,
                "note": "(2+1)D is an approximation (random weights: large rel_err); exact_* must be ~0",
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
