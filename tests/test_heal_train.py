"""The trainer on a training set: resume equals an uninterrupted run, frozen factors stay,
the held-out split is never trained on, KL and task losses on a tiny decoder."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import nn

from surgery.heal import HealReport, SingleProcess, _Stopped, heal, lr_at
from surgery.heal_data import TrainingData
from surgery.lowrank import svd_factors
from surgery.modules import LowRankLinear
from surgery.parse import parse
from surgery.passes.base import PassContext
from tests.test_heal_data import (
    WORDS,
    sentences,
    tiny_classifier,
    tiny_decoder,
    tiny_encoder,
    word_tokenizer,
)


def _decomposed(model: nn.Module) -> nn.Module:
    """A copy with every feed-forward Linear replaced by a rank-2 pair, other weights noised."""
    student = copy.deepcopy(model)
    for m in list(student.modules()):
        for child_name, child in list(m.named_children()):
            if (
                isinstance(child, nn.Linear)
                and child_name == "dense"
                and max(child.weight.shape) == 64
            ):
                setattr(
                    m, child_name, LowRankLinear.from_factors(child, svd_factors(child.weight, 2))
                )
    torch.manual_seed(1)
    with torch.no_grad():  # and noise on the other weights: a drift worth healing
        for n, p in student.named_parameters():
            if n.endswith("weight") and p.dim() == 2 and "embeddings" not in n:
                p.add_(0.5 * p.std() * torch.randn_like(p))
    return student


def _run(
    teacher: nn.Module,
    student: nn.Module,
    text: str,
    base: Path,
    *,
    freeze: str | None = None,
    **kw: Any,
) -> HealReport:
    stmt = parse(text).statements[0]
    data = TrainingData.load(stmt, teacher, tokenizer=word_tokenizer(), base=base)
    ctx = PassContext(analysis=cast(Any, None), original=teacher)
    fz = parse(f"freeze {freeze}").statements[0] if freeze else None
    return heal(student, stmt, ctx, freeze=fz, hooks=[], data=data, **kw)  # type: ignore[arg-type]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    (tmp_path / "train.txt").write_text("\n".join(sentences(40)) + "\n")
    return tmp_path


def test_distillation_on_a_training_set_lowers_held_out_drift(corpus: Path) -> None:
    teacher = tiny_encoder()
    student = _decomposed(teacher)
    report = _run(
        teacher,
        student,
        'heal steps 12 on "train.txt" batch 4 eval 20% eval every 6 steps lr 0.0003 warmup 2 steps',
        corpus,
    )
    assert report.steps == 12 and report.examples == 32 and report.held_out == 8
    assert [e["step"] for e in report.evals] == [0, 6, 12]
    assert report.evals[-1]["drift"] < report.evals[0]["drift"]
    assert report.tokens > 0 and report.source == "train.txt"
    assert not student.training


def test_killed_and_resumed_equals_uninterrupted(corpus: Path) -> None:
    text = (
        'heal steps 8 on "train.txt" batch 4 accumulate 2 eval 20% eval every 2 steps '
        "lr 0.01 warmup 1 steps subset 50% every 3 steps checkpoint every 2 steps keep best seed 3"
    )
    teacher = tiny_encoder()
    start = _decomposed(teacher)

    # 8 steps × 2 × 4 examples read the 32 training examples twice: the teacher's outputs
    # are cached, and a resumed run must rebuild the very same cache.
    whole = copy.deepcopy(start)
    full = _run(teacher, whole, text, corpus, checkpoint_dir=corpus / "a", freeze="alternate")

    killed = copy.deepcopy(start)
    with pytest.raises(_Stopped):
        _run(
            teacher,
            killed,
            text,
            corpus,
            checkpoint_dir=corpus / "b",
            stop_after=5,
            freeze="alternate",
        )
    assert (corpus / "b" / "step-4" / "state.json").is_file()
    assert not (corpus / "b" / "step-2").exists()  # only the latest is kept
    resumed = copy.deepcopy(start)  # a new process rebuilds the surgered model
    again = _run(
        teacher, resumed, text, corpus, checkpoint_dir=corpus / "b", resume=True, freeze="alternate"
    )
    assert again.resumed_from == 4
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.losses == full.losses and again.evals == full.evals
    assert again.subsets == full.subsets and len(full.subsets) == 2
    assert again.best_step == full.best_step

    # A finished checkpoint resumes to the same result without training again.
    done = copy.deepcopy(start)
    third = _run(
        teacher, done, text, corpus, checkpoint_dir=corpus / "b", resume=True, freeze="alternate"
    )
    assert third.resumed_from == 8 and third.losses == full.losses
    assert all(torch.equal(a[k], v) for k, v in done.state_dict().items())


def test_resume_refuses_another_recipe(corpus: Path) -> None:
    from surgery.heal_checkpoint import CheckpointError

    teacher = tiny_encoder()
    text = 'heal steps 4 on "train.txt" batch 4 checkpoint every 2 steps'
    with pytest.raises(_Stopped):
        _run(teacher, _decomposed(teacher), text, corpus, checkpoint_dir=corpus / "c", stop_after=3)
    with pytest.raises(CheckpointError, match="another recipe or model"):
        _run(
            teacher,
            _decomposed(teacher),
            text.replace("steps 4", "steps 5"),
            corpus,
            checkpoint_dir=corpus / "c",
            resume=True,
        )


def test_frozen_factors_are_unchanged(corpus: Path) -> None:
    teacher = tiny_encoder()
    student = _decomposed(teacher)
    pairs = [m for m in student.modules() if isinstance(m, LowRankLinear)]
    assert pairs
    firsts = [m.first.weight.detach().clone() for m in pairs]
    seconds = [m.second.weight.detach().clone() for m in pairs]
    report = _run(
        teacher,
        student,
        'heal steps 3 on "train.txt" batch 4 lr 0.01',
        corpus,
        freeze="first-factor",
    )
    assert all(torch.equal(m.first.weight, f) for m, f in zip(pairs, firsts, strict=True))
    assert not any(torch.equal(m.second.weight, s) for m, s in zip(pairs, seconds, strict=True))
    assert report.frozen_params == sum(f.numel() for f in firsts)


def test_held_out_split_is_never_trained_on(tmp_path: Path) -> None:
    """Held-out rows carry the word `poison`; no training forward ever sees its token."""
    poison = word_tokenizer().convert_tokens_to_ids("poison")
    (tmp_path / "train.txt").write_text("\n".join(sentences(30)) + "\n")
    (tmp_path / "held.txt").write_text("\n".join(sentences(10, seed=1, extra=" poison")) + "\n")
    rows = sentences(20, seed=2) + sentences(20, seed=3, extra=" poison")
    (tmp_path / "mixed.txt").write_text("\n".join(rows) + "\n")
    teacher = tiny_encoder()
    for text in (
        'heal steps 8 on "train.txt" batch 4 eval on "held.txt" eval every 4 steps',
        # a share: which rows are held out is drawn; at least the poisoned ones that are
        # must never reach training
        'heal steps 8 on "mixed.txt" batch 4 eval 25% eval every 4 steps',
    ):
        student = _decomposed(teacher)
        seen: list[torch.Tensor] = []

        def record(
            module: nn.Module, args: Any, kwargs: dict[str, Any], seen: list[Any] = seen
        ) -> None:
            if torch.is_grad_enabled():  # a training forward, not an evaluation
                seen.append(kwargs["input_ids"])

        student.register_forward_pre_hook(record, with_kwargs=True)
        stmt = parse(text).statements[0]
        data = TrainingData.load(stmt, teacher, tokenizer=word_tokenizer(), base=tmp_path)
        assert data.held_out is not None
        held_ids = {tuple(x["input_ids"].tolist()) for x in data.held_out.items}
        report = heal(
            student,
            stmt,
            PassContext(analysis=cast(Any, None), original=teacher),
            freeze=None,
            hooks=[],
            data=data,
        )
        assert len(seen) == 8 and report.evals
        trained = {tuple(r[r != 0].tolist()) for batch in seen for r in batch}
        assert not trained & held_ids
        if "held.txt" in text:
            assert all(poison not in batch for batch in seen)
            assert all(poison in ids for ids in held_ids)


def test_kl_and_task_losses_on_a_tiny_decoder(corpus: Path) -> None:
    teacher = tiny_decoder()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.transformer.h.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl = _run(
        teacher,
        copy.deepcopy(student),
        'heal steps 15 on "train.txt" max length 16 batch 4 lr 0.003 loss kl 1 temperature 2',
        corpus,
    )
    assert kl.losses[-1] < 0.7 * kl.losses[0]
    task = _run(
        teacher,
        copy.deepcopy(student),
        'heal steps 15 on "train.txt" max length 16 batch 4 eval 10% lr 0.01 loss task 1 mse 0',
        corpus,
    )
    assert task.losses[-1] < task.losses[0]
    assert task.evals[-1]["perplexity"] < task.evals[0]["perplexity"]
    mixed = _run(
        teacher,
        copy.deepcopy(student),
        'heal steps 2 on "train.txt" max length 16 batch 4 loss mse 1 kl 0.5 task 0.1',
        corpus,
    )
    assert len(mixed.losses) == 2 and all(x > 0 for x in mixed.losses)


def test_task_loss_with_labels_on_a_classifier(tmp_path: Path) -> None:
    import json

    rows = [{"text": f"{w} {w} cat", "y": i % 3} for i, w in enumerate(WORDS[:24])]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = tiny_classifier()
    report = _run(
        teacher,
        copy.deepcopy(teacher),
        'heal steps 20 on "l.jsonl" label "y" batch 8 eval 25% lr 0.01 loss task 1 kl 0.1',
        tmp_path,
    )
    assert report.losses[-1] < report.losses[0]
    assert "accuracy" in report.evals[-1]


def test_kl_without_logits_is_a_data_error(corpus: Path) -> None:
    from surgery.heal_data import HealDataError

    teacher = tiny_encoder()
    with pytest.raises(HealDataError, match="logits") as err:
        _run(teacher, copy.deepcopy(teacher), 'heal steps 2 on "train.txt" loss kl 1', corpus)
    assert err.value.node == "kl"


def test_schedule_and_single_process() -> None:
    assert lr_at(0, 100, 1.0, 0) == 1.0
    assert lr_at(99, 100, 1.0, 0) == pytest.approx(0.1)
    assert lr_at(4, 100, 1.0, 10) == pytest.approx(0.5)
    p = SingleProcess()
    assert p.shard(list(range(4))) == [0, 1, 2, 3] and p.wrap(nn.Linear(1, 1)) is not None
