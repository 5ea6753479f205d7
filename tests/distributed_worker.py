"""A minimal healing loop with the trainer's ``Parallel`` semantics, run by
``tests/test_distributed.py`` and ``bench/distributed_heal.py`` under ``torchrun`` (and
in-process, as the one-process reference).

Per optimizer step: global batch ``step`` is examples ``[(step·B + j) mod N for j < B]``;
each rank takes its ``parallel.shard`` of it, computes the mean distillation loss (squared
error to a fixed teacher's outputs) over its shard, backward (DDP averages the gradients over
ranks; FSDP2 reduce-scatters their mean), clips the gradient norm at 1.0 and takes an AdamW
step. The logged loss is ``parallel.all_mean`` of the per-rank means: the global batch's mean.

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py --mode fsdp2 --out r.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn


class Block(nn.Module):
    """A pre-norm residual MLP block: the repeated unit FSDP2 shards one by one."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:  # (B, H) -> (B, H)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class TinyNet(nn.Module):
    def __init__(self, features: int, hidden: int, layers: int, outputs: int) -> None:
        super().__init__()
        self.embed = nn.Linear(features, hidden)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:  # (B, F) -> (B, O)
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def build(config: dict[str, Any], seed: int) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(config["features"], config["hidden"], config["layers"], config["outputs"])


def dataset(config: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Inputs and the teacher's outputs (a model of the same shape, another seed)."""
    teacher = build(config, seed=1)
    torch.manual_seed(2)
    x = torch.randn(config["examples"], config["features"])
    with torch.no_grad():
        y = teacher(x)
    return x, y


class SingleProcess:
    """The one-process reference: the whole global batch on one rank."""

    rank = 0
    world = 1
    is_writer = True

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def shard(self, indices: Sequence[int]) -> list[int]:
        return list(indices)

    def all_mean(self, value: float) -> float:
        return value


def global_batch(step: int, size: int, examples: int) -> list[int]:
    return [(step * size + j) % examples for j in range(size)]


def train_steps(
    parallel: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[Tensor, Tensor],
    *,
    first: int,
    last: int,
    batch: int,
    seconds: list[float] | None = None,
) -> list[float]:
    """Steps ``first .. last-1``; the global-batch mean loss of each (and, into ``seconds``,
    the wall time of each)."""
    x, y = data
    losses = []
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(first, last):
        started = time.perf_counter()
        local = parallel.shard(global_batch(step, batch, len(x)))
        xb, yb = x[local].to(_device(parallel)), y[local].to(_device(parallel))
        loss = (model(xb) - yb).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(parallel.all_mean(float(loss.detach())))
        if seconds is not None:
            seconds.append(time.perf_counter() - started)
    return losses


def _device(parallel: Any) -> torch.device:
    return getattr(parallel, "device", torch.device("cpu"))


def reference(
    config: dict[str, Any], steps: Sequence[int]
) -> tuple[list[float], dict[int, dict[str, Tensor]]]:
    """The one-process run to ``max(steps)``: its losses, and its weights after each of
    ``steps`` steps."""
    model = build(config, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=0.0)
    data, losses, weights = dataset(config), [], {}
    for first, last in zip([0, *sorted(steps)], sorted(steps)):
        losses += train_steps(
            SingleProcess(), model, optimizer, data, first=first, last=last, batch=config["batch"]
        )
        weights[last] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return losses, weights


def _audit(root: Path) -> list[list[str]]:
    """Record every file this process opens for writing, creates, renames or removes under
    ``root`` (Python audit events: DCP and the JSON are written through Python ``open``)."""
    seen: list[list[str]] = []
    prefix = str(root.resolve())

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)
            )
            paths = [path] if writes else []
        elif event in ("os.rename", "os.replace"):
            paths = [args[1]]
        elif event in ("os.mkdir", "os.remove", "os.unlink"):
            paths = [args[0]]
        else:
            return
        for p in paths:
            if isinstance(p, str | os.PathLike):
                full = os.path.abspath(os.fspath(p))
                if full.startswith(prefix):
                    seen.append([event, os.path.relpath(full, prefix)])

    sys.addaudithook(hook)
    return seen


