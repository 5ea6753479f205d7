"""`group` (GQA/MQA/GKVA/GQKVA): identities, exactness, fused-vs-unfused, generate, errors, reload."""

from __future__ import annotations

import copy

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
    ViTConfig,
    ViTModel,
)

from surgery.modules.attention import GroupedAttention, pairing, pool_heads
from surgery.modules.registry import build
from surgery.parse import parse
from surgery.passes.base import PassContext, PassError
from surgery.passes.group import GroupPass, grouped_attention_from
from surgery.transformer_arch import attention_sites, get_module, set_module

H = 4  # heads of every tiny model


def bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=H,
        intermediate_size=64,
        vocab_size=60,
        attn_implementation="eager",
    )
    return BertModel(cfg).double().eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=H,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        attn_implementation="eager",
    )
    return ViTModel(cfg).double().eval()


def gpt2(attn: str = "eager") -> nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=H,
        vocab_size=60,
        n_positions=64,
        attn_implementation=attn,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).double().eval()


def llama(kv: int = 2) -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=H,
        num_key_value_heads=kv,
        intermediate_size=64,
        vocab_size=60,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).double().eval()


IDS = torch.randint(1, 60, (2, 7), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def run(model: nn.Module) -> torch.Tensor:
    if isinstance(model, ViTModel):
        return model(pixel_values=PIXELS).last_hidden_state
    if isinstance(model, BertModel):
        return model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    return model(input_ids=IDS).logits


def group(model: nn.Module, text: str) -> list:
    p = GroupPass(parse(text).statements[0])
    p.ensure_context(model)
    return p.apply(model, p.plan(model))


MODELS = {"bert": bert, "vit": vit, "gpt2": gpt2, "llama": llama}
# HF's ViT eager attention takes its softmax in float32 even for float64 models.
TOL = {"vit": 1e-6}


@pytest.mark.parametrize("name", list(MODELS))
def test_kv_equals_heads_is_bit_identical(name: str) -> None:
    model = MODELS[name]()
    ref = run(model)
    heads = attention_sites(model)[0].kv_heads
    changes = group(model, f"group kv = {heads}")
    assert changes == []
    assert torch.equal(run(model), ref)


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2"])
def test_grouped_module_with_all_heads_reproduces_hf_attention(name: str) -> None:
    model = MODELS[name]()
    ref = run(model)
    for site in attention_sites(model):
        set_module(
            model, site.path, grouped_attention_from(get_module(model, site.path), site, H, H)
        )
    torch.testing.assert_close(run(model), ref, rtol=0, atol=TOL.get(name, 1e-12))


def make_heads_identical(model: nn.Module, groups: int) -> None:
    """Copy the first head of every contiguous group of q, k and v onto the others."""
    for site in attention_sites(model):
        m = get_module(model, site.path)
        d, per = site.head_dim, site.num_heads // groups
        with torch.no_grad():
            if site.family == "fused":
                w, b = m.c_attn.weight, m.c_attn.bias  # [C, 3H]: columns q | k | v
                hd = site.num_heads * d
                for part in range(3):
                    for g in range(groups):
                        src = part * hd + g * per * d
                        for j in range(1, per):
                            dst = src + j * d
                            w[:, dst : dst + d] = w[:, src : src + d]
                            b[dst : dst + d] = b[src : src + d]
                continue
            names = (
                ("query", "key", "value")
                if site.family == "separate"
                else ("q_proj", "k_proj", "v_proj")
            )
            for n in names:
                lin = getattr(m, n)
                for g in range(groups):
                    src = g * per * d
                    for j in range(1, per):
                        dst = src + j * d
                        lin.weight[dst : dst + d] = lin.weight[src : src + d]
                        if lin.bias is not None:
                            lin.bias[dst : dst + d] = lin.bias[src : src + d]


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2"])
@pytest.mark.parametrize(
    "text", ["group kv = 2", "group q = 2 kv = 2", "group q = 2 kv = 4", "group kv = 1"]
)
def test_grouping_identical_heads_is_exact(name: str, text: str) -> None:
    model = MODELS[name]()
    groups = 1 if "kv = 1" in text else 2
    make_heads_identical(model, groups)
    ref = run(model)
    group(model, text)
    torch.testing.assert_close(run(model), ref, rtol=0, atol=TOL.get(name, 1e-10))


def test_llama_identical_kv_heads_exact_and_config_updated() -> None:
    model = llama(kv=2)
    for layer in model.model.layers:
        for lin in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            with torch.no_grad():
                lin.weight[8:16] = lin.weight[0:8]  # head_dim 8: kv head 1 := kv head 0
    ref = run(model)
    group(model, "group kv = 1")
    torch.testing.assert_close(run(model), ref, rtol=0, atol=1e-10)
    attn = model.model.layers[0].self_attn
    assert model.config.num_key_value_heads == 1
    assert attn.num_key_value_groups == H and attn.k_proj.out_features == 8


def reference_grouped(
    x: torch.Tensor, wq, bq, wk, bk, wv, bv, h: int, gq: int, gkv: int, causal: bool
) -> torch.Tensor:
    """Per-head loops: slot i uses the mean of its query group and of its kv group."""
    T = x.shape[1]
    d = wq.shape[0] // h

    def head(w: torch.Tensor, b: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return w[i * d : (i + 1) * d], b[i * d : (i + 1) * d]

    def mean(w, b, members):
        ws, bs = zip(*(head(w, b, j) for j in members), strict=True)
        return torch.stack(ws).mean(0), torch.stack(bs).mean(0)

    outs = []
    for i in range(h):
        qg, kg = i // (h // gq), i // (h // gkv)
        Wq, Bq = mean(wq, bq, range(qg * h // gq, (qg + 1) * h // gq))
        Wk, Bk = mean(wk, bk, range(kg * h // gkv, (kg + 1) * h // gkv))
        Wv, Bv = mean(wv, bv, range(kg * h // gkv, (kg + 1) * h // gkv))
        q, k, v = x @ Wq.T + Bq, x @ Wk.T + Bk, x @ Wv.T + Bv  # (B, T, d)
        s = q @ k.transpose(1, 2) / d**0.5  # (B, T, T)
        if causal:
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        outs.append(s.softmax(-1) @ v)
    return torch.cat(outs, dim=-1)  # (B, T, h·d)


@pytest.mark.parametrize("gq,gkv", [(4, 2), (4, 1), (2, 2), (2, 4), (1, 1)])
def test_fused_gpt2_matches_unfused_reference(gq: int, gkv: int) -> None:
    model = gpt2()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    w, b = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: [C, 3H]
    wq, wk, wv = (w[:, i * 32 : (i + 1) * 32].T for i in range(3))
    bq, bk, bv = (b[i * 32 : (i + 1) * 32] for i in range(3))
    ref = reference_grouped(x, wq, bq, wk, bk, wv, bv, H, gq, gkv, causal=True)
    ref = attn.c_proj(ref)
    group(model, f"group q = {gq} kv = {gkv}")
    new = model.transformer.h[0].attn
    assert isinstance(new, GroupedAttention)
    out, _ = new(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    # the same grouping on the unfused (BERT-style) path gives the same numbers
    sep = nn.Module()
    sep.query, sep.key, sep.value = (nn.Linear(32, 32).double() for _ in range(3))
    sep.num_attention_heads, sep.is_causal, sep.scaling = H, True, 8**-0.5
    sep.dropout = nn.Dropout(0.0)
    with torch.no_grad():
        for lin, ww, bb in ((sep.query, wq, bq), (sep.key, wk, bk), (sep.value, wv, bv)):
            lin.weight.copy_(ww)
            lin.bias.copy_(bb)
    from surgery.transformer_arch import _site

    site = _site("x", sep, 0)
    assert site is not None and site.family == "separate"
    unfused = grouped_attention_from(sep, site, gq, gkv)
    torch.testing.assert_close(attn.c_proj(unfused(x)[0]), out, rtol=0, atol=1e-10)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_generate_after_grouping_with_and_without_cache(attn: str) -> None:
    model = gpt2(attn)
    group(model, "group q = 2 kv = 1")
    prompt = IDS[:, :4]
    with_cache = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    no_cache = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert with_cache.shape == (2, 10)
    assert torch.equal(with_cache, no_cache)


def test_llama_generate_after_grouping() -> None:
    model = llama(kv=4)
    group(model, "group kv = 2")
    group(model, "group kv = 1")  # regroup an already grouped model
    assert model.config.num_key_value_heads == 1
    prompt = IDS[:, :4]
    a = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    b = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert a.shape == (2, 9) and torch.equal(a, b)


@pytest.mark.parametrize(
    "factory,text,code,choices",
    [
        (bert, "group kv = 3", "S0314", "1, 2, 4"),
        (bert, "group kv = 8", "S0314", "1, 2, 4"),
        (bert, "group kv = 0", "S0314", "1, 2, 4"),
        (gpt2, "group q = 3 kv = 2", "S0314", "1, 2, 4"),
        (llama, "group kv = 4", "S0314", "1, 2"),
        (llama, "group q = 2 kv = 1", "S0312", "1, 2"),
    ],
)
def test_invalid_groupings_list_valid_choices(factory, text: str, code: str, choices: str) -> None:
    model = factory()
    stmt = parse(text).statements[0]
    p = GroupPass(stmt)
    p.ensure_context(model)
    with pytest.raises(PassError) as err:
        p.plan(model)
    diag = err.value.diagnostic
    assert diag.code == code and choices in (diag.help or "")
    field = stmt.q if (code == "S0312" or (stmt.q is not None and "q = 3" in text)) else stmt.kv
    assert diag.span == field.span


def test_plan_rows_report_heads_params_and_flops() -> None:
    from surgery.graph import analyze
    from surgery.inputs import Inputs

    model = bert()
    ex = Inputs((), {"input_ids": IDS, "attention_mask": MASK})
    p = GroupPass(
        parse("group q = 2 kv = 1").statements[0],
        PassContext(analysis=analyze(model, ex), example=ex),
    )
    plan = p.plan(model)
    row = plan.rows[0]
    assert row.shape == "4 heads: q 4→2, kv 4→1" and row.action == "group"
    assert row.params_after < row.params_before
    assert 0 < row.flops_after < row.flops_before
    assert row.detail["pairs"] == 2


def test_plan_groups_the_attentions_the_dependency_graph_found() -> None:
    """`group` reads the attention sites the graph patterns stored on the analysis."""
    from surgery.graph import analyze
    from surgery.inputs import Inputs

    model = bert()
    analysis = analyze(model, Inputs((), {"input_ids": torch.tensor([[3, 4, 5]])}))
    assert analysis.traced
    matches = analysis.graph.graph["attention"]
    assert [u.path for u in analysis.attentions] == [s.path for s in attention_sites(model)]
    assert [m.path for m in matches] == [u.path for u in analysis.attentions]
    analysis.graph.graph["attention"] = matches[-1:]
    plan = GroupPass(parse("group kv = 2").statements[0], PassContext(analysis=analysis)).plan(
        model
    )
    assert [r.path for r in plan.rows] == [matches[-1].path]
    analysis.graph.graph["attention"] = []
    with pytest.raises(PassError) as err:
        GroupPass(parse("group kv = 2").statements[0], PassContext(analysis=analysis)).plan(model)
    assert err.value.diagnostic.code == "S0313"


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2"])
def test_save_reload_grouped_attention(name: str) -> None:
    model = MODELS[name]()
    group(model, "group q = 2 kv = 1")
    ref = run(model)
    rebuilt = copy.deepcopy(model)
    for site in attention_sites(model):
        m = get_module(model, site.path)
        fresh = build(m.registry_name(), m.spec()).double().eval()
        set_module(rebuilt, site.path, fresh)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(run(rebuilt), ref)


@settings(max_examples=25, deadline=None)
@given(
    h_exp=st.integers(0, 4),
    gq_exp=st.integers(0, 4),
    gkv_exp=st.integers(0, 4),
    d=st.integers(1, 4),
)
def test_pairing_covers_slots_and_pooling_repeated_heads_is_identity(
    h_exp: int, gq_exp: int, gkv_exp: int, d: int
) -> None:
    h = 2**h_exp
    gq, gkv = 2 ** min(gq_exp, h_exp), 2 ** min(gkv_exp, h_exp)
    pairs, slots = pairing(h, gq, gkv)
    assert len(slots) == h and sorted(set(slots)) == list(range(len(pairs)))
    assert len(pairs) <= h
    base = torch.randn(gkv, d, 3, dtype=torch.float64)  # gkv distinct heads of a [·, 3] weight
    repeated = base.repeat_interleave(h // gkv, dim=0).reshape(h * d, 3)
    torch.testing.assert_close(
        pool_heads(repeated, h, gkv), base.reshape(gkv * d, 3), rtol=0, atol=1e-12
    )


# --- every architecture: attention found by the graph patterns, grouped at its projections ----


def _matches(model: nn.Module, inputs: dict) -> list:  # type: ignore[type-arg]
    from surgery.graph import attention_matches
    from surgery.inputs import Inputs

    return attention_matches(model, Inputs((), inputs))


def _group_at_projections(model: nn.Module, inputs: dict, q: int, kv: int) -> None:  # type: ignore[type-arg]
    from surgery.passes.group import grouped_projection, projection_groups

    for match in _matches(model, inputs):
        for proj, g in projection_groups(match, q, kv).items():
            new = grouped_projection(get_module(model, proj), g["members"], g["runs"])
            set_module(model, proj, new)


def test_projection_grouping_matches_native_llama_gqa() -> None:
    """LLaMA's own GQA (smaller k/v_proj, config updated) and the generic rewrite, which keeps
    the HF module and pools at the projections, compute the same function (rotary included)."""
    ids = {
        "input_ids": torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(3)),
        "use_cache": False,
    }
    native, generic = llama(kv=4), llama(kv=4)
    p = GroupPass(parse("group kv = 2").statements[0])
    p.ensure_context(native)
    p.apply(native, p.plan(native))
    assert native.config.num_key_value_heads == 2
    _group_at_projections(generic, ids, q=4, kv=2)
    assert type(generic.model.layers[0].self_attn.k_proj).__name__ == "GroupedHeadsLinear"
    with torch.no_grad():
        torch.testing.assert_close(generic(**ids).logits, native(**ids).logits)


@pytest.mark.parametrize(("gq", "gkv"), [(4, 2), (4, 1), (2, 2), (1, 1)])
def test_projection_grouping_matches_grouped_attention_on_bert(gq: int, gkv: int) -> None:
    """BERT grouped by `GroupedAttention` (its dedicated module) and at its projections agree."""
    ids = {"input_ids": torch.randint(0, 60, (2, 6), generator=torch.Generator().manual_seed(4))}
    dedicated, generic = bert(), bert()
    text = f"group q = {gq} kv = {gkv}" if gq != H else f"group kv = {gkv}"
    p = GroupPass(parse(text).statements[0])
    p.ensure_context(dedicated)
    p.apply(dedicated, p.plan(dedicated))
    _group_at_projections(generic, ids, q=gq, kv=gkv)
    with torch.no_grad():
        torch.testing.assert_close(
            generic(**ids).last_hidden_state, dedicated(**ids).last_hidden_state
        )


def _neox() -> nn.Module:
    from tests.helpers_models import arch_gpt_neox

    return arch_gpt_neox().double()


def test_fused_interleaved_qkv_grouped_heads_share_pooled_keys() -> None:
    """GPT-NeoX fuses q/k/v head by head (``[h, 3, d]``): the layout the graph gives is used,
    the keys of one group are equal and the mean of the original heads' keys."""
    model = _neox()
    ids = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "use_cache": False}
    [m0, *_] = _matches(model, ids)
    qkv = model.gpt_neox.layers[0].attention.query_key_value
    w = qkv.weight.detach().clone()
    p = GroupPass(parse("group kv = 2").statements[0])
    p.ensure_context(model)
    plan = p.plan(model)
    assert [r.action for r in plan.rows] == ["group"] * 3
    p.apply(model, plan)
    new = model.gpt_neox.layers[0].attention.query_key_value
    x = torch.randn(3, 32, dtype=torch.float64)
    y, y0 = new(x), nn.functional.linear(x, w, qkv.bias)
    k = [list(rows) for rows in m0.k.rows]  # keys of heads 0..3
    torch.testing.assert_close(y[:, k[0]], y[:, k[1]])
    torch.testing.assert_close(y[:, k[0]], (y0[:, k[0]] + y0[:, k[1]]) / 2)
    q = [list(rows) for rows in m0.q.rows]
    torch.testing.assert_close(y[:, q[0]], y0[:, q[0]])  # queries untouched
    with torch.no_grad():
        assert model(**ids).logits.shape == (1, 4, 96)


@pytest.mark.parametrize("family", ["distilbert", "bart", "bloom", "falcon", "phi3", "clip-vision"])
def test_group_kv_heads_is_identity_on_every_family(family: str) -> None:
    from tests.helpers_models import ARCHS

    model = ARCHS[family]()
    p = GroupPass(parse("group kv = 4").statements[0])
    p.ensure_context(model)
    plan = p.plan(model)
    before = copy.deepcopy(model.state_dict())
    assert p.apply(model, plan) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cross_attention_is_left_alone() -> None:
    from tests.helpers_models import arch_bart

    model = arch_bart()
    p = GroupPass(parse("group kv = 2").statements[0])
    p.ensure_context(model)
    plan = p.plan(model)
    cross = [r for r in plan.rows if "encoder_attn" in r.path]
    assert cross and {r.action for r in cross} == {"skip"}
    assert all(r.note == "cross-attention: left alone" for r in cross)
    changes = p.apply(model, plan)
    assert changes and not [c for c in changes if "encoder_attn" in c.path]


def test_cnn_has_no_self_attention() -> None:
    from tests.helpers_models import arch_convnext

    model = arch_convnext()
    p = GroupPass(parse("group kv = 2").statements[0])
    p.ensure_context(model)
    with pytest.raises(PassError, match="found no self-attention"):
        p.plan(model)
