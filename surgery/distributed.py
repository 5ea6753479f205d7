"""Healing under ``torchrun``: data-parallel (DDP) or sharded (FSDP2) on PyTorch's own stack.

``torchrun --nproc_per_node N -m surgery apply …`` starts N processes with the environment
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``.
:func:`torchrun_env` reads it, :func:`init_distributed` joins the process group (NCCL on CUDA,
gloo on CPU) and :func:`shutdown` leaves it; :func:`torchrun_parallel` does both around a
block. :class:`TorchrunParallel` is the trainer's ``parallel`` object (the ``Parallel``
protocol of ``surgery/heal.py``):

* ``wrap`` — ``DistributedDataParallel`` (``mode="ddp"``), or
  ``torch.distributed.fsdp.fully_shard`` on every transformer block and then on the root
  (``mode="fsdp2"``). Blocks are found generically (:func:`find_blocks`: the children of an
  ``nn.ModuleList`` whose children are all of one class, outermost lists only) or given.
* ``shard`` — this rank's contiguous equal share of one global batch's example indices.
* ``all_mean`` — the mean of a Python float over the ranks.
* ``save`` / ``load`` — a checkpoint in the ``torch.distributed.checkpoint`` format: model and
  optimizer state through ``get_state_dict`` / ``set_state_dict`` (fully qualified names of the
  unwrapped model, so a checkpoint is independent of the wrapper and of the number of ranks),
  plus the trainer's JSON-able ``state``, written by rank 0 as JSON. It loads on another number
  of ranks (and in the other mode). Under FSDP2 every rank writes the file of its own shards
  (that is what a sharded checkpoint is); under DDP the state is replicated, so rank 0 alone
  writes it. Everything else (the JSON, the checkpoint metadata, ``OUT/``) is rank 0's.
* ``check_same`` — every rank must build the same surgered model before healing: an exact
  checksum of every parameter and buffer, all-gathered, names the tensors that differ (or
  broadcasts rank 0's, with ``repair=True``).
* ``unwrap`` — the healed model as a plain module with full weights on every rank (FSDP2:
  gathered into a copy of the structure kept at ``wrap``), for the passes, drift, timing and
  saving that follow.

HF ``accelerate`` is not used. It is a layer over these same torch calls (its launcher starts
torchrun, its ``Accelerator`` wraps with DDP or FSDP and saves through
``torch.distributed.checkpoint``) with its own configuration files and global state; it is not
a dependency of this project, and what it would save here is a few dozen lines, against a
second configuration surface beside the recipe. The torch calls below are what the tests run,
on CPU with gloo.

>>> torchrun_env({})  # not launched by torchrun
>>> env = torchrun_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
...                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
>>> env.rank, env.world, env.is_writer
(1, 2, False)
>>> split_batch(list(range(8)), rank=1, world=2)
[4, 5, 6, 7]
"""

from __future__ import annotations

import copy
import json
import os
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODES",
    "STATE_FILE",
    "RankMismatchError",
    "TorchrunEnv",
    "TorchrunParallel",
    "find_blocks",
    "init_distributed",
    "parallel_from_env",
    "shutdown",
    "split_batch",
    "torchrun_env",
    "torchrun_parallel",
]

#: The ways of running a heal over several processes: replicated (DDP) or sharded (FSDP2).
MODES = ("ddp", "fsdp2")
#: The trainer's state, next to the torch.distributed.checkpoint files of one checkpoint.
STATE_FILE = "state.json"
#: Written into :data:`STATE_FILE`; a checkpoint of another format is refused on load.
CHECKPOINT_FORMAT = "surgery-distributed-checkpoint/1"

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Elements per checksum chunk: bounds the temporary int64 copies at 2 × 128 MiB.
_CHUNK = 1 << 24


