"""Healing under torchrun (``surgery.distributed``): real ``torchrun`` launches on gloo, and a
one-rank gloo group in this process for what needs no second rank.

Each launch costs 5–20 s of wall time on 2 busy cores (mostly importing torch in the launcher
and each worker): the DDP launch is the one fast case; the FSDP2 and resume launches are
marked slow.

Tolerance: 2 ranks compute the same update as one process up to float32 reassociation (the
mean of two shard means instead of one mean; a gradient all-reduce). Measured differences on
this model are ~1e-8 absolute in the loss and ~1e-7 in the weights; the tests allow a relative
1e-5 on losses (absolute 1e-7) and 1e-4 on weights (absolute 1e-5): two orders of margin, and
still far below any real divergence (a wrong shard, a gradient summed instead of averaged, a
missed all-reduce or a wrong resume all move the loss in its second or third digit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from surgery.distributed import (
    STATE_FILE,
    TorchrunParallel,
    find_blocks,
    split_batch,
    torchrun_env,
)
from tests.distributed_worker import (
    DEFAULT_CONFIG,
    TinyNet,
    build,
    dataset,
    reference,
    train_steps,
    trainer_run,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-7
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 1e-5
STEPS = 8
SAVE_AT = 4


def torchrun(nproc: int, *args: str, timeout: int = 240) -> None:
    """``torchrun --standalone`` (a free port each time) with ``nproc`` gloo processes."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", str(WORKER), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"torchrun failed:\n{r.stdout[-3000:]}{r.stderr[-6000:]}")


def audited(tmp: Path) -> list[str]:
    root, log = tmp / "root", tmp / "log"
    root.mkdir()
    log.mkdir()
    return ["--audit", str(root), "--audit-log", str(log)]


def writes(tmp: Path, rank: int) -> set[str]:
    """The files rank ``rank`` created or wrote under ``tmp/root`` (not directories)."""
    events = json.loads((tmp / "log" / f"rank{rank}.json").read_text())
    return {path for event, path in events if event != "os.mkdir"}


def close(actual: list[float], expected: list[float]) -> None:
    torch.testing.assert_close(
        torch.tensor(actual), torch.tensor(expected), rtol=LOSS_RTOL, atol=LOSS_ATOL
    )


