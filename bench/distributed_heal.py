"""Benchmark: healing on 1 vs 2 gloo processes under torchrun (DDP and FSDP2), CPU.

Runs ``tests/distributed_worker.py`` (a distillation loop with the trainer's ``Parallel``
semantics: one global batch per step, split equally over the ranks) through
``torchrun --standalone`` for each (world, mode): steps/s (median step time, the first step
excluded as warm-up), the loss curve and its largest difference from the one-process curve,
then the time to save the sharded checkpoint (``torch.distributed.checkpoint``) at the end and
to load it again in a fresh launch of the same world (and the loss of one step after the
load). Each process runs one intra-op thread by default (``--threads share`` gives each
``cpus // world``). Prints one JSON object.

    python bench/distributed_heal.py                 # hidden 256, 4 blocks, 20 steps
    python bench/distributed_heal.py --hidden 512 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"


def launch(world: int, threads: int, args: list[str]) -> float:
    """Run the worker on ``world`` processes; the launch's wall time."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={world}", str(WORKER), *args]
    started = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        sys.exit(f"worker failed (world {world}): {r.stderr[-4000:]}")
    return time.perf_counter() - started


def run(
    world: int, mode: str, config: dict[str, Any], steps: int, threads: int, tmp: Path
) -> dict[str, Any]:
    ckpt = tmp / f"{mode}-{world}"
    trained, resumed = tmp / f"{mode}-{world}-train.json", tmp / f"{mode}-{world}-resume.json"
    base = ["--mode", mode, "--config", json.dumps(config)]
    launch_s = launch(
        world,
        threads,
        [*base, "--save-at", str(steps), "--save-dir", str(ckpt), "--out", str(trained)],
    )
    # Resume in a fresh launch and take one more step (a load that restored nothing would
    # show in that step's loss, which the JSON reports).
    launch(
        world,
        threads,
        [*base, "--steps", str(steps + 1), "--resume", str(ckpt), "--out", str(resumed)],
    )
    first, second = json.loads(trained.read_text()), json.loads(resumed.read_text())
    step_s = first["step_seconds"][1:] or first["step_seconds"]
    return {
        "world": world,
        "mode": mode,
        "parameters": first["parameters"],
        "threads_per_process": threads,
        "steps_per_s": round(1.0 / statistics.median(step_s), 2),
        "median_step_ms": round(1e3 * statistics.median(step_s), 2),
        "launch_and_train_s": round(launch_s, 2),
        "checkpoint_save_s": round(first["save_seconds"], 3),
        "checkpoint_load_s": round(second["load_seconds"], 3),
        "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.iterdir()),
        "checkpoint_files": sorted(f.name for f in ckpt.iterdir()),
        "losses": first["losses"],
        "loss_after_resume": second["losses"][0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32, help="global batch (examples per step)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--threads",
        default="1",
        help="intra-op threads per process: a number, or `share` for cpus // world (on a "
        "loaded machine more threads than free cores slow a step down many times over)",
    )
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    config = {
        "features": 64,
        "hidden": args.hidden,
        "layers": args.layers,
        "outputs": 64,
        "examples": 16 * args.batch,
        "batch": args.batch,
        "lr": 1e-3,
    }
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("ddp", "fsdp2"):
            for world in (1, 2):
                threads = max(1, cpus // world) if args.threads == "share" else int(args.threads)
                runs.append(run(world, mode, config, args.steps, threads, Path(tmp)))
    one = {r["mode"]: r["losses"] for r in runs if r["world"] == 1}
    for r in runs:
        r["max_loss_diff_vs_1_process"] = max(
            abs(a - b) for a, b in zip(r["losses"], one[r["mode"]], strict=True)
        )
        r["losses"] = [round(x, 6) for x in r["losses"]]
    after = [r["loss_after_resume"] for r in runs]
    report = {
        "benchmark": "distributed_heal",
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "backend": "gloo",
        "config": config,
        "parameters": runs[0]["parameters"],
        "steps": args.steps,
        "runs": runs,
        # Every run resumes to the same next global batch: the spread of that loss over runs.
        "loss_after_resume_spread": max(after) - min(after),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
