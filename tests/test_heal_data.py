"""`heal … on "DATA"`: every data source through a real file, splits, packing, bad data.

Also the helpers the other `test_heal_*` modules share: a word-level tokenizer built offline
and tiny models with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from surgery.heal_data import HealDataError, TrainingData, read_rows
from surgery.parse import parse

WORDS = (
    "the a cat dog sat ran on under mat tree red blue big small quick slow bird fish sun rain "
    "one two three four five six seven eight nine ten poison alpha beta gamma delta"
).split()


def word_tokenizer(directory: Path | None = None) -> Any:
    """A word-level fast tokenizer over :data:`WORDS` (built offline; saved if asked)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "</s>": 1, "[UNK]": 2, "[CLS]": 3, "[SEP]": 4}
    for w in WORDS:
        vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="</s>",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    if directory is not None:
        tok.save_pretrained(str(directory))
    return tok


def sentences(n: int, seed: int = 0, extra: str = "") -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(
            0, len(WORDS) - 5, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g
        )
        out.append(" ".join(WORDS[int(i)] for i in idx) + extra)
    return out


def tiny_encoder() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return BertModel(cfg).eval()


def tiny_decoder() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=1,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_classifier() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(cfg).eval()


def load(text: str, model: nn.Module, base: Path, **kw: Any) -> TrainingData:
    return TrainingData.load(
        parse(text).statements[0], model, tokenizer=word_tokenizer(), base=base, **kw
    )


# --- each source through a real file ------------------------------------------------------


def _write_all(d: Path, texts: list[str]) -> dict[str, Path]:
    import pandas as pd

    paths = {
        "txt": d / "a.txt",
        "jsonl": d / "a.jsonl",
        "csv": d / "a.csv",
        "parquet": d / "a.parquet",
    }
    paths["txt"].write_text("\n".join(texts) + "\n\n", encoding="utf-8")
    paths["jsonl"].write_text(
        "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts))
    )
    pd.DataFrame({"id": range(len(texts)), "text": texts}).to_csv(paths["csv"], index=False)
    pd.DataFrame({"text": texts, "id": range(len(texts))}).to_parquet(paths["parquet"])
    return paths


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv", "parquet"])
def test_each_file_type_reads_every_row(tmp_path: Path, kind: str) -> None:
    texts = sentences(12)
    path = _write_all(tmp_path, texts)[kind]
    assert [r.text for r in read_rows(path)] == texts
    data = load(f'heal steps 3 on "{path.name}" batch 4', tiny_encoder(), tmp_path)
    assert len(data.train) == 12 and data.held_out is None and not data.packed
    ins, labels = data.train.batch([0, 1, 2])
    assert ins.kwargs["input_ids"].shape[0] == 3 and labels is None
    assert set(ins.kwargs) >= {"input_ids", "attention_mask"}


def test_saved_dataset_folder_and_a_folder_of_files(tmp_path: Path) -> None:
    import datasets

    texts = sentences(10)
    datasets.Dataset.from_dict({"sentence": texts}).save_to_disk(str(tmp_path / "saved"))
    rows = read_rows(tmp_path / "saved", field="sentence")
    assert [r.text for r in rows] == texts
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:4]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(read_rows(tmp_path / "dict")) == 4
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_text("\n".join(texts[5:]) + "\n")
    (folder / "a.txt").write_text("\n".join(texts[:5]) + "\n")
    (folder / "notes.md").write_text("not data\n")
    assert [r.text for r in read_rows(folder)] == texts  # sorted files, the .md ignored


def test_labels_for_a_classifier(tmp_path: Path) -> None:
    texts = sentences(6)
    (tmp_path / "l.jsonl").write_text(
        "".join(json.dumps({"text": t, "y": i % 3}) + "\n" for i, t in enumerate(texts))
    )
    data = load('heal steps 2 on "l.jsonl" label "y"', tiny_classifier(), tmp_path)
    _, labels = data.train.batch([0, 1, 2, 3])
    assert labels is not None and labels.tolist() == [0, 1, 2, 0]


def test_decoder_text_is_packed_into_full_blocks(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("\n".join(sentences(40)) + "\n")
    data = load('heal steps 2 on "t.txt" max length 16', tiny_decoder(), tmp_path)
    assert data.packed
    lengths = {int(x["input_ids"].shape[0]) for x in data.train.items}
    assert lengths == {16}
    eos = word_tokenizer().eos_token_id
    assert any(eos in x["input_ids"].tolist() for x in data.train.items)  # texts joined by EOS


def test_held_out_share_is_disjoint_and_seeded(tmp_path: Path) -> None:
    texts = [f"{w} one" for w in WORDS[:20]]
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    a = load('heal steps 2 on "t.txt" eval 25%', tiny_encoder(), tmp_path, seed=1)
    b = load('heal steps 2 on "t.txt" eval 25%', tiny_encoder(), tmp_path, seed=1)
    assert a.held_out is not None and len(a.held_out) == 5 and len(a.train) == 15
    first = lambda d: {int(x["input_ids"][0]) for x in d.items}  # noqa: E731
    assert not first(a.train) & first(a.held_out)
    assert first(a.held_out) == first(b.held_out)


# --- bad data: located (the node it names) and explained -------------------------------


@pytest.mark.parametrize(
    ("files", "text", "node", "message"),
    [
        ({}, 'heal steps 1 on "missing.txt"', "on", "does not exist"),
        ({"e.txt": "\n\n  \n"}, 'heal steps 1 on "e.txt"', "on", "holds no text"),
        ({"d.bin": "x"}, 'heal steps 1 on "d.bin"', "on", "unsupported type"),
        (
            {"a.jsonl": '{"txt": "a cat"}\n'},
            'heal steps 1 on "a.jsonl" field "text"',
            "field",
            "no field `text`",
        ),
        (
            {"a.jsonl": '{"text": "a cat"}\n{oops\n'},
            'heal steps 1 on "a.jsonl"',
            "on",
            "cannot read",
        ),
        (
            {"a.jsonl": '{"text": "a", "y": "cat"}\n'},
            'heal steps 1 on "a.jsonl" label "y"',
            "label",
            "not a class number",
        ),
        (
            {"t.txt": "a cat\n"},
            'heal steps 1 on "t.txt" eval on "nope.txt"',
            "eval_on",
            "does not exist",
        ),
        ({"t.txt": "a cat\n"}, 'heal steps 1 on "t.txt" eval 50%', "eval_split", "leaves none"),
    ],
)
def test_bad_data_names_its_node(
    tmp_path: Path, files: dict[str, str], text: str, node: str, message: str
) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(HealDataError, match=message) as err:
        load(text, tiny_classifier(), tmp_path)
    assert err.value.node == node


def test_undecodable_text_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(b"a cat\nthe \xff dog\n")
    with pytest.raises(HealDataError, match="line 2 is not UTF-8"):
        read_rows(tmp_path / "t.txt")


def test_unused_rows_are_not_read(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("\n".join(sentences(500)) + "\n")
    data = load('heal steps 2 on "t.txt" batch 3', tiny_encoder(), tmp_path)
    assert len(data.train) == 6  # 2 steps × 3 examples: the stream stops there
