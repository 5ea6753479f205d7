"""Training-time claims of the seed papers, measured here: samples/s and held-out loss while
*training*, side by side in one run. Prints one JSON object.

Models (built from configs, random weights, CPU eager, fp32):

* ``vit-s``: ViT-S/16 shape (hidden 384, 12 blocks, 6 heads, MLP 1536, 224² images → 197 tokens),
  a 10-way classification head.
* ``bert-base``: BERT-base shape (hidden 768, 12 blocks, 12 heads, MLP 3072), sequences of
  ``--seq`` tokens, a 4-way classification head.

The task is supervised and learnable: labels are the argmax of a *teacher* of the same
architecture with other random weights, on seeded random inputs (images: Gaussian pixels;
text: uniform token ids). Every variant starts from the same student weights and trains with
AdamW (lr 1e-4, no decay) on the same batches; the held-out loss is the cross-entropy on
``--heldout`` examples the training never sees, after the last step.

Variants, each one line of the recipe language applied by the library's passes:

* ``original``: the model as built.
* ``lowrank``: ``decompose Linear where name ~ "*layer*" rank = 0.25`` (rank optimisation:
  the seeds report faster training of the factored model).
* ``lowrank+freeze``: the same, with ``freeze first-factor`` (sequential freezing: the first
  factor of every pair gets no gradient and no optimiser state; the seed reports up to +60%
  training throughput combined with rank optimisation).
* ``skip`` (ViT only): ``skip tokens 55% after block 3`` while training (SkipViT reports +13%
  training throughput at equal accuracy on ViT-S).
* ``swiftlearn`` (BERT only): end-to-end time of ``--epochs`` epochs over a training set of
  ``--train`` examples, against a run whose epochs after the first use only the 10% most
  important examples (importance: how much each example's loss moved over the first epoch;
  SwiftLearn reports 3.36× end to end with 90% of the data dropped on BERT fine-tuning).

Each step is split into forward, backward and optimiser time (``perf_counter`` around each
phase), so where this machine shows less than a paper, the split says which phase did not
shrink. Samples/s are the median over the timed steps (after ``--warmup`` untimed ones).

Run: ``python bench/train_speed.py`` (about 10 minutes on 2 idle cores; ``--quick`` for a
smoke run of a minute).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import Tensor, nn

from surgery.graph import analyze
from surgery.heal import frozen_names
from surgery.inputs import Inputs
from surgery.parse import parse
from surgery.passes import pass_for
from surgery.passes.base import PassContext

LR = 1e-4


def build(kind: str, seed: int, layers: int, image: int, seq: int) -> nn.Module:
    """A classification model of the named shape with seeded random weights."""
    torch.manual_seed(seed)
    if kind == "vit-s":
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(
            hidden_size=384,
            num_hidden_layers=layers,
            num_attention_heads=6,
            intermediate_size=1536,
            image_size=image,
            patch_size=16,
            num_labels=10,
        )
        return ViTForImageClassification(cfg).eval()
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(num_hidden_layers=layers, num_labels=4, max_position_embeddings=max(512, seq))
    return BertForSequenceClassification(cfg).eval()


def make_inputs(kind: str, n: int, seed: int, image: int, seq: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "vit-s":
        return {"pixel_values": torch.randn(n, 3, image, image, generator=g)}
    return {
        "input_ids": torch.randint(1000, 30000, (n, seq), generator=g),
        "attention_mask": torch.ones(n, seq, dtype=torch.long),
    }


def rows(batch: dict[str, Tensor], index: list[int]) -> dict[str, Tensor]:
    return {k: v[index] for k, v in batch.items()}


@torch.no_grad()
def labels_of(teacher: nn.Module, data: dict[str, Tensor], chunk: int = 16) -> Tensor:
    n = next(iter(data.values())).shape[0]
    out = [
        teacher(**rows(data, list(range(i, min(n, i + chunk))))).logits.argmax(-1)
        for i in range(0, n, chunk)
    ]
    return torch.cat(out)


@torch.no_grad()
def heldout_loss(
    model: nn.Module, data: dict[str, Tensor], labels: Tensor, chunk: int = 16
) -> float:
    model.eval()
    n = labels.shape[0]
    total = 0.0
    for i in range(0, n, chunk):
        idx = list(range(i, min(n, i + chunk)))
        logits = model(**rows(data, idx)).logits
        total += float(nn.functional.cross_entropy(logits, labels[idx], reduction="sum"))
    return total / n


def surgered(model: nn.Module, lines: list[str], example: dict[str, Tensor]) -> nn.Module:
    """``model`` with each recipe line applied by its pass (a deep copy; the input is kept)."""
    model = copy.deepcopy(model)
    ins = Inputs((), dict(example))
    for line in lines:
        stmt = parse(line).statements[0]
        ctx = PassContext(analysis=analyze(model, ins), example=ins, calibration=[ins])
        p = pass_for(stmt, ctx)
        p.apply(model, p.plan(model))
    return model


class Timer:
    """Per-phase wall time of training steps."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def summary(self, batch: int) -> dict[str, float]:
        totals = [sum(s.values()) for s in self.steps]
        out = {"samples_per_s": batch / statistics.median(totals)}
        for phase in ("forward", "backward", "optimizer"):
            out[f"{phase}_ms"] = 1000 * statistics.median(s[phase] for s in self.steps)
        return out