@pytest.fixture(scope="module")
def expected() -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One process, the same global batch: losses of STEPS steps, weights after SAVE_AT and
    after STEPS steps."""
    losses, weights = reference(DEFAULT_CONFIG, [SAVE_AT, STEPS])
    return losses, weights[SAVE_AT], weights[STEPS]


# --- two real processes ----------------------------------------------------------------------


def test_ddp_on_two_ranks_equals_one_process_and_only_rank0_writes(
    tmp_path: Path, expected: Any
) -> None:
    losses, _, final = expected
    out, export = tmp_path / "result.json", tmp_path / "root" / "OUT" / "model.safetensors"
    torchrun(
        2,
        "--mode=ddp",
        f"--steps={STEPS}",
        "--check-mismatch",
        f"--export={export}",
        f"--out={out}",
        *audited(tmp_path),
    )
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["first_step"] == 0
    close(result["losses"], losses)
    healed = load_file(export)
    assert healed.keys() == final.keys()
    for name, value in final.items():
        torch.testing.assert_close(healed[name], value, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)
    # Every rank built the same model; one weight changed on rank 1 is named on every rank
    # (the result is rank 0's), and repair gives rank 1 rank 0's value.
    assert result["same_before_heal"] == []
    assert result["mismatch_named"] == ["blocks.0.fc1.weight"]
    assert result["repaired"] == ["blocks.0.fc1.weight"]
    assert result["same_after_repair"] == []
    assert "ranks [1] hold a model of another structure" in result["structure_mismatch"]
    assert writes(tmp_path, 0) == {"OUT/model.safetensors"}
    assert writes(tmp_path, 1) == set()


@pytest.fixture(scope="module")
def fsdp2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FSDP2 on 2 ranks: SAVE_AT steps, a sharded checkpoint in root/ckpt, the gathered
    weights in root/OUT."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    torchrun(
        2,
        "--mode=fsdp2",
        f"--save-at={SAVE_AT}",
        f"--save-dir={tmp / 'root' / 'ckpt'}",
        f"--export={tmp / 'root' / 'OUT' / 'model.safetensors'}",
        f"--out={tmp / 'result.json'}",
        *audited(tmp),
    )
    return tmp


@pytest.mark.slow
def test_fsdp2_on_two_ranks_equals_one_process(fsdp2_checkpoint: Path, expected: Any) -> None:
    losses, middle, _ = expected
    result = json.loads((fsdp2_checkpoint / "result.json").read_text())
    assert result["world"] == 2 and result["mode"] == "fsdp2"
    close(result["losses"], losses[:SAVE_AT])
    assert result["unwrapped_type"] == "TinyNet"  # a plain module again, not the FSDP subclass
    healed = load_file(fsdp2_checkpoint / "root" / "OUT" / "model.safetensors")
    for name, value in middle.items():
        torch.testing.assert_close(healed[name], value, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)


@pytest.mark.slow
def test_fsdp2_checkpoint_is_sharded_and_rank1_writes_only_its_shards(
    fsdp2_checkpoint: Path,
) -> None:
    ckpt = fsdp2_checkpoint / "root" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        STATE_FILE,
    ]
    state = json.loads((ckpt / STATE_FILE).read_text())
    assert state["world"] == 2 and state["state"]["step"] == SAVE_AT
    assert writes(fsdp2_checkpoint, 1) == {"ckpt/__1_0.distcp"}
    rank0 = writes(fsdp2_checkpoint, 0)
    assert {"ckpt/__0_0.distcp", "ckpt/.metadata", f"ckpt/{STATE_FILE}"} <= rank0
    assert "OUT/model.safetensors" in rank0


@pytest.mark.slow
def test_checkpoint_of_two_ranks_resumes_on_one(
    fsdp2_checkpoint: Path, expected: Any, tmp_path: Path
) -> None:
    losses, _, _ = expected
    out = tmp_path / "resumed.json"
    ckpt = fsdp2_checkpoint / "root" / "ckpt"
    torchrun(1, "--mode=fsdp2", f"--steps={STEPS}", f"--resume={ckpt}", f"--out={out}")
    result = json.loads(out.read_text())
    assert result["world"] == 1 and result["first_step"] == SAVE_AT
    assert result["resumed_state"]["step"] == SAVE_AT
    close(result["losses"], losses[SAVE_AT:])


@pytest.mark.slow
def test_checkpoint_of_one_rank_resumes_on_two(expected: Any, tmp_path: Path) -> None:
    """Saved by one DDP rank, resumed sharded (FSDP2) on two: the checkpoint holds the
    unwrapped model's names, so neither the rank count nor the mode is baked into it."""
    losses, _, _ = expected
    ckpt = tmp_path / "ckpt"
    torchrun(1, "--mode=ddp", f"--save-at={SAVE_AT}", f"--save-dir={ckpt}")
    out = tmp_path / "resumed.json"
    torchrun(2, "--mode=fsdp2", f"--steps={STEPS}", f"--resume={ckpt}", f"--out={out}")
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["first_step"] == SAVE_AT
    close(result["losses"], losses[SAVE_AT:])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "case"),
    [("ddp", "mse"), ("fsdp2", "mse"), ("ddp", "freeze"), ("fsdp2", "freeze"), ("fsdp2", "kl")],
)
def test_the_trainer_on_two_ranks_equals_one_process(tmp_path: Path, mode: str, case: str) -> None:
    """`surgery.heal.heal` itself, through TorchrunParallel, against its one-process run: the
    losses, the held-out evaluations, the kept step and the healed weights (see
    `distributed_worker.TRAINER_CASES` for what each case exercises)."""
    from tests.test_heal_data import sentences

    (tmp_path / "train.txt").write_text("\n".join(sentences(40)) + "\n")
    alone, healed = trainer_run(None, tmp_path, case)
    out, export = tmp_path / "result.json", tmp_path / "healed.safetensors"
    torchrun(
        2,
        f"--mode={mode}",
        f"--trainer={tmp_path}",
        f"--case={case}",
        f"--export={export}",
        f"--out={out}",
    )
    result = json.loads(out.read_text())
    close(result["losses"], alone["losses"])
    assert result["best_step"] == alone["best_step"]
    assert [e["step"] for e in result["evals"]] == [e["step"] for e in alone["evals"]]
    close([e["drift"] for e in result["evals"]], [e["drift"] for e in alone["evals"]])
    weights = load_file(export)
    expected = healed.state_dict()
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)


