"""`truncate blocks keep K ...`: index rules, kept weights, config, generate, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from surgery.parse import parse
from surgery.passes.base import PassError
from surgery.passes.truncate import TruncatePass, truncation_indices

IDS = torch.randint(1, 60, (2, 6), generator=torch.Generator().manual_seed(1))


def bert(layers: int = 4) -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=60,
    )
    return BertModel(cfg).eval()


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_embd=32,
        n_layer=4,
        n_head=4,
        vocab_size=60,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=60,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def truncate(model: nn.Module, text: str) -> list:
    p = TruncatePass(parse(text).statements[0])
    p.ensure_context(model)
    return p.apply(model, p.plan(model))


def test_documented_index_rules() -> None:
    assert truncation_indices(12, 6, "uniform") == [0, 2, 4, 6, 8, 10]
    assert truncation_indices(12, 6, "pseudo-uniform") == [0, 2, 4, 7, 9, 11]
    assert truncation_indices(12, 12, "pseudo-uniform") == list(range(12))
    assert truncation_indices(12, 1, "pseudo-uniform") == [0]


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 64), data=st.data())
def test_index_rules_are_sorted_distinct_and_in_range(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, n))
    for strategy in ("uniform", "pseudo-uniform"):
        idx = truncation_indices(n, k, strategy)
        assert len(idx) == k and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < n
    assert truncation_indices(n, k, "uniform")[0] == 0
    if k >= 2:
        pseudo = truncation_indices(n, k, "pseudo-uniform")
        assert pseudo[0] == 0 and pseudo[-1] == n - 1


@pytest.mark.parametrize(
    "text,kept",
    [
        ("truncate blocks keep 2 [0, 3]", [0, 3]),
        ("truncate blocks keep 2 uniform", [0, 2]),
        ("truncate blocks keep 3 pseudo-uniform", [0, 2, 3]),
    ],
)
def test_truncation_keeps_the_chosen_blocks_weights(text: str, kept: list[int]) -> None:
    model = bert()
    before = {
        i: {k: v.clone() for k, v in model.encoder.layer[i].state_dict().items()} for i in range(4)
    }
    changes = truncate(model, text)
    assert changes[0].detail["kept"] == kept
    assert len(model.encoder.layer) == len(kept) and model.config.num_hidden_layers == len(kept)
    for j, i in enumerate(kept):
        after = model.encoder.layer[j].state_dict()
        assert all(torch.equal(after[k], before[i][k]) for k in after)
        assert model.encoder.layer[j].attention.self.layer_idx == j
    out = model(input_ids=IDS).last_hidden_state
    assert out.shape == (2, 6, 32)


def test_keeping_all_blocks_changes_nothing() -> None:
    model = bert()
    ref = model(input_ids=IDS).last_hidden_state
    assert truncate(model, "truncate blocks keep 4 uniform") == []
    assert torch.equal(model(input_ids=IDS).last_hidden_state, ref)


@pytest.mark.parametrize("factory", [gpt2, llama])
def test_generate_after_truncation(factory) -> None:
    model = factory()
    truncate(model, "truncate blocks keep 2 pseudo-uniform")
    assert model.config.num_hidden_layers == 2
    layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    idx = [
        (layer.attn if hasattr(layer, "attn") else layer.self_attn).layer_idx for layer in layers
    ]
    assert idx == [0, 1]
    a = model.generate(IDS[:, :3], max_new_tokens=4, do_sample=False, use_cache=True)
    b = model.generate(IDS[:, :3], max_new_tokens=4, do_sample=False, use_cache=False)
    assert a.shape == (2, 7) and torch.equal(a, b)


@pytest.mark.parametrize(
    "text,code,help_text",
    [
        ("truncate blocks keep 5 uniform", "S0341", "valid range: 1..4"),
        ("truncate blocks keep 0 uniform", "S0341", "valid range: 1..4"),
        ("truncate blocks keep 2 [0, 4]", "S0342", "valid block indices: 0..3"),
    ],
)
def test_invalid_truncations_list_the_valid_range(text: str, code: str, help_text: str) -> None:
    model = bert()
    p = TruncatePass(parse(text).statements[0])
    p.ensure_context(model)
    with pytest.raises(PassError) as err:
        p.plan(model)
    assert err.value.diagnostic.code == code
    assert help_text in (err.value.diagnostic.help or "")


def test_plan_rows_show_blocks_kept_and_removed() -> None:
    model = bert()
    p = TruncatePass(parse("truncate blocks keep 2 [1, 3]").statements[0])
    p.ensure_context(model)
    plan = p.plan(model)
    assert [r.action for r in plan.rows] == ["remove", "skip", "remove", "skip"]
    assert plan.rows[3].shape == "block 3 of 4 → 1"
    assert plan.totals()["params_after"] == 0 and plan.totals()["params_before"] > 0


# --- stages, shared layers and configs of every architecture (issue 16) ------------------------


def test_swin_stages_keep_their_first_block_and_depths_follow() -> None:
    from tests.helpers_models import arch_swin

    model = arch_swin()  # depths [2, 2]
    pixels = torch.randn(1, 3, 32, 32)
    changes = truncate(model, "truncate blocks keep 3 uniform")
    assert changes[0].detail["kept"] == [0, 1, 2]  # both stage firsts (0, 2) and one more
    assert model.config.depths == [2, 1]
    assert [len(layer.blocks) for layer in model.encoder.layers] == [2, 1]
    with torch.no_grad():
        assert model(pixel_values=pixels).last_hidden_state.shape == (1, 16, 32)


def test_cnn_stages_refuse_to_empty_a_stage() -> None:
    from tests.helpers_models import arch_resnet

    model = arch_resnet()  # depths [2, 3]
    with pytest.raises(PassError) as err:
        truncate(model, "truncate blocks keep 1 uniform")
    assert err.value.diagnostic.code == "S0341"
    assert "first block of a stage" in err.value.diagnostic.message
    changes = truncate(model, "truncate blocks keep 3 uniform")
    assert changes and model.config.depths == [2, 1]  # stage firsts 0 and 2, then block 1


def test_albert_shared_layer_truncates_to_fewer_runs_exactly() -> None:
    from transformers import AlbertModel

    from tests.helpers_models import arch_albert

    model = arch_albert()
    ids = torch.tensor([[5, 6, 7, 8]])
    truncate(model, "truncate blocks keep 2 uniform")
    assert model.config.num_hidden_layers == 2
    reference = AlbertModel(model.config).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state
        )


def test_t5_block_zero_owns_the_position_bias_and_stays() -> None:
    from tests.helpers_models import arch_t5_encoder

    model = arch_t5_encoder()
    with pytest.raises(PassError) as err:
        truncate(model, "truncate blocks keep 2 [1, 2]")
    assert err.value.diagnostic.code == "S0342"
    truncate(model, "truncate blocks keep 2 [0, 2]")
    assert model.config.num_layers == 2 and len(model.encoder.block) == 2
