"""`heal`: fine-tune the surgered model towards the original and, when asked, on its task.

``heal steps N [on "DATA" …] [eval …] [lr X] [loss …] …`` (see `surgery.verbs.heal`),
optionally preceded by ``freeze first-factor|core|alternate`` and ``regularize`` statements.

**Data.** Without ``on``, the examples are the calibration batches (one per step, in order,
cycled; the teacher's outputs on them computed once). With ``on "DATA"`` they are the rows of
a training set (`surgery.heal_data`): each optimizer step takes ``accumulate`` micro-batches
of ``batch`` examples, drawn from a seeded permutation of the examples per epoch, so the data
position is a pure function of the step and a resumed run reads exactly what an uninterrupted
one would. A held-out split is only ever evaluated on.

**Loss** (`surgery.heal_losses`): ``mse`` (the squared relative drift of every floating
output: the default, alone, when the recipe names no ``loss``), ``kl`` (logit distillation at
a temperature) and ``task`` (next-token or label cross-entropy), weighted and summed; the
losses of :class:`~surgery.passes.base.TrainingHook` s (``hook.loss(model)``) are added.

**Optimiser.** AdamW, ``lr`` 1e-4 by default, no weight decay (decay would pull pretrained
weights towards zero, away from the teacher), a linear warm-up of ``warmup`` steps then a
cosine decay to a tenth of ``lr``, gradients accumulated over ``accumulate`` micro-batches and
their norm clipped at ``clip`` (1.0). The model trains in ``eval()`` mode: dropout noise would
swamp the small residual being fitted and BatchNorm statistics of small batches would drift;
gradients flow regardless of the mode. bf16 autocast is used on a CUDA device that supports
it, never on the CPU. The model is in ``eval()`` at the end.

**Freezing** (sequential freezing, arXiv 2309.03824 / 2407.20266): every parameter trains
unless frozen. ``freeze first-factor`` freezes the first factor of every ``LowRankLinear`` /
``LowRankConv2d``; ``freeze core`` freezes the two 1×1 convolutions of every ``TuckerConv2d``
and trains its core; ``freeze alternate`` freezes the first factor (Tucker: the 1×1s) for
``every`` steps (default: one pass over the examples), then the second factor (Tucker: the
core), and so on. Hooks' ``trainable(name, model)`` removes more.

**Subset by importance** (SwiftLearn, arXiv 2311.15134), over the training examples: the
first period (``every`` steps, default one pass over the examples) uses all of them; at the
end of each period every example's distillation loss is measured, its importance is the change
of that loss since the previous measurement, and the next period draws from the top
``⌈P·N⌉`` examples only.

**Evaluation** on the held-out split before training, every ``eval every`` steps and at the
end: the drift (`surgery.metrics.drift`) and the task metric (perplexity for decoders,
accuracy for classifiers with labels). ``keep best`` restores the weights of the evaluation
with the lowest held-out drift; ``stop early`` stops at the first evaluation where the
recipe's contracts hold (the manager says which can be judged during healing).

**Checkpoints** every ``checkpoint every`` steps (and at the end) under ``checkpoint_dir``,
through :class:`Parallel` (single process: safetensors + JSON, `surgery.heal_checkpoint`);
``resume=True`` continues from the latest and reaches the same weights as an uninterrupted run
(bitwise on the CPU).

>>> import torch
>>> from surgery.inputs import Inputs
>>> from surgery.parse import parse
>>> from surgery.passes.base import PassContext
>>> from surgery.graph import analyze
>>> torch.manual_seed(0) and None
>>> teacher = torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> student = torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> ctx = PassContext(analysis=analyze(student), calibration=[Inputs((torch.randn(16, 8),), {})],
...                   original=teacher)
>>> report = heal(student, parse("heal steps 30 lr 1e-2").statements[0], ctx, freeze=None, hooks=[])
>>> report.steps, report.losses[-1] < report.losses[0], student.training
(30, True, False)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from surgery import ast
from surgery.heal_checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from surgery.heal_config import DEFAULT_LR, GRAD_CLIP, HealConfig
from surgery.heal_data import HealDataError, TrainingData, is_decoder
from surgery.heal_losses import (
    kl_loss,
    label_loss,
    logits_of,
    mse_loss,
    next_token_loss,
    per_example_mse,
    positions,
    teacher_scale,
)
from surgery.inputs import Inputs
from surgery.metrics import drift, float_outputs, padding_mask
from surgery.passes.base import PassContext, TrainingHook
from surgery.support import RUN_VERBS

__all__ = [
    "CURVES",
    "DEFAULT_LR",
    "GRAD_CLIP",
    "HEAL_SUPPORT",
    "CheckpointError",
    "HealDataError",
    "HealReport",
    "Parallel",
    "SingleProcess",
    "TrainingData",
    "frozen_names",
    "heal",
    "lr_at",
    "write_curves",
]

#: What the manager carries out for ``heal`` and ``freeze``: verb -> (options, types), from
#: the one support table ``surgery.support``.
HEAL_SUPPORT: dict[str, tuple[dict[str, set[str] | None], tuple[str, ...]]] = {
    verb: RUN_VERBS[verb] for verb in ("heal", "freeze")
}
#: The files :func:`write_curves` writes into OUT/.
CURVES = ("heal-losses.jsonl", "heal-evals.jsonl")
#: The cosine decay ends at this share of ``lr``.
FINAL_LR_SHARE = 0.1
#: Most memory the teacher's cached outputs on a training set may take (see ``_Data``).
TEACHER_CACHE_BYTES = 1 << 30


# --- data parallelism -------------------------------------------------------------------


@runtime_checkable
class Parallel(Protocol):
    """Every data-parallel concern of the trainer (single process: :class:`SingleProcess`;
    torchrun: ``surgery.distributed``). The trainer computes, per optimizer step, the mean
    loss over the *global* batch: each rank the mean over its equal shard, so with gradient
    averaging the update equals the single-process update on the whole batch."""

    rank: int
    world: int
    device: torch.device  # where the trainer puts the batches (and `wrap` the model)

    @property
    def is_writer(self) -> bool:
        """Rank 0: the only rank that writes OUT/ and logs."""
        ...

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the trainer calls forward/backward on (its parameters are ``model``'s)."""
        ...

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's contiguous equal share of one global batch's example indices."""
        ...

    def all_mean(self, value: float) -> float:
        """The mean of a float over ranks."""
        ...

    def save(
        self,
        directory: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
    ) -> None:
        """Write one checkpoint: model, optimizer and the JSON-able trainer ``state``."""
        ...

    def load(
        self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """Restore what :meth:`save` wrote into ``model`` and ``optimizer``; return ``state``."""
        ...

    def check_same(self, model: nn.Module, *, repair: bool = False) -> list[str]:
        """Check, before :meth:`wrap`, that every rank holds the same ``model``: the names of
        the tensors that differ from rank 0's (raises ``RuntimeError`` naming them, unless
        ``repair``, which copies rank 0's values instead)."""
        ...

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The healed model as a plain module with full weights (``model`` is what
        :meth:`wrap` returned, or the module given to it)."""
        ...


class SingleProcess:
    """One process, one device (``device``: where the model is; default the CPU): no
    wrapping, no sharding, safetensors + JSON checkpoints.

    >>> p = SingleProcess()
    >>> p.rank, p.world, p.is_writer, p.shard([4, 5, 6]), p.all_mean(2.5), p.device.type
    (0, 1, True, [4, 5, 6], 2.5, 'cpu')
    >>> m = nn.Linear(2, 2)
    >>> p.check_same(m), p.unwrap(p.wrap(m)) is m, isinstance(p, Parallel)
    ([], True, True)
    """

    rank = 0
    world = 1

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device if device is not None else torch.device("cpu")

    @property
    def is_writer(self) -> bool:
        return True

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def shard(self, indices: Sequence[int]) -> list[int]:
        return list(indices)

    def all_mean(self, value: float) -> float:
        return value

    def save(
        self,
        directory: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
    ) -> None:
        save_checkpoint(directory, model, optimizer, state)

    def load(
        self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        return load_checkpoint(directory, model, optimizer)

    def check_same(self, model: nn.Module, *, repair: bool = False) -> list[str]:
        return []

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model


# --- the report ---------------------------------------------------------------------------


@dataclass
class HealReport:
    """What one ``heal`` statement did."""

    steps: int  # optimizer steps taken (fewer than asked when it stopped early)
    losses: list[float]  # one per step: the weighted loss (without hook losses)
    seconds: float
    trainable_params: int
    frozen_params: int
    lr: float = DEFAULT_LR
    freeze: str | None = None
    subsets: list[list[int]] = field(default_factory=list)  # example indices of each period
    # held-out evaluations: {"step", "drift", "loss", and "perplexity" or "accuracy"}
    evals: list[dict[str, float]] = field(default_factory=list)
    source: str = "calibration"  # the training data: "calibration" or the `on` path
    examples: int = 0  # training examples (calibration: batches)
    held_out: int = 0  # held-out examples
    tokens: int = 0  # tokens trained on (all ranks)
    best_step: int | None = None  # the step whose weights were kept (`keep best`)
    stopped_early: bool = False
    resumed_from: int | None = None  # the checkpoint step a resumed run started from
    asked_steps: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "losses": list(self.losses),
            "seconds": self.seconds,
            "trainable_params": self.trainable_params,
            "frozen_params": self.frozen_params,
            "lr": self.lr,
            "freeze": self.freeze,
            "subsets": [list(s) for s in self.subsets],
            "evals": [dict(e) for e in self.evals],
            "source": self.source,
            "examples": self.examples,
            "held_out": self.held_out,
            "tokens": self.tokens,
            "best_step": self.best_step,
            "stopped_early": self.stopped_early,
            "resumed_from": self.resumed_from,
        }


def write_curves(reports: Sequence[HealReport], directory: Path) -> list[str]:
    """Write ``heal-losses.jsonl`` (one line per step) and ``heal-evals.jsonl`` (one line per
    held-out evaluation) into ``directory``; return the names written (none without heals).

    Each line carries ``heal`` (which heal of the run, from 0) and ``step`` (1-based; 0 is
    the evaluation before training).
    """
    if not reports:
        return []
    directory = Path(directory)
    with (directory / "heal-losses.jsonl").open("w", encoding="utf-8") as f:
        for h, r in enumerate(reports):
            for step, loss in enumerate(r.losses, 1):
                f.write(json.dumps({"heal": h, "step": step, "loss": loss}) + "\n")
    names = ["heal-losses.jsonl"]
    if any(r.evals for r in reports):
        with (directory / "heal-evals.jsonl").open("w", encoding="utf-8") as f:
            for h, r in enumerate(reports):
                for e in r.evals:
                    f.write(json.dumps({"heal": h, **e}) + "\n")
        names.append("heal-evals.jsonl")
    return names


# --- freezing -----------------------------------------------------------------------------


def _factor_groups(model: nn.Module) -> tuple[set[str], set[str], set[str], set[str]]:
    """Parameter names of (pair first factors, pair second factors, Tucker 1×1s, Tucker cores)."""
    from surgery.modules import LowRankLinear
    from surgery.modules.lowrank_conv import LowRankConv2d
    from surgery.modules.tucker_conv import TuckerConv2d

    first: set[str] = set()
    second: set[str] = set()
    outer: set[str] = set()
    core: set[str] = set()
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(m, LowRankLinear | LowRankConv2d):
            first.update(f"{prefix}first.{n}" for n, _ in m.first.named_parameters())
            second.update(f"{prefix}second.{n}" for n, _ in m.second.named_parameters())
        elif isinstance(m, TuckerConv2d):
            outer.update(f"{prefix}first.{n}" for n, _ in m.first.named_parameters())
            outer.update(f"{prefix}last.{n}" for n, _ in m.last.named_parameters())
            core.update(f"{prefix}core.{n}" for n, _ in m.core.named_parameters())
    return first, second, outer, core


def frozen_names(model: nn.Module, freeze: str | None, phase: int = 0) -> set[str]:
    """Names of the parameters ``freeze`` keeps fixed (``phase`` counts alternations).

    >>> from surgery.modules import LowRankLinear
    >>> m = nn.Sequential(LowRankLinear(4, 4, rank=2), nn.LayerNorm(4))
    >>> sorted(frozen_names(m, "first-factor")), sorted(frozen_names(m, "alternate", phase=1))
    (['0.first.weight'], ['0.second.bias', '0.second.weight'])
    """
    if freeze is None:
        return set()
    first, second, outer, core = _factor_groups(model)
    if freeze == "first-factor":
        return first
    if freeze == "core":
        return outer
    if freeze == "alternate":
        return first | outer if phase % 2 == 0 else second | core
    raise ValueError(f"unknown freeze `{freeze}`: expected first-factor, core or alternate")


# --- schedule and data order --------------------------------------------------------------


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """The learning rate of optimizer step ``step`` (from 0): linear warm-up over ``warmup``
    steps, then a cosine decay from ``lr`` to ``FINAL_LR_SHARE · lr`` at the last step.

    >>> [round(lr_at(s, 10, 1.0, 2), 3) for s in (0, 1, 2, 9)]
    [0.5, 1.0, 1.0, 0.1]
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    low = lr * FINAL_LR_SHARE
    return low + (lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Order:
    """Which examples micro-batch ``k`` holds: positions ``k·B … k·B+B−1`` of an endless walk
    through seeded per-epoch permutations of the current pool (all examples, or a subset
    chosen at micro-batch ``start``). A pure function of ``k``: what a resumed run reads."""

    def __init__(self, n: int, batch: int, seed: int, shuffle: bool) -> None:
        self.n, self.batch, self.seed, self.shuffle = n, batch, seed, shuffle
        self.pool: list[int] = list(range(n))
        self.start = 0
        self._perms: dict[int, list[int]] = {}

    def choose(self, pool: list[int], start: int) -> None:
        self.pool, self.start, self._perms = list(pool), start, {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if not self.shuffle:
                self._perms[epoch] = list(range(len(self.pool)))
            else:
                g = torch.Generator().manual_seed(
                    (self.seed * 1_000_003 + self.start * 7_919 + epoch) % (2**63)
                )
                self._perms[epoch] = torch.randperm(len(self.pool), generator=g).tolist()
            if len(self._perms) > 4:  # only neighbouring epochs are ever read
                del self._perms[min(self._perms)]
        return self._perms[epoch]

    def indices(self, k: int) -> list[int]:
        size = len(self.pool)
        out = []
        for j in range(self.batch):
            p = (k - self.start) * self.batch + j
            out.append(self.pool[self._perm(p // size)[p % size]])
        return out


# --- sources of examples ------------------------------------------------------------------


class _Source:
    """Examples and the teacher's outputs on them."""

    n: int
    batch: int  # examples per micro-batch (global)
    shuffle: bool
    name: str

    def inputs(self, indices: Sequence[int]) -> tuple[Inputs, Tensor | None]:
        raise NotImplementedError

    def teacher(self, indices: Sequence[int], inputs: Inputs) -> Any:
        raise NotImplementedError


class _Calibration(_Source):
    """The calibration batches, one per example, the teacher's outputs computed once."""

    def __init__(self, batches: list[Inputs], teacher: nn.Module) -> None:
        self.batches = batches
        self.n, self.batch, self.shuffle, self.name = len(batches), 1, False, "calibration"
        self._teacher = teacher
        self._cache: dict[int, Any] = {}

    def inputs(self, indices: Sequence[int]) -> tuple[Inputs, Tensor | None]:
        if len(indices) != 1:
            raise ValueError(
                "healing on calibration batches takes one batch per step on one process; name "
                'training data with `on "DATA"` to heal data-parallel'
            )
        return self.batches[indices[0]], None

    def teacher(self, indices: Sequence[int], inputs: Inputs) -> Any:
        i = indices[0]
        if i not in self._cache:
            self._cache[i] = inputs.call(self._teacher)
        return self._cache[i]


class _Data(_Source):
    """A training set's examples. When only ``mse`` is asked and the teacher's outputs on
    every example fit in :data:`TEACHER_CACHE_BYTES`, they are computed once, before
    training, in fixed batches of the examples in order (so a resumed run reads the very same
    numbers), each trimmed to its example's tokens; a batch's targets are zero-padded again
    (padded positions are masked out of the loss)."""

    def __init__(
        self, data: TrainingData, teacher: nn.Module, device: torch.device, cache: bool
    ) -> None:
        self.data = data.train
        self.n, self.batch, self.shuffle, self.name = len(data.train), data.batch, True, data.source
        self._teacher = teacher
        self.device = device
        self._rows: list[list[Tensor]] | None = None  # per example, its trimmed outputs
        self._seq: list[bool] = []  # per output: has a token dimension
        if cache and not data.packed:
            self._fill()

    def _fill(self) -> None:
        was_training = self._teacher.training
        self._teacher.eval()
        try:
            self._fill_rows()
        finally:
            self._teacher.train(was_training)

    def _fill_rows(self) -> None:
        rows: list[list[Tensor]] = []
        size = 0
        for i in range(0, self.n, self.batch):
            indices = list(range(i, min(self.n, i + self.batch)))
            ins, _ = self.inputs(indices)
            outs = float_outputs(ins.call(self._teacher))
            width = int(ins.kwargs["input_ids"].shape[1])
            mask = padding_mask(ins)
            if not self._seq:
                self._seq = [t.dim() >= 2 and t.shape[1] == width for t in outs]
            for j in range(len(indices)):
                length = int(mask[j].sum()) if mask is not None else width
                row = [
                    (t[j, :length] if seq else t[j]).clone()
                    for t, seq in zip(outs, self._seq, strict=True)
                ]
                size += sum(t.numel() * t.element_size() for t in row)
                if size > TEACHER_CACHE_BYTES:
                    return  # too large: the teacher runs with every batch instead
                rows.append(row)
        self._rows = rows

    def inputs(self, indices: Sequence[int]) -> tuple[Inputs, Tensor | None]:
        ins, labels = self.data.batch(indices)
        return ins.to(self.device), labels

    def teacher(self, indices: Sequence[int], inputs: Inputs) -> Any:
        if self._rows is None:
            return inputs.call(self._teacher)
        width = int(inputs.kwargs["input_ids"].shape[1])
        out = []
        for k, seq in enumerate(self._seq):
            parts = [self._rows[i][k] for i in indices]
            if seq:
                parts = [
                    torch.cat([p, p.new_zeros((width - p.shape[0], *p.shape[1:]))]) for p in parts
                ]
            out.append(torch.stack(parts))
        return out


# --- the trainer --------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _is_sharded(p: Tensor) -> bool:
    """Whether ``p`` is a sharded (FSDP2 ``DTensor``) parameter."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(p, DTensor)


def _full_state(model: nn.Module) -> dict[str, Tensor]:
    """A copy of ``model``'s full weights on the CPU (``keep best``), whether its parameters
    are sharded or not; on every rank (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().to("cpu", copy=True) for k, v in full.items() if isinstance(v, Tensor)}


def _load_full_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy what :func:`_full_state` gave into ``model``'s parameters and buffers; a sharded
    parameter takes its shard of the full weight (a collective: every rank calls it)."""
    from itertools import chain

    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        # FSDP2 leaves the root's parameters gathered after a forward without backward (an
        # evaluation); a copy into those would be lost at the next reshard.
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
    with torch.no_grad():
        for name, t in chain(model.named_parameters(), model.named_buffers()):
            if name not in state:  # a non-persistent buffer
                continue
            full = state[name]
            if _is_sharded(t):
                from torch.distributed.tensor import distribute_tensor

                mesh = t.device_mesh  # type: ignore[attr-defined]
                full = distribute_tensor(
                    full.to(mesh.device_type),
                    mesh,
                    t.placements,  # type: ignore[attr-defined]
                )
            t.copy_(full)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _fingerprint(model: nn.Module, statement: ast.Heal, index: int) -> str:
    """What a checkpoint must have been written by: this heal of this recipe, this model."""
    from surgery.verbs.heal import format as format_heal

    h = hashlib.sha256()
    h.update(f"{index}\n{format_heal(statement)}\n".encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def _checkpointing(model: nn.Module, enabled: bool) -> Iterator[bool]:
    """HF gradient checkpointing, which recomputes activations only in ``train()`` mode: the
    model goes to train mode with every dropout at 0 and BatchNorm in eval (as healing
    wants); restored after. Yields whether it is on."""
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if not enabled or enable is None or not getattr(model, "supports_gradient_checkpointing", True):
        yield False
        return
    saved: list[tuple[nn.Module, str, float]] = []
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            saved.append((m, "p", m.p))
            m.p = 0.0
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
        for attr in ("attention_dropout", "dropout", "dropout_prob", "attn_dropout"):
            v = getattr(m, attr, None)
            if isinstance(v, float) and v > 0:
                saved.append((m, attr, v))
                setattr(m, attr, 0.0)
    try:
        yield True
    finally:
        for m, attr, v in saved:
            setattr(m, attr, v)
        model.gradient_checkpointing_disable()  # type: ignore[operator]
        model.eval()


def heal(
    model: nn.Module,
    statement: ast.Heal,
    context: PassContext,
    *,
    freeze: ast.Freeze | None,
    hooks: list[TrainingHook],
    regularizers: Sequence[ast.Regularize] = (),
    data: TrainingData | None = None,
    parallel: Parallel | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    index: int = 0,
    contracts_hold: Callable[[float], bool] | None = None,
    stop_after: int | None = None,
) -> HealReport:
    """Fine-tune ``model`` in place towards ``context.original`` (see the module docstring).

    ``data`` is the training set of ``on "DATA"`` (None: the calibration batches);
    ``parallel`` runs the data-parallel concerns (default: one process); checkpoints go to
    ``checkpoint_dir`` (``resume``: continue from its latest); ``index`` says which heal of
    the run this is (checkpoints know it); ``contracts_hold(held_out_drift)`` decides
    ``stop early``; ``stop_after`` ends the run after that many steps as if killed (tests).
    """
    from surgery.passes.regularize import hooks_for

    cfg = HealConfig.of(statement)
    parallel = parallel or SingleProcess(_device(model))
    hooks = [*hooks, *(h for r in regularizers for h in hooks_for(r, model))]
    teacher = context.original
    if teacher is None:
        raise ValueError("healing distils from the original model, but the context has none")
    device = parallel.device
    source: _Source
    if data is not None:
        # The teacher's outputs are worth computing once when each example is seen twice or
        # more (its outputs then cost one forward instead of several).
        reads = cfg.steps * cfg.accumulate * data.batch
        source = _Data(data, teacher, device, cache=not cfg.kl and reads >= 2 * len(data.train))
    else:
        batches: list[Inputs] = list(context.calibration) or (
            [context.example] if context.example is not None else []
        )
        if not batches:
            raise ValueError("healing needs calibration inputs (or example inputs)")
        source = _Calibration(batches, teacher)
    if parallel.world > 1 and data is None:
        raise HealDataError(
            f"healing on {parallel.world} processes needs training data: the calibration "
            "batches are healed on one process",
            "steps",
            'name training data with `heal ... on "DATA"`, or run without torchrun',
        )
    if source.batch % parallel.world:
        raise HealDataError(
            f"the global batch of {source.batch} examples cannot be split evenly over "
            f"{parallel.world} processes",
            "batch" if statement.batch is not None else "steps",
            f"make `batch` a multiple of {parallel.world}",
        )
    decoder = is_decoder(model)
    if cfg.task and not decoder and (data is None or data.train.labels is None):
        raise HealDataError(
            '`task` needs labels (`label "COLUMN"`) or a language model',
            "task",
            "name the label column, or remove `task`",
        )
    what = freeze.what.value if freeze is not None else None
    steps_per_epoch = max(1, math.ceil(source.n / (source.batch * cfg.accumulate)))
    period = cfg.every if cfg.every is not None else steps_per_epoch
    started = time.perf_counter()

    if cfg.kl or cfg.task:
        first = [0] * source.batch if source.batch > 1 else [0]
        probe, _ = source.inputs(first[: max(1, source.batch // parallel.world)])
        if logits_of(probe.call(teacher)) is None:
            raise HealDataError(
                "`kl` and `task` need a model with an LM or classification head (logits)",
                "kl" if cfg.kl else "task",
                "use `mse` for a model without logits",
            )
    teacher_was_training = teacher.training
    teacher.eval()
    stack = contextlib.ExitStack()
    try:
        gc_on = stack.enter_context(_checkpointing(model, cfg.gradient_checkpointing))
        fingerprint = _fingerprint(model, statement, index)
        # After wrapping: a sharding wrapper (FSDP2) replaces the parameters it shards.
        wrapped = parallel.wrap(model)
        named = dict(model.named_parameters())
        sharded = any(_is_sharded(p) for p in named.values())
        if sharded and any(type(h).loss is not TrainingHook.loss for h in hooks):
            raise HealDataError(
                "`regularize` (and any training hook with a loss) cannot heal with sharded "
                "parameters (--parallel fsdp2): its loss reads whole weights outside forward",
                "steps",
                "heal with --parallel ddp, or without `regularize`",
            )
        # A list in the model's own order, never a set: a set's order follows the per-process string
        # hash, and the order of `params` decides the order of the gradient-norm sum and of AdamW's
        # fused updates, so two runs of one recipe would differ in every weight.
        allowed = [
            n
            for n, p in named.items()
            if p.requires_grad and all(h.trainable(n, model) for h in hooks)
        ]
        params = [named[n] for n in allowed]
        is_allowed = set(allowed)  # membership only; never iterated
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0) if params else None
        frozen_at_start = frozen_names(model, what, 0)
        trainable = sum(named[n].numel() for n in allowed if n not in frozen_at_start)
        frozen = sum(
            p.numel() for n, p in named.items() if n not in is_allowed or n in frozen_at_start
        )

        # `requires_grad` never changes while wrapped (DDP fixes its gradient buckets when it
        # wraps): the gradients of what is frozen in a phase, or kept by a hook, are computed
        # and then dropped after backward, before clipping, so AdamW leaves those untouched.
        dropped: list[nn.Parameter] = []

        def set_phase(phase: int) -> None:
            fixed = frozen_names(model, what, phase)
            dropped[:] = [
                p
                for n, p in named.items()
                if p.requires_grad and (n not in is_allowed or n in fixed)
            ]

        report = HealReport(
            steps=0,
            losses=[],
            seconds=0.0,
            trainable_params=trainable,
            frozen_params=frozen,
            lr=cfg.lr,
            freeze=what,
            source=source.name,
            examples=source.n,
            held_out=len(data.held_out) if data is not None and data.held_out is not None else 0,
            asked_steps=cfg.steps,
        )
        order = _Order(source.n, source.batch, cfg.seed, source.shuffle)
        scores: list[float] = []
        best: dict[str, Tensor] | None = None
        best_drift = math.inf
        held = data.held_out if data is not None else None
        held_teacher: list[Any] = []
        start = 0

        def per_example(indices: list[int]) -> list[float]:
            ins, _ = source.inputs(indices)
            out = ins.call(model)
            ref = float_outputs(source.teacher(indices, ins))
            values = per_example_mse(out, ref, padding_mask(ins))
            return (
                values
                if len(values) == len(indices)
                else [sum(values) / len(values)] * len(indices)
            )

        def score_all() -> list[float]:
            out: list[float] = []
            for i in range(0, source.n, source.batch):
                out.extend(per_example(list(range(i, min(source.n, i + source.batch)))))
            return out

        def evaluate(step: int) -> None:
            nonlocal best, best_drift
            if held is None:
                return
            refs, cands, masks = [], [], []
            ce_sum, ce_n, correct = 0.0, 0, 0
            size = data.batch if data is not None else 1
            for b, i in enumerate(range(0, len(held), size)):
                rows = list(range(i, min(len(held), i + size)))
                ins, labels = held.batch(rows)
                ins = ins.to(device)
                if len(held_teacher) <= b:
                    held_teacher.append(ins.call(teacher))
                out = ins.call(model)
                refs.append(held_teacher[b])
                cands.append(out)
                masks.append(padding_mask(ins))
                logits = logits_of(out)
                if logits is not None and decoder:
                    mask = padding_mask(ins)
                    n = int(mask[:, 1:].sum()) if mask is not None else logits[:, :-1, 0].numel()
                    ce_sum += float(next_token_loss(logits, ins.kwargs["input_ids"], mask)) * n
                    ce_n += n
                elif logits is not None and labels is not None:
                    correct += int((logits.argmax(-1).cpu() == labels).sum())
            entry: dict[str, float] = {"step": step, "drift": drift(refs, cands, masks)}
            if ce_n:
                entry["perplexity"] = math.exp(min(50.0, ce_sum / ce_n))
            elif held.labels is not None:
                entry["accuracy"] = correct / len(held)
            report.evals.append(entry)
            if cfg.keep_best and entry["drift"] < best_drift:
                best_drift = entry["drift"]
                best = _full_state(model)
                report.best_step = step

        def state(step: int, done: bool) -> dict[str, Any]:
            return {
                "fingerprint": fingerprint,
                "step": step,
                "done": done,
                "losses": report.losses,
                "evals": report.evals,
                "subsets": report.subsets,
                "tokens": report.tokens,
                "pool": order.pool if order.pool != list(range(source.n)) else None,
                "pool_start": order.start,
                "scores": scores,
                "best_step": report.best_step,
                "best_drift": best_drift if best is not None else None,
                "stopped_early": report.stopped_early,
                "seconds": time.perf_counter() - started + seconds_before,
                "rng": torch.get_rng_state().tolist(),
            }

        def save(step: int, done: bool) -> None:
            if checkpoint_dir is None or optimizer is None:
                return
            target = checkpoint_dir / f"step-{step}"
            parallel.save(target, model, optimizer, state(step, done))
            if parallel.is_writer:
                if best is not None:
                    from safetensors.torch import save_file

                    save_file(
                        {k: v.contiguous() for k, v in best.items()},
                        str(target / "best.safetensors"),
                    )
                for old in checkpoint_dir.glob("step-*"):
                    if old != target and old.is_dir():
                        shutil.rmtree(old, ignore_errors=True)

        seconds_before = 0.0
        if resume and checkpoint_dir is not None and optimizer is not None:
            latest = latest_checkpoint(checkpoint_dir)
            if latest is not None:
                saved = parallel.load(latest, model, optimizer)
                if saved.get("fingerprint") != fingerprint:
                    raise CheckpointError(
                        f"the checkpoint `{latest}` was written by another recipe or model"
                    )
                start = int(saved["step"])
                report.resumed_from = start
                report.losses = [float(x) for x in saved["losses"]]
                report.evals = [dict(e) for e in saved["evals"]]
                report.subsets = [list(s) for s in saved["subsets"]]
                report.tokens = int(saved["tokens"])
                report.stopped_early = bool(saved["stopped_early"])
                scores = [float(x) for x in saved["scores"]]
                if saved["pool"] is not None:
                    order.choose(saved["pool"], int(saved["pool_start"]))
                torch.set_rng_state(torch.tensor(saved["rng"], dtype=torch.uint8))
                seconds_before = float(saved["seconds"])
                if saved.get("best_step") is not None and (latest / "best.safetensors").is_file():
                    from safetensors.torch import load_file

                    best = load_file(str(latest / "best.safetensors"))
                    best_drift = float(saved["best_drift"])
                    report.best_step = int(saved["best_step"])
                if saved["done"]:
                    start = cfg.steps

        if not gc_on:
            model.eval()
        if start == 0:
            evaluate(0)
            if cfg.subset is not None:
                scores = score_all()
        set_phase(start // period if what == "alternate" else 0)
        for step in range(start, cfg.steps):
            if stop_after is not None and step >= stop_after:
                raise _Stopped(step)
            if what == "alternate" and step > 0 and step % period == 0:
                set_phase(step // period)
            if cfg.subset is not None and step > 0 and step % period == 0:
                now = score_all()
                importance = [abs(a - b) for a, b in zip(now, scores, strict=True)]
                keep = max(1, math.ceil(cfg.subset * source.n))
                top = sorted(range(source.n), key=lambda i: (-importance[i], i))[:keep]
                scores = now
                order.choose(sorted(top), step * cfg.accumulate)
                report.subsets.append(sorted(top))
            rate = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
            loss_value, tokens = _step(
                wrapped,
                model,
                source,
                order,
                parallel,
                cfg,
                step,
                optimizer,
                params,
                dropped,
                hooks,
                rate,
                decoder,
                device,
            )
            for h in hooks:
                h.after_step(model, step)
            report.losses.append(loss_value)
            report.tokens += tokens
            done = step + 1
            if cfg.eval_every is not None and done % cfg.eval_every == 0 and done < cfg.steps:
                evaluate(done)
                if (
                    cfg.stop_early
                    and contracts_hold is not None
                    and contracts_hold(report.evals[-1]["drift"])
                ):
                    report.stopped_early = True
                    save(done, True)
                    break
            if (
                cfg.checkpoint_every is not None
                and done % cfg.checkpoint_every == 0
                and done < cfg.steps
            ):
                save(done, False)
            if context.progress is not None:
                elapsed = time.perf_counter() - started
                rate_text = (
                    f"{report.tokens / max(elapsed, 1e-9):,.0f} tok/s"
                    if report.tokens
                    else f"{(done - start) / max(elapsed, 1e-9):.2f} steps/s"
                )
                eta = (cfg.steps - done) * elapsed / max(1, done - start)
                context.progress(
                    f"healing · loss {loss_value:.4g} · {rate_text} · ETA {_clock(eta)}",
                    done,
                    cfg.steps,
                )
        if not report.stopped_early and start < cfg.steps:
            if held is not None and (
                not report.evals or report.evals[-1]["step"] != len(report.losses)
            ):
                evaluate(len(report.losses))
            if cfg.checkpoint_every is not None:
                save(len(report.losses), True)
        if best is not None and report.best_step != len(report.losses):
            _load_full_state(model, best)
    finally:
        stack.close()
        model.eval()
        teacher.train(teacher_was_training)
    report.steps = len(report.losses)
    report.seconds = time.perf_counter() - started + seconds_before
    return report


class _Stopped(Exception):
    """``stop_after`` reached: the run ends as a killed one would (tests of resume)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped before step {step + 1}")
        self.step = step


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _step(
    wrapped: nn.Module,
    model: nn.Module,
    source: _Source,
    order: _Order,
    parallel: Parallel,
    cfg: HealConfig,
    step: int,
    optimizer: torch.optim.Optimizer | None,
    params: list[nn.Parameter],
    dropped: list[nn.Parameter],
    hooks: list[TrainingHook],
    rate: float,
    decoder: bool,
    device: torch.device,
) -> tuple[float, int]:
    """One optimizer step over ``accumulate`` micro-batches; (mean loss over the global batch,
    tokens of all ranks). The gradients of ``dropped`` are discarded before the update. Under
    DDP every micro-batch but the last accumulates without the gradient all-reduce."""
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["lr"] = rate
        optimizer.zero_grad(set_to_none=True)
    total = 0.0
    tokens = 0
    for micro in range(cfg.accumulate):
        k = step * cfg.accumulate + micro
        mine = parallel.shard(order.indices(k))
        ins, labels = source.inputs(mine)
        mask = padding_mask(ins)
        ids = ins.kwargs.get("input_ids")
        if isinstance(ids, Tensor):
            tokens += int(mask.sum()) if mask is not None else ids.numel()
        ref = source.teacher(mine, ins)
        no_sync = getattr(wrapped, "no_sync", None)
        local = (
            no_sync()
            if callable(no_sync) and micro < cfg.accumulate - 1
            else contextlib.nullcontext()
        )
        with torch.enable_grad(), local:
            with _autocast(device):
                out = wrapped(*ins.args, **ins.kwargs)
            loss = _loss(out, ref, ins, labels, mask, cfg, decoder, parallel)
            extra = None
            for h in hooks:
                term = h.loss(model)
                if term is not None:
                    extra = term if extra is None else extra + term
            objective = loss if extra is None else loss + extra
            if optimizer is not None and objective.requires_grad:
                (objective / cfg.accumulate).backward()
        total += float(loss.detach()) / cfg.accumulate
    if optimizer is not None:
        for p in dropped:
            p.grad = None
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        optimizer.step()
    return parallel.all_mean(total), int(parallel.all_mean(float(tokens)) * parallel.world)


def _loss(
    out: Any,
    ref: Any,
    ins: Inputs,
    labels: Tensor | None,
    mask: Tensor | None,
    cfg: HealConfig,
    decoder: bool,
    parallel: Parallel,
) -> Tensor:
    """The weighted loss of one micro-batch (see `surgery.heal_losses`): this rank's share of
    the loss of the global micro-batch, so that the mean over ranks is that loss. ``mse``
    divides by the mean over ranks of the teacher's ``Σ‖y₀‖²``, and a mean over tokens is
    rescaled by this rank's token count over the mean count (shards are padded apart)."""

    def global_mean(value: Tensor, count: float) -> Tensor:
        if parallel.world == 1:
            return value
        return value * (count / parallel.all_mean(count))

    loss = torch.zeros((), dtype=torch.float64)
    if cfg.mse:
        teacher_out = float_outputs(ref)
        scale = parallel.all_mean(teacher_scale(teacher_out, mask))
        loss = loss + cfg.mse * mse_loss(out, teacher_out, mask, scale)
    if cfg.kl or cfg.task:
        logits = logits_of(out)
        if logits is None:
            raise HealDataError(
                "`kl` and `task` need a model with an LM or classification head (logits)",
                "kl" if cfg.kl else "task",
                "use `mse` for models without logits",
            )
        if cfg.kl:
            ref_logits = logits_of(ref)
            assert ref_logits is not None
            kl = kl_loss(logits, ref_logits, mask, cfg.temperature)
            kl = global_mean(kl, positions(logits.shape[:-1], mask))
            loss = loss + cfg.kl * kl.double()
        if cfg.task:
            if decoder:
                task = next_token_loss(logits, ins.kwargs["input_ids"], mask)
                shifted = mask[:, 1:] if mask is not None else None
                task = global_mean(task, positions(logits[:, 1:].shape[:-1], shifted))
            else:
                assert labels is not None
                task = label_loss(logits, labels)
            loss = loss + cfg.task * task.double()
    return loss