#: The trainer cases (``--case``): a recipe, the model (``encoder``: a tiny BERT with noised
#: weights; ``lowrank``: the same with its feed-forward Linears as rank-2 pairs, more noise;
#: ``decoder``: a tiny GPT-2, noised) and the ``freeze`` statement (or None).
TRAINER_CASES: dict[str, tuple[str, str, str | None]] = {
    # mse alone: the teacher norm of the global batch, not of each shard
    "mse": ('heal steps 6 on "train.txt" batch 4 lr 0.001', "encoder", None),
    # frozen factors alternating (requires_grad never changes while wrapped), accumulation
    # (DDP: no_sync), held-out evaluations and `keep best` (full weights kept on every rank;
    # the last step is the best, so the trained weights are compared)
    "freeze": (
        'heal steps 6 on "train.txt" batch 4 accumulate 2 eval 20% eval every 2 steps '
        "lr 0.0003 every 2 steps keep best",
        "lowrank",
        "alternate",
    ),
    # token means (kl, next-token) over the tokens of the global batch, not of each shard; a
    # learning rate too high, so `keep best` restores step 0's weights (tied, under FSDP2)
    "kl": (
        'heal steps 4 on "train.txt" batch 4 eval 20% eval every 2 steps lr 0.01 '
        "loss mse 1 kl 1 task 1 keep best",
        "decoder",
        None,
    ),
}


