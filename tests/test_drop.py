"""`drop attention|mlp N`: identity at 0, residual pass-through per architecture, scores, reload."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel

from surgery.graph import analyze
from surgery.inputs import Inputs, example_inputs
from surgery.modules.identity import IdentitySublayer
from surgery.modules.registry import build
from surgery.parse import parse
from surgery.passes.base import PassContext, PassError
from surgery.passes.drop import DropPass
from surgery.transformer_arch import get_module, set_module

IDS = torch.randint(1, 60, (2, 8), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=60,
    )
    return BertModel(cfg).double().eval()


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_embd=32,
        n_layer=3,
        n_head=4,
        vocab_size=60,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).double().eval()


def vit() -> ViTModel:
    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
    )
    return ViTModel(cfg).double().eval()


def inputs_for(model: nn.Module) -> Inputs:
    if isinstance(model, ViTModel):
        return Inputs((), {"pixel_values": PIXELS})
    if isinstance(model, BertModel):
        return Inputs((), {"input_ids": IDS, "attention_mask": MASK})
    return Inputs((), {"input_ids": IDS})


def drop(model: nn.Module, text: str, calibration: list[Inputs] | None = None) -> tuple:
    ex = inputs_for(model)
    ctx = PassContext(
        analysis=analyze(model, ex, trace=False), example=ex, calibration=calibration or []
    )
    p = DropPass(parse(text).statements[0], ctx)
    plan = p.plan(model)
    return plan, p.apply(model, plan)


def out(model: nn.Module) -> torch.Tensor:
    return inputs_for(model).call(model)[0]


@pytest.mark.parametrize("factory", [bert, gpt2, vit])
@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_dropping_zero_is_identical(factory, kind: str) -> None:
    model = factory()
    ref = out(model)
    plan, changes = drop(model, f"drop {kind} 0")
    assert changes == [] and len(plan.rows) == 3 and not plan.changed_rows
    assert torch.equal(out(model), ref)


@pytest.mark.parametrize("factory", [bert, gpt2, vit])
@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_least_important_sublayers_are_dropped(factory, kind: str) -> None:
    model = factory()
    plan, changes = drop(model, f"drop {kind} 2")
    scores = [r.detail["importance"] for r in plan.rows]
    dropped = [r.detail["importance"] for r in plan.changed_rows]
    assert len(dropped) == 2 and max(dropped) <= min(s for s in scores if s not in dropped)
    assert all(0.0 <= s <= 2.0 for s in scores)
    assert {c.path for c in changes} == {p for r in plan.changed_rows for p in r.detail["replaces"]}
    assert all(isinstance(get_module(model, c.path), IdentitySublayer) for c in changes)
    assert torch.isfinite(out(model)).all()


def test_post_ln_bert_attention_becomes_identity_on_hidden_states() -> None:
    model = bert()
    plan, _ = drop(model, "drop attention 1")
    block = int(plan.changed_rows[0].detail["block"])
    layer = model.encoder.layer[block]
    seen: dict[str, torch.Tensor] = {}
    layer.register_forward_pre_hook(lambda _m, a: seen.__setitem__("in", a[0]))
    layer.intermediate.register_forward_pre_hook(lambda _m, a: seen.__setitem__("ffn_in", a[0]))
    out(model)
    assert torch.equal(seen["in"], seen["ffn_in"])


def test_post_ln_bert_mlp_drop_passes_attention_output_through() -> None:
    model = bert()
    plan, _ = drop(model, "drop mlp 1")
    layer = model.encoder.layer[int(plan.changed_rows[0].detail["block"])]
    seen: dict[str, torch.Tensor] = {}
    layer.attention.register_forward_hook(lambda _m, _a, o: seen.__setitem__("att", o[0]))
    layer.register_forward_hook(lambda _m, _a, o: seen.__setitem__("out", o))
    out(model)
    assert torch.equal(seen["att"], seen["out"])


def test_a_decomposed_post_ln_attention_is_still_dropped_as_post_ln() -> None:
    from surgery.passes.decompose import DecomposePass

    model = bert()
    stmt = parse('decompose Linear where name ~ "encoder.layer.0.*" rank = 4').statements[0]
    DecomposePass(stmt).run(model)
    assert type(get_module(model, "encoder.layer.0.attention.self.query")).__name__ == (
        "LowRankLinear"
    )
    plan, _ = drop(model, "drop attention 0")
    assert [r.shape for r in plan.rows] == [f"block {i} attention (post-LN)" for i in range(3)]
    plan, _ = drop(model, "drop mlp 0")
    assert [r.detail["block"] for r in plan.rows] == [0, 1, 2]


def test_pre_ln_gpt2_dropped_attention_adds_zero_to_residual() -> None:
    model = gpt2()
    plan, _ = drop(model, "drop attention 1")
    block = model.transformer.h[int(plan.changed_rows[0].detail["block"])]
    seen: dict[str, torch.Tensor] = {}
    block.register_forward_pre_hook(lambda _m, a: seen.__setitem__("in", a[0]))
    block.register_forward_hook(lambda _m, _a, o: seen.__setitem__("out", o))
    out(model)
    x = seen["in"]
    expected = x + block.mlp(block.ln_2(x))
    torch.testing.assert_close(seen["out"], expected, rtol=0, atol=0)


def test_calibration_batches_are_used() -> None:
    model = bert()
    other = Inputs(
        (), {"input_ids": torch.randint(1, 60, (3, 5), generator=torch.Generator().manual_seed(7))}
    )
    plan_a, _ = drop(copy.deepcopy(model), "drop attention 1")
    plan_b, _ = drop(copy.deepcopy(model), "drop attention 1", calibration=[other])
    assert [r.detail["importance"] for r in plan_a.rows] != [
        r.detail["importance"] for r in plan_b.rows
    ]


def test_gpt2_generate_after_dropping_attention() -> None:
    model = gpt2()
    drop(model, "drop attention 1 by similarity")
    prompt = IDS[:, :3]
    a = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    b = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert a.shape == (2, 8) and torch.equal(a, b)


@pytest.mark.parametrize(
    "text,code,field",
    [
        ("drop attention 4", "S0333", "count"),
        ("drop mlp 9", "S0333", "count"),
    ],
)
def test_invalid_drop_statements(text: str, code: str, field: str) -> None:
    model = bert()
    stmt = parse(text).statements[0]
    p = DropPass(stmt)
    p.ensure_context(model)
    with pytest.raises(PassError) as err:
        p.plan(model)
    assert err.value.diagnostic.code == code
    assert err.value.diagnostic.span == getattr(stmt, field).span
    if code == "S0333":
        assert "0..3" in (err.value.diagnostic.help or "")


def test_dropping_more_after_a_drop_only_counts_remaining() -> None:
    model = bert()
    drop(model, "drop attention 2")
    plan, changes = drop(model, "drop attention 1")
    assert len(plan.rows) == 1 and len(changes) == 1


@pytest.mark.parametrize(
    "factory,kind", [(bert, "attention"), (bert, "mlp"), (gpt2, "attention"), (vit, "mlp")]
)
def test_save_reload_identity(factory, kind: str) -> None:
    model = factory()
    _, changes = drop(model, f"drop {kind} 1")
    ref = out(model)
    rebuilt = factory()
    for c in changes:
        m = get_module(model, c.path)
        set_module(rebuilt, c.path, build(m.registry_name(), m.spec()))
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(out(rebuilt), ref)


# --- every architecture (issue 16) ---------------------------------------------------------------


def _drop_family(family: str, text: str) -> tuple[nn.Module, Inputs, Any]:
    from surgery.inputs import example_inputs
    from tests.helpers_models import ARCHS

    model = ARCHS[family]()
    ex = example_inputs(model)
    p = DropPass(parse(text).statements[0], PassContext(analysis=analyze(model, ex), example=ex))
    plan = p.plan(model)
    return model, ex, (plan, p.apply(model, plan))


@pytest.mark.parametrize("family", ["videomae", "distilbert", "bloom", "falcon", "clip-vision"])
def test_dropped_attention_runs_on_every_family(family: str) -> None:
    model, ex, (plan, changes) = _drop_family(family, "drop attention 1")
    assert len(changes) == 1 and len(plan.rows) == 3
    with torch.no_grad():
        ex.call(model)


def test_bloom_attention_that_adds_its_residual_returns_the_residual() -> None:
    model, ex, (_, changes) = _drop_family("bloom", "drop attention 1")
    path = changes[0].path
    assert get_module(model, path).mode == "residual"  # type: ignore[union-attr]
    block = get_module(model, path.rsplit(".", 1)[0])
    seen: dict[str, torch.Tensor] = {}
    block.self_attention.register_forward_hook(lambda _m, a, o: seen.__setitem__("o", o[0]))
    block.self_attention.register_forward_pre_hook(lambda _m, a: seen.__setitem__("r", a[1]))
    with torch.no_grad():
        ex.call(model)
    assert torch.equal(seen["o"], seen["r"])


@pytest.mark.parametrize(("family", "why"), [("albert", "shared layer")])
def test_drop_refusals_name_the_reason(family: str, why: str) -> None:
    with pytest.raises(PassError) as err:
        _drop_family(family, "drop attention 1")
    d = err.value.diagnostic
    assert d.code == "S0333" and why in d.message + " ".join(d.notes)


def test_swin_windowed_attention_is_scored_by_ablation_and_dropped() -> None:
    """Swin's attention sees shifted windows: each block is scored by its output without the
    attention against its output with it, and the least important one is dropped."""
    from surgery.inputs import example_inputs
    from surgery.passes.drop import sublayer_importance
    from surgery.transformer_arch import attention_sublayers
    from tests.helpers_models import ARCHS

    model = ARCHS["swin"]().eval()
    ex = example_inputs(model)
    subs, _ = attention_sublayers(model, analyze(model, ex), ex)
    scores = sublayer_importance(model, subs, [ex])
    by_hand = []
    for sub in subs:  # the block's output with the attention, and with it returning zeros
        block, attn = get_module(model, sub.block_path), get_module(model, sub.score_out)
        got: dict[str, torch.Tensor] = {}
        hb = block.register_forward_hook(lambda _m, _a, o, got=got: got.update(with_=o[0]))
        with torch.no_grad():
            ex.call(model)
        hb.remove()
        hz = attn.register_forward_hook(lambda _m, _a, o: (torch.zeros_like(o[0]), *o[1:]))
        hb = block.register_forward_hook(lambda _m, _a, o, got=got: got.update(without=o[0]))
        with torch.no_grad():  # later blocks see another input; this block's input is the same
            ex.call(model)
        hb.remove(), hz.remove()
        cos = nn.functional.cosine_similarity(got["without"].double(), got["with_"].double(), -1)
        by_hand.append(float((1 - cos).mean()))
    assert scores == pytest.approx(by_hand, rel=1e-9)
    model, ex, (_, changes) = _drop_family("swin", "drop attention 1")
    assert [c.path for c in changes] == [subs[scores.index(min(scores))].score_out]
    with torch.no_grad():
        ex.call(model)


# --- T5: the first block owns the relative-position bias the later blocks reuse -----------------


def test_t5_drops_attention_only_in_blocks_that_hand_the_bias_on() -> None:
    _, _, (plan, changes) = _drop_family("t5-encoder", "drop attention 2")
    first = "encoder.block.0.layer.0.SelfAttention"
    assert [c.path for c in changes] and first not in [c.path for c in changes]
    [row] = [r for r in plan.rows if r.path == first]
    assert row.action == "skip" and "hands on" in row.note
    assert any("relative-position bias" in n for n in plan.notes)


def test_t5_dropped_attention_hands_the_bias_to_the_next_block() -> None:
    from tests.helpers_models import arch_t5_encoder

    reference = arch_t5_encoder().double()
    model = copy.deepcopy(reference)
    ex = example_inputs(model)
    p = DropPass(
        parse("drop attention 1").statements[0],
        PassContext(analysis=analyze(model, ex), example=ex),
    )
    plan = p.plan(model)
    [value] = plan.data["replace"].values()
    plan.data["replace"] = {"encoder.block.1.layer.0.SelfAttention": value}  # block 1 for sure
    p.apply(model, plan)
    biases = []
    for m in (reference, model):
        attn = m.encoder.block[2].layer[0].SelfAttention
        h = attn.register_forward_pre_hook(
            lambda _m, _a, kw: biases.append(kw["position_bias"]), with_kwargs=True
        )
        ex.call(m)
        h.remove()
    assert torch.equal(biases[0], biases[1])
    reloaded = build("HandOnIdentity", model.encoder.block[1].layer[0].SelfAttention.spec())
    assert reloaded.passes == [("position_bias", 3)]


def test_t5_refuses_more_drops_than_blocks_that_hand_the_bias_on() -> None:
    with pytest.raises(PassError) as err:
        _drop_family("t5-encoder", "drop attention 3")
    d = err.value.diagnostic
    assert d.code == "S0333" and "2 of the 3" in d.message
    assert "`position_bias`" in d.notes[0] and "relative-position bias" in d.notes[0]
