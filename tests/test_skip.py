"""`skip tokens` (SkipViT): identity at 0%, carried tokens, padding, ranges, errors, reload."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, ViTConfig, ViTModel

from surgery.graph import analyze
from surgery.inputs import Inputs
from surgery.modules.registry import build
from surgery.modules.token_skip import TokenSkipLayers, keep_count
from surgery.parse import parse
from surgery.passes.base import PassContext, PassError
from surgery.passes.skip import SkipPass

PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
IDS = torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])


def vit(layers: int = 4) -> ViTModel:
    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
    )
    return ViTModel(cfg).double().eval()


def bert(attn: str = "eager") -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=60,
        attn_implementation=attn,
    )
    return BertModel(cfg).double().eval()


def skip(model: nn.Module, text: str) -> list:
    p = SkipPass(parse(text).statements[0])
    p.ensure_context(model)
    return p.apply(model, p.plan(model))


def run_vit(model: ViTModel) -> torch.Tensor:
    return model(pixel_values=PIXELS).last_hidden_state


def run_bert(model: BertModel) -> torch.Tensor:
    return model(input_ids=IDS, attention_mask=MASK).last_hidden_state


def test_zero_percent_is_identical() -> None:
    model = vit()
    ref = run_vit(model)
    skip(model, "skip tokens 0% after block 1")
    assert isinstance(model.layers, TokenSkipLayers)
    assert torch.equal(run_vit(model), ref)
    b = bert()
    ref = run_bert(b)
    skip(b, "skip tokens 0% after block 0")
    assert torch.equal(run_bert(b), ref)


def capture(module: nn.Module, pre: bool = False) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    if pre:
        module.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))
    else:
        module.register_forward_hook(lambda _m, _a, out: seen.__setitem__("x", out))
    return seen


@pytest.mark.parametrize("ratio,after", [(0.55, 1), (0.5, 0), (1.0, 2)])
def test_skipped_tokens_keep_their_block_d_values(ratio: float, after: int) -> None:
    model = vit()
    at_d = capture(model.layers[after])
    final_in = capture(model.layernorm, pre=True)
    skip(model, f"skip tokens {ratio * 100:g}% after block {after}")
    run_vit(model)
    x_d, x_end = at_d["x"], final_in["x"]  # (B, N, C)
    n = x_d.shape[1]
    kept = keep_count(n, ratio)
    same = (x_d == x_end).all(dim=-1)  # (B, N): carried unchanged from block D
    assert same.sum(dim=1).tolist() == [n - 1 - kept] * 2
    assert not same[:, 0].any()  # CLS always goes on through the blocks
    # the kept tokens went through the remaining blocks on their own, in original order
    for b in range(2):
        idx = (~same[b]).nonzero().flatten()
        h = x_d[b : b + 1, idx]
        for layer in list(model.layers.inner)[after + 1 :]:
            h = layer(h, None)
        torch.testing.assert_close(x_end[b : b + 1, idx], h, rtol=0, atol=1e-12)


def test_until_block_restores_all_tokens_for_later_blocks() -> None:
    model = vit(layers=4)
    tokens_seen: list[int] = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda _m, args: tokens_seen.append(args[0].shape[1]))
    skip(model, "skip tokens 50% after block 0 until block 2")
    out = run_vit(model)
    assert tokens_seen == [17, 9, 9, 17]
    assert out.shape == (2, 17, 32)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_padding_is_never_kept_over_real_tokens(attn: str) -> None:
    model = bert(attn)
    at_d = capture(model.encoder.layer[0])
    # 9 tokens, 8 non-CLS, 50% -> 4 kept; sample 1 has exactly 4 real non-CLS tokens (1..4)
    skip(model, "skip tokens 50% after block 0")
    out = run_bert(model)
    same = (at_d["x"] == out).all(dim=-1)  # (B, N); BERT has no final norm
    assert same[1].nonzero().flatten().tolist() == [5, 6, 7, 8]
    assert out.shape == (2, 9, 32) and torch.isfinite(out).all()


def test_decoder_without_cls_is_refused() -> None:
    model = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=60, n_positions=32))
    p = SkipPass(parse("skip tokens 50% after block 0").statements[0])
    p.ensure_context(model)
    with pytest.raises(PassError) as err:
        p.plan(model)
    assert err.value.diagnostic.code == "S0324"
    assert "CLS-token encoder" in err.value.diagnostic.message


@pytest.mark.parametrize(
    "text,field",
    [
        ("skip tokens 50% after block 3", "after"),
        ("skip tokens 50% after block 0 until block 4", "until"),
    ],
)
def test_out_of_range_statements_are_located(text: str, field: str) -> None:
    model = vit()
    stmt = parse(text).statements[0]
    p = SkipPass(stmt)
    p.ensure_context(model)
    with pytest.raises(PassError) as err:
        p.plan(model)
    assert err.value.diagnostic.span == getattr(stmt, field).span
    assert err.value.diagnostic.help


def test_plan_shows_tokens_per_block() -> None:
    model = vit()
    ex = Inputs((), {"pixel_values": PIXELS})
    p = SkipPass(
        parse("skip tokens 55% after block 1").statements[0],
        PassContext(analysis=analyze(model, ex), example=ex),
    )
    plan = p.plan(model)
    assert [r.shape for r in plan.rows] == [
        "17 tokens",
        "17 tokens",
        "17 tokens → 9",
        "17 tokens → 9",
    ]
    assert plan.rows[2].flops_after < plan.rows[2].flops_before
    assert plan.rows[0].flops_after == plan.rows[0].flops_before


def test_save_reload_token_skip() -> None:
    model = vit()
    original = copy.deepcopy(model)
    skip(model, "skip tokens 55% after block 1")
    ref = run_vit(model)
    wrapper = model.layers
    rebuilt = build(wrapper.registry_name(), wrapper.spec())
    assert isinstance(rebuilt, TokenSkipLayers) and rebuilt.wraps == "inner"
    setattr(rebuilt, rebuilt.wraps, original.layers)  # the base architecture's blocks
    original.layers = rebuilt
    original.load_state_dict(model.state_dict())
    assert torch.equal(run_vit(original), ref)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 600), ratio=st.floats(0.0, 1.0))
def test_keep_count_rounds_up_within_range(n: int, ratio: float) -> None:
    k = keep_count(n, ratio)
    assert 0 <= k <= n - 1
    assert k >= (1 - ratio) * (n - 1) - 1e-6
    assert k - 1 < (1 - ratio) * (n - 1) + 1e-6


# --- every architecture (issue 16): exact at 0%, refusals that say why ------------------------


def _skip_family(family: str, text: str) -> tuple[nn.Module, Inputs, list]:  # type: ignore[type-arg]
    from surgery.inputs import example_inputs
    from surgery.parse import parse
    from surgery.passes.base import PassContext
    from surgery.passes.skip import SkipPass
    from tests.helpers_models import ARCHS

    model = ARCHS[family]()
    ex = example_inputs(model)
    p = SkipPass(parse(text).statements[0], PassContext(analysis=analyze(model, ex), example=ex))
    plan = p.plan(model)
    return model, ex, p.apply(model, plan)


@pytest.mark.parametrize("family", ["clip-vision", "videomae"])
def test_skipping_no_tokens_is_identity(family: str) -> None:
    from tests.helpers_models import ARCHS

    reference = ARCHS[family]()
    model, ex, changes = _skip_family(family, "skip tokens 0% after block 1")
    assert changes
    with torch.no_grad():
        torch.testing.assert_close(
            ex.call(model).last_hidden_state, ex.call(reference).last_hidden_state, rtol=0, atol=0
        )


def test_clip_vision_skips_tokens_after_the_class_embedding() -> None:
    model, ex, changes = _skip_family("clip-vision", "skip tokens 50% after block 1")
    assert changes and type(model.encoder.layers).__name__ == "TokenSkipLayers"
    with torch.no_grad():
        assert ex.call(model).last_hidden_state.shape == (2, 17, 32)


@pytest.mark.parametrize(
    ("family", "why"),
    [
        ("swin", "window grid"),
        ("albert", "one shared layer"),
        ("convnext", "no self-attention"),
        ("t5-encoder", "no CLS token"),
    ],
)
def test_refusals_name_the_reason(family: str, why: str) -> None:
    from surgery.passes.base import PassError

    with pytest.raises(PassError) as err:
        _skip_family(family, "skip tokens 50% after block 0")
    assert err.value.diagnostic.code == "S0324" and why in err.value.diagnostic.message


# --- the scorer reads the projections the graph found (DistilBERT, DeBERTa-v2) -------------------


@pytest.mark.parametrize(
    ("family", "q", "k"),
    [
        ("distilbert", "attention.q_lin", "attention.k_lin"),
        ("deberta-v2", "attention.self.query_proj", "attention.self.key_proj"),
    ],
)
def test_scorer_reads_the_projections_the_graph_found(family: str, q: str, k: str) -> None:
    model, ex, changes = _skip_family(family, "skip tokens 50% after block 1")
    scorer = changes[0].detail["scorer"]
    assert (scorer["q"], scorer["k"]) == (q, k)
    reloaded = build("TokenSkipLayers", changes[0].detail)
    assert reloaded.scorer is not None and reloaded.scorer.q == q
    with torch.no_grad():
        assert ex.call(model).last_hidden_state.shape[:2] == ex.kwargs["input_ids"].shape


def test_deberta_relative_positions_are_gathered_at_the_kept_tokens() -> None:
    from transformers.models.deberta_v2.modeling_deberta_v2 import (
        build_relative_position,
        make_log_bucket_position,
    )

    from surgery.modules.token_skip import _take_relative

    ids = torch.zeros(1, 12, 1)
    rel = build_relative_position(ids, ids, bucket_size=4, max_position=8)  # (1, 12, 12)
    idx = torch.tensor([[0, 2, 3, 7, 11], [0, 1, 5, 6, 9]])
    got = _take_relative(rel, idx, heads=3)  # (1, 2·3, 5, 5)
    assert got.shape == (1, 6, 5, 5)
    for b in range(2):
        want = make_log_bucket_position(idx[b][:, None] - idx[b][None, :], 4, 8).long()
        for h in range(3):
            assert torch.equal(got[0, b * 3 + h], want)


def test_deberta_skipping_is_per_example() -> None:
    """Each example keeps its own tokens and relative positions: a batch gives every example
    what it gets alone."""
    from tests.helpers_models import arch_deberta_v2

    model = arch_deberta_v2().double()
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(3))
    ex = Inputs((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    p = SkipPass(
        parse("skip tokens 50% after block 0").statements[0],
        PassContext(analysis=analyze(model, ex), example=ex),
    )
    p.apply(model, p.plan(model))
    with torch.no_grad():
        both = model(**ex.kwargs).last_hidden_state
        for b in range(2):
            alone = model(input_ids=ids[b : b + 1], attention_mask=torch.ones_like(ids[b : b + 1]))
            torch.testing.assert_close(both[b], alone.last_hidden_state[0], rtol=1e-10, atol=1e-10)