@dataclass(frozen=True)
class TorchrunEnv:
    """Where this process stands in a torchrun launch."""

    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv | None:
    """The torchrun environment of this process, or ``None`` when it was not launched by
    torchrun. A partial or malformed environment is an error, not a single process: it means a
    launcher was misconfigured, and guessing would run N independent heals.

    >>> torchrun_env({"RANK": "0", "WORLD_SIZE": "2"})
    Traceback (most recent call last):
    ...
    ValueError: partial torchrun environment: LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set
    """
    environ = os.environ if environ is None else environ
    present = [k for k in _ENV_KEYS if k in environ]
    if not present:
        return None
    missing = [k for k in _ENV_KEYS if k not in environ]
    if missing:
        raise ValueError(f"partial torchrun environment: {', '.join(missing)} not set")
    try:
        rank, world, local = (int(environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        port = int(environ["MASTER_PORT"])
    except ValueError as exc:
        raise ValueError(f"malformed torchrun environment: {exc}") from None
    if not 0 <= rank < world:
        raise ValueError(f"malformed torchrun environment: RANK {rank} of WORLD_SIZE {world}")
    return TorchrunEnv(rank, world, local, environ["MASTER_ADDR"], port)


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None) -> TorchrunEnv:
    """Join the torchrun process group (idempotent); NCCL on CUDA (each process on GPU
    ``LOCAL_RANK``), gloo on CPU, unless ``backend`` says otherwise."""
    env = torchrun_env()
    if env is None:
        raise RuntimeError(
            "not launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT unset)"
        )
    if dist.is_initialized():
        return env
    backend = backend or _default_backend()
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend)
    return env


def shutdown(*, wait: bool = False) -> None:
    """Leave the process group, if this process is in one. ``wait`` first waits for every
    rank (on the normal way out: gloo aborts a peer still at work when one rank destroys the
    group early); a failed rank leaves without waiting, or the others would wait forever."""
    if not dist.is_initialized():
        return
    try:
        if wait:
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()
    finally:
        dist.destroy_process_group()