# --- one rank, in this process -------------------------------------------------------------


@pytest.fixture
def group() -> Iterator[None]:
    """A one-rank gloo process group (what ``torchrun --nproc_per_node 1`` gives)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class Tied(nn.Module):
    """Input and output embeddings share one weight, as in most language models."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) * self.scale
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_fsdp2_unwrap_gives_the_plain_model_back_with_ties(group: None) -> None:
    torch.manual_seed(0)
    plain_run = Tied()
    sharded = Tied()
    sharded.load_state_dict(plain_run.state_dict())
    ids = torch.randint(0, 10, (4, 5))
    parallel = TorchrunParallel("fsdp2")
    wrapped = parallel.wrap(sharded)
    for model in (plain_run, wrapped):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            model(ids).logsumexp(-1).mean().backward()
            opt.step()
    assert type(next(wrapped.parameters())).__name__ == "DTensor"
    back = parallel.unwrap(wrapped)
    assert type(back) is Tied
    assert all(type(p) is nn.Parameter for p in back.parameters())
    assert back.head.weight is back.embed.weight
    assert float(back.get_buffer("scale")) == 2.0  # a non-persistent buffer survives
    for (name, p), q in zip(back.named_parameters(), plain_run.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=name)
    torch.testing.assert_close(back(ids), plain_run(ids), rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)