def trainer_run(parallel: Any, corpus: Path, case: str = "mse") -> tuple[dict[str, Any], nn.Module]:
    """The project's trainer (`surgery.heal.heal`) on trainer case ``case``, on the sentences of
    ``corpus/train.txt``, through ``parallel`` (None: one process): (the report's losses,
    evaluations and best step; the healed model, unwrapped)."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)  # run as a script: `tests` is not importable otherwise
    from surgery.heal import heal
    from surgery.heal_data import TrainingData
    from surgery.parse import parse
    from surgery.passes.base import PassContext
    from tests.test_heal_data import tiny_decoder, tiny_encoder, word_tokenizer
    from tests.test_heal_train import _decomposed

    recipe, kind, freeze = TRAINER_CASES[case]
    teacher = tiny_decoder() if kind == "decoder" else tiny_encoder()
    if kind == "lowrank":
        student = _decomposed(teacher)
    else:
        student = copy.deepcopy(teacher)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in student.parameters():
                if p.dim() == 2:
                    p.add_(0.1 * p.std() * torch.randn_like(p))
    if parallel is not None:
        parallel.check_same(student)
    statement = parse(recipe).statements[0]
    data = TrainingData.load(statement, teacher, tokenizer=word_tokenizer(), base=corpus)
    context = PassContext(analysis=cast(Any, None), original=teacher)
    fz = parse(f"freeze {freeze}").statements[0] if freeze else None
    report = heal(
        student,
        cast(Any, statement),
        context,
        freeze=cast(Any, fz),
        hooks=[],
        data=data,
        parallel=parallel,
    )
    healed = parallel.unwrap(student) if parallel is not None else student
    result = {"losses": list(report.losses), "evals": report.evals, "best_step": report.best_step}
    return result, healed


def worker(args: argparse.Namespace) -> None:
    from surgery.distributed import RankMismatchError, torchrun_parallel

    config = json.loads(args.config)
    writes = _audit(Path(args.audit)) if args.audit else None
    with torchrun_parallel(args.mode) as parallel:
        result: dict[str, Any] = {"world": parallel.world, "mode": parallel.mode}
        if args.trainer:
            run, healed = trainer_run(parallel, Path(args.trainer), args.case)
            result.update(run)
            if parallel.is_writer and args.export:
                from safetensors.torch import save_file

                tensors = {k: v.detach().clone() for k, v in healed.state_dict().items()}
                save_file(tensors, args.export)
            if parallel.is_writer and args.out:
                Path(args.out).write_text(json.dumps(result))
            parallel.barrier()  # see the end of this function
            return
        model = build(config, seed=0)
        result["parameters"] = sum(p.numel() for p in model.parameters())
        result["same_before_heal"] = parallel.check_same(model)
        if args.check_mismatch and parallel.world > 1:
            # One rank holds a different weight: every rank must name it, and repair must fix it.
            other = copy.deepcopy(model)
            if parallel.rank == 1:
                with torch.no_grad():
                    other.get_parameter("blocks.0.fc1.weight")[0, 0] += 1e-3
            try:
                parallel.check_same(other)
                result["mismatch_named"] = []
            except RankMismatchError as exc:
                result["mismatch_named"] = exc.names
            result["repaired"] = parallel.check_same(other, repair=True)
            result["same_after_repair"] = parallel.check_same(other)
            if parallel.rank == 1:
                other.add_module("extra", nn.Linear(1, 1))  # another structure on one rank
            try:
                parallel.check_same(other)
                result["structure_mismatch"] = None
            except RankMismatchError as exc:
                result["structure_mismatch"] = str(exc)
        data = dataset(config)
        wrapped = parallel.wrap(model)
        optimizer = torch.optim.AdamW(wrapped.parameters(), lr=config["lr"], weight_decay=0.0)
        first, losses = 0, []
        if args.resume:
            started = time.perf_counter()
            state = parallel.load(Path(args.resume), wrapped, optimizer)
            result["load_seconds"] = time.perf_counter() - started
            first = state["step"]
            result["resumed_state"] = state
        stop = args.save_at if args.save_at is not None else args.steps
        seconds: list[float] = []
        losses = train_steps(
            parallel,
            wrapped,
            optimizer,
            data,
            first=first,
            last=stop,
            batch=config["batch"],
            seconds=seconds,
        )
        result["step_seconds"] = seconds
        if args.save_at is not None:
            started = time.perf_counter()
            state = {"step": stop, "losses": losses}
            parallel.save(Path(args.save_dir), wrapped, optimizer, state)
            result["save_seconds"] = time.perf_counter() - started
        result["first_step"] = first
        result["losses"] = losses
        if args.export:
            plain = parallel.unwrap(wrapped)
            result["unwrapped_type"] = type(plain).__name__
            if parallel.is_writer:
                from safetensors.torch import save

                tensors = {k: v.detach().contiguous() for k, v in plain.state_dict().items()}
                Path(args.export).parent.mkdir(parents=True, exist_ok=True)
                with open(args.export, "wb") as f:  # Python `open`, so the audit sees it
                    f.write(save(tensors))
        if parallel.is_writer and args.out:
            Path(args.out).write_text(json.dumps(result))
        if writes is not None:
            log = Path(args.audit_log) / f"rank{parallel.rank}.json"
            log.write_text(json.dumps(writes))
        # No rank leaves the group while another still works: a gloo rank that tears down
        # its group early can abort ("terminate called without an active exception").
        parallel.barrier()


DEFAULT_CONFIG: dict[str, Any] = {
    "features": 16,
    "hidden": 32,
    "layers": 2,
    "outputs": 8,
    "examples": 64,
    "batch": 8,
    "lr": 1e-2,
}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", choices=("ddp", "fsdp2"), default="ddp")
    ap.add_argument("--config", default=json.dumps(DEFAULT_CONFIG), help="model/data/optimizer")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--save-at", type=int, default=None, help="train up to this step, save, stop")
    ap.add_argument("--save-dir", default=None)
    ap.add_argument("--resume", default=None, metavar="CHECKPOINT")
    ap.add_argument("--export", default=None, metavar="FILE", help="rank 0 writes the weights")
    ap.add_argument("--out", default=None, metavar="JSON", help="rank 0 writes the results")
    ap.add_argument("--check-mismatch", action="store_true")
    ap.add_argument("--audit", default=None, metavar="ROOT", help="log each rank's writes")
    ap.add_argument("--audit-log", default=None, metavar="DIR")
    ap.add_argument("--trainer", default=None, metavar="CORPUS", help="run surgery.heal.heal")
    ap.add_argument("--case", choices=sorted(TRAINER_CASES), default="mse", help="with --trainer")
    worker(ap.parse_args(argv))


if __name__ == "__main__":
    main()