def train_steps(
    model: nn.Module,
    batches: list[list[int]],
    data: dict[str, Tensor],
    labels: Tensor,
    freeze: str | None,
    warmup: int,
) -> tuple[Timer, list[float]]:
    """Train on ``batches`` (example indices); time every step after the first ``warmup``."""
    fixed = frozen_names(model, freeze)
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n not in fixed)
        if n not in fixed:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    timer = Timer()
    losses: list[float] = []
    for step, idx in enumerate(batches):
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(**rows(data, idx)).logits, labels[idx])
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        losses.append(float(loss.detach()))
        if step >= warmup:
            timer.steps.append({"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2})
    model.eval()
    return timer, losses


def per_example_loss(model: nn.Module, data: dict[str, Tensor], labels: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad():
        out = []
        n = labels.shape[0]
        for i in range(0, n, 16):
            idx = list(range(i, min(n, i + 16)))
            logits = model(**rows(data, idx)).logits
            out.append(nn.functional.cross_entropy(logits, labels[idx], reduction="none"))
    return torch.cat(out)


def batches_of(order: list[int], batch: int) -> list[list[int]]:
    return [order[i : i + batch] for i in range(0, len(order), batch) if order[i : i + batch]]


def swiftlearn(
    student: nn.Module, data: dict[str, Tensor], labels: Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    """Full data for ``epochs`` epochs vs. SwiftLearn (epoch 1 full, then the top 10% by the
    change of each example's loss over epoch 1), end to end, scoring time included."""
    n = labels.shape[0] - args.heldout
    train = list(range(n))
    held = list(range(n, labels.shape[0]))
    held_data, held_labels = rows(data, held), labels[held]
    results: dict[str, Any] = {}

    def epochs(model: nn.Module, subset_after_first: bool) -> tuple[float, int, float]:
        g = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        steps = 0
        before = (
            per_example_loss(model, rows(data, train), labels[train])
            if subset_after_first
            else None
        )
        keep = train
        for epoch in range(args.epochs):
            order = [keep[i] for i in torch.randperm(len(keep), generator=g).tolist()]
            _, losses = train_steps(model, batches_of(order, args.batch), data, labels, None, 0)
            steps += len(losses)
            if subset_after_first and epoch == 0:
                assert before is not None
                after = per_example_loss(model, rows(data, train), labels[train])
                count = max(1, math.ceil(0.10 * len(train)))
                top = torch.argsort((after - before).abs(), descending=True)[:count]
                keep = sorted(train[i] for i in top.tolist())
        seconds = time.perf_counter() - started
        return seconds, steps, heldout_loss(model, held_data, held_labels)

    for name, subset in (("full-data", False), ("swiftlearn-10%", True)):
        seconds, steps, loss = epochs(copy.deepcopy(student), subset)
        results[name] = {
            "seconds": round(seconds, 2),
            "steps": steps,
            "heldout_loss": round(loss, 4),
        }
    full, swift = results["full-data"], results["swiftlearn-10%"]
    results["end_to_end_speedup"] = round(full["seconds"] / swift["seconds"], 3)
    results["seed_claim"] = "3.36x end to end, 90% of the data dropped (BERT, GLUE)"
    return results


def bench_model(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    layers = args.layers
    student = build(kind, 0, layers, args.image, args.seq)
    teacher = build(kind, 1, layers, args.image, args.seq)
    total = args.batch * (args.steps + args.warmup)
    data = make_inputs(kind, total + args.heldout, 2, args.image, args.seq)
    labels = labels_of(teacher, data)
    held = list(range(total, total + args.heldout))
    held_data, held_labels = rows(data, held), labels[held]
    g = torch.Generator().manual_seed(3)
    order = torch.randperm(total, generator=g).tolist()
    batches = batches_of(order, args.batch)
    example = rows(data, order[: args.batch])

    lowrank = 'decompose Linear where name ~ "*layer*" rank = 0.25'
    variants: dict[str, tuple[list[str], str | None, str]] = {
        "original": ([], None, ""),
        "lowrank": ([lowrank], None, "rank optimisation: faster training of the factored model"),
        "lowrank+freeze": (
            [lowrank],
            "first-factor",
            "up to +60% training throughput (rank optimisation + sequential freezing)",
        ),
    }
    if kind == "vit-s":
        variants["skip"] = (
            ["skip tokens 55% after block 3"],
            None,
            "+13% training throughput at equal accuracy (SkipViT, ViT-S)",
        )
    out: dict[str, Any] = {
        "shape": {"layers": layers, "batch": args.batch, "steps": args.steps, "warmup": args.warmup}
        | ({"image": args.image} if kind == "vit-s" else {"seq": args.seq}),
        "variants": {},
    }
    base: float | None = None
    for name, (lines, freeze, claim) in variants.items():
        model = surgered(student, lines, example) if lines else copy.deepcopy(student)
        params = sum(p.numel() for p in model.parameters())
        timer, losses = train_steps(model, batches, data, labels, freeze, args.warmup)
        row: dict[str, Any] = timer.summary(args.batch)
        row |= {
            "params": params,
            "first_loss": round(losses[0], 4),
            "last_loss": round(losses[-1], 4),
            "heldout_loss": round(heldout_loss(model, held_data, held_labels), 4),
        }
        if base is None:
            base = row["samples_per_s"]
        row["throughput_vs_original"] = round(row["samples_per_s"] / base, 3)
        row["samples_per_s"] = round(row["samples_per_s"], 3)
        for k in ("forward_ms", "backward_ms", "optimizer_ms"):
            row[k] = round(row[k], 1)
        if claim:
            row["seed_claim"] = claim
        out["variants"][name] = row
    if kind == "bert-base" and args.epochs > 0:
        n = args.train + args.heldout
        sdata = make_inputs(kind, n, 4, args.image, args.seq)
        out["swiftlearn"] = swiftlearn(student, sdata, labels_of(teacher, sdata), args)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit-s,bert-base")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--train", type=int, default=80, help="SwiftLearn training-set size")
    ap.add_argument("--epochs", type=int, default=3, help="SwiftLearn epochs (0: skip it)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="6 blocks, 3 steps, small SwiftLearn")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.steps, args.warmup, args.train, args.heldout = 6, 3, 1, 32, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "train_speed",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
    }
    runners: dict[str, Callable[[str, argparse.Namespace], dict[str, Any]]] = {
        "vit-s": bench_model,
        "bert-base": bench_model,
    }
    for kind in args.models.split(","):
        result[kind] = runners[kind](kind, args)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