def test_a_ddp_checkpoint_loads_into_fsdp2_and_continues_alike(group: None, tmp_path: Path) -> None:
    data = dataset(DEFAULT_CONFIG)
    batch = DEFAULT_CONFIG["batch"]
    ddp = TorchrunParallel("ddp")
    model = ddp.wrap(build(DEFAULT_CONFIG, seed=0))
    opt = torch.optim.AdamW(model.parameters(), lr=DEFAULT_CONFIG["lr"])
    train_steps(ddp, model, opt, data, first=0, last=3, batch=batch)
    ddp.save(tmp_path, model, opt, {"step": 3, "note": "x"})
    continued = train_steps(ddp, model, opt, data, first=3, last=6, batch=batch)

    fsdp = TorchrunParallel("fsdp2")
    other = fsdp.wrap(build(DEFAULT_CONFIG, seed=5))  # other weights, overwritten by load
    opt2 = torch.optim.AdamW(other.parameters(), lr=DEFAULT_CONFIG["lr"])
    assert fsdp.load(tmp_path, other, opt2) == {"step": 3, "note": "x"}
    close(train_steps(fsdp, other, opt2, data, first=3, last=6, batch=batch), continued)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_a_parameter_frozen_until_the_checkpoint_resumes_without_optimizer_state(
    group: None, tmp_path: Path, mode: str
) -> None:
    """Freezing by leaving a gradient None (how a phase of `freeze alternate` runs under DDP):
    the frozen parameter has no AdamW state at the checkpoint, and must have none after it, or
    its first real step would be bias-corrected as a second one."""
    x, y = dataset(DEFAULT_CONFIG)

    def steps(parallel: TorchrunParallel, model: nn.Module, opt: Any, freeze: bool) -> list[float]:
        losses = []
        for step in range(2):
            idx = parallel.shard(list(range(step * 8, step * 8 + 8)))
            loss = (model(x[idx]) - y[idx]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if freeze:
                for p in model.parameters():
                    if p.ndim == 2 and p.shape[1] == DEFAULT_CONFIG["features"]:
                        p.grad = None  # the input layer: frozen
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    parallel = TorchrunParallel(mode)
    model = parallel.wrap(build(DEFAULT_CONFIG, seed=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    steps(parallel, model, opt, freeze=True)
    parallel.save(tmp_path, model, opt, {"step": 2})
    saved_states = len(opt.state)
    continued = steps(parallel, model, opt, freeze=False)

    again = TorchrunParallel(mode)
    fresh = again.wrap(build(DEFAULT_CONFIG, seed=3))
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    again.load(tmp_path, fresh, opt2)
    assert len(opt2.state) == saved_states == len(list(fresh.parameters())) - 1
    assert steps(again, fresh, opt2, freeze=False) == continued


def test_state_must_be_json_and_an_incomplete_checkpoint_is_refused(
    group: None, tmp_path: Path
) -> None:
    parallel = TorchrunParallel("ddp")
    model = parallel.wrap(build(DEFAULT_CONFIG, seed=0))
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="trainer state of a checkpoint must be JSON"):
        parallel.save(tmp_path / "bad", model, opt, {"rng": torch.get_rng_state()})
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    with pytest.raises(FileNotFoundError, match="no complete distributed checkpoint"):
        parallel.load(tmp_path, model, opt)


def test_wrap_and_check_on_one_rank(group: None) -> None:
    with pytest.raises(ValueError, match="unknown parallel mode `zero3`: expected ddp or fsdp2"):
        TorchrunParallel("zero3")
    parallel = TorchrunParallel("ddp")
    assert (parallel.rank, parallel.world, parallel.is_writer) == (0, 1, True)
    assert parallel.all_mean(0.25) == 0.25
    frozen = build(DEFAULT_CONFIG, seed=0).requires_grad_(False)
    assert parallel.wrap(frozen) is frozen  # nothing to synchronise: DDP would refuse it
    assert parallel.check_same(frozen) == []
    # Given blocks are sharded one by one (each becomes an FSDP module), the rest with the root.
    model = build(DEFAULT_CONFIG, seed=0)
    TorchrunParallel("fsdp2", blocks=[model.blocks[1]]).wrap(model)
    kinds = [type(m).__name__ for m in (model, model.blocks[0], model.blocks[1])]
    assert kinds == ["FSDPTinyNet", "Block", "FSDPBlock"]


def test_regularize_is_refused_with_sharded_parameters(group: None) -> None:
    """A `regularize` loss reads whole weights outside forward: not with FSDP2's shards."""
    from surgery.heal import HealDataError, heal
    from surgery.parse import parse
    from tests.test_heal import _setup

    _, student, ctx = _setup()
    regularize = parse("regularize nuclear 1e-3").statements[0]
    with pytest.raises(HealDataError, match="sharded") as err:
        heal(
            student,
            parse("heal steps 2").statements[0],  # type: ignore[arg-type]
            ctx,
            freeze=None,
            hooks=[],
            regularizers=[regularize],  # type: ignore[list-item]
            parallel=TorchrunParallel("fsdp2"),
        )
    assert err.value.node == "steps" and "ddp" in (err.value.help or "")


# --- no process group ------------------------------------------------------------------------


def test_torchrun_environment() -> None:
    assert torchrun_env({"PATH": "/bin"}) is None
    env = torchrun_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "node0",
            "MASTER_PORT": "29500",
        }
    )
    assert env is not None and (env.rank, env.world, env.local_rank, env.master_port) == (
        3,
        4,
        1,
        29500,
    )
    with pytest.raises(ValueError, match="RANK 4 of WORLD_SIZE 4"):
        torchrun_env(
            {
                "RANK": "4",
                "WORLD_SIZE": "4",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "a",
                "MASTER_PORT": "1",
            }
        )
    with pytest.raises(ValueError, match="malformed"):
        torchrun_env(
            {
                "RANK": "x",
                "WORLD_SIZE": "4",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "a",
                "MASTER_PORT": "1",
            }
        )


def test_batches_split_contiguously_and_evenly() -> None:
    shares = [split_batch(list(range(10, 22)), rank=r, world=4) for r in range(4)]
    assert shares == [[10, 11, 12], [13, 14, 15], [16, 17, 18], [19, 20, 21]]
    with pytest.raises(ValueError, match="12 examples does not split evenly over 5 ranks"):
        split_batch(range(12), rank=0, world=5)


def test_blocks_are_the_outermost_repeated_children() -> None:
    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))  # inside a block

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixed = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()])  # not repeated
            self.layer = nn.ModuleList(Layer() for _ in range(3))
            self.encoder = nn.Module()
            self.encoder.layer = self.layer  # blocks are found by module, once each
            self.single = nn.ModuleList([Layer()])  # a one-layer stack

    net = Net()
    assert find_blocks(net) == [*net.layer, net.single[0]]
    assert find_blocks(TinyNet(4, 8, 2, 4))[0].__class__.__name__ == "Block"
