"""Golden plans: a recipe on a Hugging Face architecture built from a config → its plan.

The golden is the JSON plan (`surgery plan --format json`) without the measured parts
(drift, timing), with floats rounded so they are stable, in
``tests/golden/plans/<case>.plan.json``. Regenerate with ``pytest --update-golden``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from surgery.manager import Manager
from surgery.parse import parse
from surgery.report import plan_dict
from tests.helpers_models import (
    arch_albert,
    arch_bart,
    arch_bloom,
    arch_clip_vision,
    arch_convnext,
    arch_distilbert,
    arch_falcon,
    arch_gpt_neox,
    arch_phi3,
    arch_swin,
    arch_t5_encoder,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_vit,
)

CASES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "bert": (
        tiny_bert,
        'decompose Linear where name ~ "encoder.*" and out_features >= 64 rank = 0.25\n'
        "group kv = 1\n",
    ),
    "gpt2": (
        tiny_gpt2,
        'decompose Conv1D where name ~ "*.mlp.*" rank = 0.25\ngroup kv = 1\n'
        "truncate blocks keep 1 uniform\n",
    ),
    "vit": (
        tiny_vit,
        "skip tokens 50% after block 0\n"
        'decompose Linear where name ~ "*.intermediate.dense" rank = 0.25\n',
    ),
    "llama": (
        tiny_llama,
        'decompose Linear where name ~ "*.mlp.*" rank = 0.25\ngroup kv = 1\n',
    ),
    # Families whose attention, blocks and stages come from the graph patterns (issue 16).
    "distilbert": (arch_distilbert, "group kv = 2\ndrop attention 1 by similarity\n"),
    "albert": (arch_albert, "group kv = 1\ntruncate blocks keep 2 uniform\n"),
    "bart": (arch_bart, "group kv = 2\ntruncate blocks keep 2 pseudo-uniform\n"),
    "t5-encoder": (arch_t5_encoder, "group kv = 2\ntruncate blocks keep 2 uniform\n"),
    "gpt-neox": (arch_gpt_neox, "group kv = 2\ndrop attention 1 by similarity\n"),
    "bloom": (arch_bloom, "group kv = 1\n"),
    "falcon": (arch_falcon, "group q = 2 kv = 1\n"),
    "phi3": (arch_phi3, "group kv = 2\ntruncate blocks keep 2 uniform\n"),
    "clip-vision": (arch_clip_vision, "group kv = 2\nskip tokens 50% after block 1\n"),
    "swin": (arch_swin, "truncate blocks keep 3 uniform\n"),
    "convnext": (arch_convnext, "truncate blocks keep 3 pseudo-uniform\n"),
}


def _stable(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def golden_plan(build: Callable[[], nn.Module], recipe: str) -> str:
    run = Manager(parse(recipe), build()).run(measure=False)
    plan = plan_dict(run, recipe="recipe.surg", model=build.__name__)
    for key in ("drift", "speed", "warnings"):
        plan.pop(key)
    for step in plan["steps"]:
        step.pop("drift")
        step.pop("seconds")
    return json.dumps(_stable(plan), indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_matches_golden(name: str, golden: Callable[[str, str], None]) -> None:
    build, recipe = CASES[name]
    golden(f"plans/{name}.plan.json", golden_plan(build, recipe))


def test_no_orphan_plan_goldens() -> None:
    plans = Path(__file__).parent / "golden" / "plans"
    names = [p.name for p in plans.iterdir() if p.name.removesuffix(".plan.json") not in CASES]
    assert sorted(names) == []
