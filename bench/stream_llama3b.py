"""Streamed surgery of a model larger than what it may use: a ~3B LLaMA-shaped model.

Builds a LLaMA-3.2-3B-shaped model (hidden 3072, MLP 8192, 28 blocks, 24 heads / 8 KV
heads, vocabulary 128256, tied embeddings: 3.21B parameters) from its config and writes it as
bfloat16 safetensors shards one tensor at a time (random weights, seeded; the model is never
whole in memory), then runs ``decompose Linear rank = 0.25`` with
:func:`surgery.stream.stream_apply` in a child process and reports the child's peak RSS
against the model's bytes (goal: ≤ 0.5×) and the wall time.

    python bench/stream_llama3b.py                # the full 28-block model
    python bench/stream_llama3b.py --layers 2     # a 2-block model of the same widths

The model goes under ``--dir`` (default ``/tmp/stream-llama3b``, reused when already there)
and the output under ``--dir``/``out``; both are removed afterwards unless ``--keep``. The
child's RSS is ``ru_maxrss`` of the child itself (interpreter, torch and transformers
included; ``baseline_rss_bytes`` is what they take before streaming starts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RECIPE = "decompose Linear rank = 0.25\n"
SHARD_BYTES = 2 << 30


def llama3b_config(layers: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=layers,
        num_attention_heads=24,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )


def generate(directory: Path, layers: int, seed: int = 0) -> dict[str, int]:
    """Write the model's config and bf16 shards, one tensor at a time; returns its sizes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = llama3b_config(layers)
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    seen: set[int] = set()
    names: list[tuple[str, tuple[int, ...]]] = []
    for name, t in meta.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied: saved once, as save_pretrained does
            continue
        seen.add(id(t))
        names.append((name, tuple(t.shape)))
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    sizes = [0]
    for name, shape in names:
        nbytes = 2 * int(torch.Size(shape).numel())
        if sizes[-1] and sizes[-1] + nbytes > SHARD_BYTES:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes
    shape_of = dict(names)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in shard:
            shape = shape_of[name]
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.empty(shape, dtype=torch.bfloat16)
                for rows in t.split(4096):  # float32 a block at a time
                    rows.copy_(torch.randn(rows.shape, generator=gen) * 0.02)
            tensors[name] = t
            weight_map[name] = file
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(str(directory))
    params = sum(int(torch.Size(s).numel()) for _, s in names)
    return {"params": params, "bytes": total, "shards": len(shards)}


CHILD = r"""
import json, resource, sys, time
import surgery
from surgery.stream import stream_apply
def hwm():  # this process's own peak RSS (ru_maxrss would include the parent's at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
base = hwm()
recipe = surgery.parse(sys.argv[3])
done = [0]
t = time.perf_counter()
def progress(what, i, n):
    if not what.startswith("line") or i % 20 == 0 or i == n:
        print(f"{time.perf_counter() - t:.1f}s {what} {i}/{n}", file=sys.stderr, flush=True)
run = stream_apply(recipe, sys.argv[1], sys.argv[2], recipe_source=sys.argv[3], progress=progress)
wall = time.perf_counter() - t
print(json.dumps({
    "wall_s": round(wall, 1),
    "peak_rss_bytes": hwm(),
    "baseline_rss_bytes": base,
    "params_before": run.params_before,
    "params_after": run.params_after,
    "changed": len(run.changes),
    "skipped": sum(1 for s in run.steps for r in s.plan.rows if r.action == "skip"),
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28, help="decoder blocks (28: ~3.2B)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/stream-llama3b"))
    parser.add_argument("--keep", action="store_true", help="keep the model and the output")
    args = parser.parse_args()
    model_dir = args.dir / f"model-{args.layers}"
    out = args.dir / f"out-{args.layers}"
    started = time.perf_counter()
    if (model_dir / "model.safetensors.index.json").is_file():
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        sizes = {"bytes": index["metadata"]["total_size"], "reused": True}
    else:  # in a child too, so that this process stays small
        code = "import sys, json; sys.path.insert(0, sys.argv[1]); import stream_llama3b as b; "
        code += "print(json.dumps(b.generate(__import__('pathlib').Path(sys.argv[2]), int(sys.argv[3]))))"
        made = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                str(Path(__file__).parent),
                str(model_dir),
                str(args.layers),
            ],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        sizes = json.loads(made.stdout.strip().splitlines()[-1])
    generated_s = time.perf_counter() - started
    if out.exists():
        shutil.rmtree(out)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(model_dir), str(out), RECIPE],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    out_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    model_bytes = int(sizes["bytes"])
    result = {
        "model": f"LLaMA-3.2-3B-shaped, {args.layers} blocks, bfloat16, random weights",
        "recipe": RECIPE.strip(),
        "model_bytes": model_bytes,
        **measured,
        "peak_rss_over_model": round(measured["peak_rss_bytes"] / model_bytes, 3),
        "goal_peak_rss_over_model": 0.5,
        "output_bytes": out_bytes,
        "generate_s": round(generated_s, 1),
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