def split_batch(indices: Sequence[int], *, rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous equal share of one global batch.

    >>> split_batch(range(6), rank=0, world=3)
    [0, 1]
    >>> split_batch(range(5), rank=0, world=2)
    Traceback (most recent call last):
    ...
    ValueError: a global batch of 5 examples does not split evenly over 2 ranks: make it a multiple of 2
    """
    n = len(indices)
    if n % world:
        raise ValueError(
            f"a global batch of {n} examples does not split evenly over {world} ranks: "
            f"make it a multiple of {world}"
        )
    k = n // world
    return [int(i) for i in list(indices)[rank * k : (rank + 1) * k]]


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: the children of every ``nn.ModuleList`` whose
    children are all of one class (a stack of layers, of one layer in a one-layer model), not
    inside a block already found (so a block's own lists, e.g. of attention heads, stay inside
    it). The choice only sets FSDP2's granularity (what is gathered at once), never results.

    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed = nn.Linear(4, 4)
    ...         self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in range(3))
    >>> [type(b).__name__ for b in find_blocks(Net())]
    ['Sequential', 'Sequential', 'Sequential']
    """
    blocks: list[nn.Module] = []
    inside: set[str] = set()
    for path, module in model.named_modules():
        if any(path == p or path.startswith(p + ".") for p in inside):
            continue
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        children = list(module.named_children())
        if len({type(c) for _, c in children}) != 1:
            continue
        for name, child in children:
            blocks.append(child)
            inside.add(f"{path}.{name}" if path else name)
    return blocks


class RankMismatchError(RuntimeError):
    """The ranks do not hold the same model: ``names`` are the tensors that differ."""

    def __init__(self, message: str, names: list[str]) -> None:
        super().__init__(message)
        self.names = names


def _checksum(t: Tensor) -> Tensor:
    """Two int64 sums of the tensor's bytes read as 32-bit words, plain and weighted by
    position. Integer sums (wrapping) do not depend on the order of reduction, so two ranks
    holding the same bytes always agree; different bytes agree only by coincidence (a checksum
    to catch a rank that computed differently, not a cryptographic hash)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    words = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw.to(torch.int32)
    out = torch.zeros(2, dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), _CHUNK):
        w = words[start : start + _CHUNK].to(torch.int64)
        position = torch.arange(start, start + w.numel(), device=w.device) % 65521 + 1
        out[0] += w.sum()
        out[1] += (w * position).sum()
    return out


class TorchrunParallel:
    """The trainer's ``parallel`` under torchrun (see the module docstring). Needs the process
    group (:func:`init_distributed`); ``mode`` is ``"ddp"`` or ``"fsdp2"``; ``blocks`` (FSDP2)
    are the modules sharded one by one, found by :func:`find_blocks` when not given.

    The model handed to :meth:`wrap` is moved to :attr:`device` (``cuda:LOCAL_RANK`` under
    NCCL); the trainer's inputs and teacher go there too. Under FSDP2 ``wrap`` replaces the
    model's parameters by sharded ones: build the optimizer from the parameters after ``wrap``.
    """

    def __init__(self, mode: str = "ddp", *, blocks: Sequence[nn.Module] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown parallel mode `{mode}`: expected {' or '.join(MODES)}")
        if not dist.is_initialized():
            raise RuntimeError("TorchrunParallel needs the process group: call init_distributed()")
        self.mode = mode
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.backend = str(dist.get_backend())
        if self.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self._blocks = list(blocks) if blocks is not None else None
        self._skeleton: nn.Module | None = None  # FSDP2: the unsharded structure, weights on meta
        self._home: torch.device | None = None  # where the parameters were before `wrap`

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    # --- the trainer's protocol ------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the trainer calls forward/backward on (see the class docstring)."""
        first = next(model.parameters(), None)
        self._home = first.device if first is not None else torch.device("cpu")
        if self.mode == "fsdp2":
            self._skeleton = _meta_copy(model)
        model.to(self.device)
        if self.mode == "ddp":
            if not any(p.requires_grad for p in model.parameters()):
                # Nothing trains: DDP refuses such a model, and there is nothing to synchronise.
                return model
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        blocks = self._blocks if self._blocks is not None else find_blocks(model)
        mesh = init_device_mesh(self.device.type, (self.world,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def shard(self, indices: Sequence[int]) -> list[int]:
        return split_batch(indices, rank=self.rank, world=self.world)

    def all_mean(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world

    def save(
        self,
        directory: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
    ) -> None:
        """Write one checkpoint into ``directory`` (a path every rank sees: a shared file
        system across machines). All ranks call it; it returns when the checkpoint is whole."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        directory = Path(directory)
        # Checked on every rank before any collective: a rank that raised alone would leave
        # the others waiting in the save forever.
        text = _state_json(state, world=self.world, mode=self.mode)
        if self.is_writer:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / STATE_FILE).unlink(missing_ok=True)  # marks the checkpoint incomplete
        self.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        content = {"model": model_state, "optimizer": optim_state}
        if self.mode == "fsdp2":
            dcp.save(content, checkpoint_id=directory)
        elif self.is_writer:
            # Replicated state: one copy, written by rank 0 without collectives (DCP warns
            # that it assumes a single process: here that is the intent).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.save(content, checkpoint_id=directory, no_dist=True)
        self.barrier()
        if self.is_writer:
            # Written last, by atomic rename: its presence means the checkpoint is complete.
            tmp = directory / (STATE_FILE + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, directory / STATE_FILE)
        self.barrier()

    def load(
        self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """Restore what :meth:`save` wrote (by any number of ranks, in either mode) into the
        wrapped ``model`` and its ``optimizer``; return the trainer's ``state``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
            set_state_dict,
        )

        directory = Path(directory)
        envelope = _read_state(directory)
        model_state, optim_state = get_state_dict(model, optimizer)
        # A parameter that had no optimizer state when saved (frozen so far: its gradient was
        # None at every step) must have none after loading, as in the run that was not
        # interrupted; `get_state_dict` has just made one for every parameter.
        saved = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
        per_param = optim_state["state"]
        assert isinstance(per_param, dict)
        for name in list(per_param):
            if not any(key.startswith(f"optimizer.state.{name}.") for key in saved):
                del per_param[name]
        content = {"model": model_state, "optimizer": optim_state}
        dcp.load(content, checkpoint_id=directory)
        # Not strict: the optimizer state may lack parameters (above); the model's state is
        # complete, `dcp.load` having refused a checkpoint without any of its tensors.
        set_state_dict(
            model,
            optimizer,
            model_state_dict=model_state,
            optim_state_dict=optim_state,
            options=StateDictOptions(strict=False),
        )
        state: dict[str, Any] = envelope["state"]
        return state

    # --- around the protocol: before and after healing ------------------------------------

    def check_same(self, model: nn.Module, *, repair: bool = False) -> list[str]:
        """Check that every rank holds the same ``model`` (unwrapped: call before
        :meth:`wrap`), bit for bit. Returns the names of the parameters and buffers that differ
        from rank 0's (empty when all agree); raises :class:`RankMismatchError` naming them,
        unless ``repair``, which copies rank 0's values to every rank instead. Every rank
        reaches the same verdict (they all see all checksums), so none is left waiting."""
        tensors = [*model.named_parameters(), *model.named_buffers()]
        names = [n for n, _ in tensors]
        layout = zlib.crc32(
            "\n".join(f"{n}:{t.dtype}:{tuple(t.shape)}" for n, t in tensors).encode()
        )
        head = torch.tensor([len(tensors), layout], dtype=torch.int64, device=self.device)
        heads = [torch.empty_like(head) for _ in range(self.world)]
        dist.all_gather(heads, head)
        if any(not torch.equal(h, heads[0]) for h in heads):
            differ = [r for r, h in enumerate(heads) if not torch.equal(h, heads[0])]
            raise RankMismatchError(
                f"ranks {differ} hold a model of another structure than rank 0 (names, dtypes "
                "or shapes of the parameters differ): every rank must build the same surgered "
                "model (same recipe, model and seed)",
                [],
            )
        sums = torch.stack([_checksum(t).to(self.device) for _, t in tensors]) if tensors else None
        if sums is None:
            return []
        gathered = [torch.empty_like(sums) for _ in range(self.world)]
        dist.all_gather(gathered, sums)
        differs = torch.zeros(len(tensors), dtype=torch.bool, device=self.device)
        for other in gathered[1:]:
            differs |= (other != gathered[0]).any(dim=1)
        bad = [names[i] for i in differs.nonzero().flatten().tolist()]
        if not bad:
            return []
        if not repair:
            shown = ", ".join(f"`{n}`" for n in bad[:5]) + (" …" if len(bad) > 5 else "")
            raise RankMismatchError(
                f"{len(bad)} tensor(s) differ between ranks: {shown}; every rank must build the "
                "same surgered model (same recipe, model and seed; a non-deterministic pass "
                "breaks this)",
                bad,
            )
        wanted = set(bad)
        with torch.no_grad():
            for name, t in tensors:
                if name in wanted:
                    moved = t.detach().to(self.device)
                    dist.broadcast(moved, src=0)
                    t.copy_(moved)
        return bad

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The healed model as a plain module with full weights, on every rank, on the device
        its parameters had before :meth:`wrap` (``model`` is what ``wrap`` returned). DDP: the
        module inside. FSDP2: a collective; the sharded ``model`` should be dropped after it."""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            inner: nn.Module = model.module
            return inner.to(self._home) if self._home is not None else inner
        if self.mode == "ddp":
            return model.to(self._home) if self._home is not None else model
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        if self._skeleton is None:
            raise RuntimeError("unwrap() of a model this TorchrunParallel did not wrap")
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        home = self._home or torch.device("cpu")
        plain = self._skeleton
        self._skeleton = None
        # A gathered tensor may be a view into one flat all-gather buffer; a copy of its own
        # lets the model be saved (safetensors refuses a tensor covering part of a storage).
        _fill(
            plain,
            {
                k: v.detach().to(home).clone(memory_format=torch.contiguous_format)
                for k, v in full.items()
                if isinstance(v, Tensor)
            },
        )
        return plain


def parallel_from_env(
    mode: str | None = None, *, backend: str | None = None, environ: Mapping[str, str] | None = None
) -> TorchrunParallel | None:
    """The ``parallel`` of this process: under torchrun, a :class:`TorchrunParallel` in
    ``mode`` (default ``"ddp"``), having joined the process group (leave it with
    :func:`shutdown`); otherwise ``None`` (one process: the trainer's default). Asking for a
    mode without torchrun is an error, not a silent single-process run.

    >>> parallel_from_env(None, environ={}) is None
    True
    >>> parallel_from_env("fsdp2", environ={})
    Traceback (most recent call last):
    ...
    ValueError: parallel mode `fsdp2` needs several processes: launch with `torchrun --nproc_per_node N -m surgery …`
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown parallel mode `{mode}`: expected {' or '.join(MODES)}")
    if torchrun_env(environ) is None:
        if mode is not None:
            raise ValueError(
                f"parallel mode `{mode}` needs several processes: launch with "
                "`torchrun --nproc_per_node N -m surgery …`"
            )
        return None
    init_distributed(backend)
    return TorchrunParallel(mode or "ddp")


@contextmanager
def torchrun_parallel(
    mode: str = "ddp", *, backend: str | None = None
) -> Iterator[TorchrunParallel]:
    """Join the torchrun process group for the block and leave it after (if it joined it)."""
    joined = not dist.is_initialized()
    init_distributed(backend)
    try:
        yield TorchrunParallel(mode)
    finally:
        if joined:
            shutdown()


# --- helpers ---------------------------------------------------------------------------------


def _state_json(state: dict[str, Any], *, world: int, mode: str) -> str:
    envelope = {"format": CHECKPOINT_FORMAT, "world": world, "mode": mode, "state": state}
    try:
        return json.dumps(envelope, indent=1, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"the trainer state of a checkpoint must be JSON (lists, numbers, strings): {exc}"
        ) from None


def _read_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"`{directory}` holds no complete distributed checkpoint (no {STATE_FILE}: the "
            "save did not finish, or this is not a checkpoint directory)"
        )
    envelope = json.loads(path.read_text())
    if not isinstance(envelope, dict) or envelope.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"`{path}` is not a {CHECKPOINT_FORMAT} checkpoint")
    return envelope


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters are on the meta device (no memory): the plain
    structure FSDP2 will not give back. Tied parameters stay tied (one memo entry each);
    buffers are copied as they are (they are small, and a non-persistent buffer is in no
    state dict to restore it from)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    return copy.deepcopy(model, memo)


def _fill(plain: nn.Module, full: dict[str, Tensor]) -> None:
    """Give ``plain``'s meta parameters (and persistent buffers) the values of ``full``, a
    full state dict by name; one tensor per tied parameter."""
    by_id: dict[int, nn.Parameter] = {}
    for name, p in plain.named_parameters(remove_duplicate=False):
        if id(p) not in by_id:
            if name not in full:
                raise RuntimeError(f"the gathered state has no `{name}`")
            by_id[id(p)] = nn.Parameter(full[name], requires_grad=p.requires_grad)
    for module in plain.modules():
        for key, old in list(module._parameters.items()):
            if old is not None:
                module._parameters[key] = by_id[id(old)]
    with torch.no_grad():
        for name, b in plain.named_buffers():
            if name in full:
                b.copy_(full[name])
