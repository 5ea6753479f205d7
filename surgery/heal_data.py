"""Training and held-out data for ``heal … on "DATA"``: read, tokenised, split, batched.

Sources (:func:`read_rows`), each a file or a folder of such files (read in sorted order):

* ``.txt`` — one example per non-empty line;
* ``.jsonl`` / ``.json`` — objects with the ``field`` (default ``"text"``);
* ``.csv`` — a header row naming the ``field``;
* ``.parquet`` — a column named by ``field``;
* a folder written by Hugging Face ``datasets``' ``save_to_disk`` (its ``train`` split when
  it holds several).

Files are read through ``datasets`` in streaming mode, so only the rows training can use are
read (:func:`rows_needed`). Texts are tokenised with the model's own tokenizer. Decoders'
texts are *packed*: joined with the end-of-sequence token and cut into blocks of ``max
length`` tokens, so no step is spent on padding; encoders' examples are single texts, padded
per batch to the longest of the batch.

A held-out split is a file of its own (``eval on``) or a seeded share of the rows
(``eval P``), taken *before* packing, so no held-out text is ever part of a training block.

Every problem with the data (:class:`HealDataError`) names the recipe node it is about, so the
manager reports it at the string the user wrote, before any training starts.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "a.jsonl").write_text('{"text": "one"}\\n{"text": "two"}\\n')
>>> [r.text for r in read_rows(d / "a.jsonl", field="text", limit=10)]
['one', 'two']
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from surgery.inputs import Inputs

__all__ = [
    "SUFFIXES",
    "Examples",
    "HealDataError",
    "Row",
    "TrainingData",
    "build_examples",
    "is_decoder",
    "read_rows",
    "rows_needed",
]

#: File types a training or held-out source may hold, and the `datasets` builder of each.
SUFFIXES: dict[str, str] = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
#: Most rows read from one source, whatever the run could use: a bound on memory.
ROW_LIMIT = 2_000_000
#: Longest text kept before tokenising (characters): tokenizers' Rust core aborts on huge lines.
TEXT_LIMIT = 100_000


class HealDataError(Exception):
    """Bad training or held-out data. ``node`` is the recipe node to point at: ``"on"``,
    ``"eval_on"``, ``"field"``, ``"label"``, ``"eval_split"``, ``"task"`` or ``"kl"``."""

    def __init__(self, message: str, node: str = "on", help: str | None = None) -> None:
        super().__init__(message)
        self.node = node
        self.help = help


@dataclass(frozen=True)
class Row:
    """One example as read: its text and, for classifiers, its label."""

    text: str
    label: int | None = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _files(path: Path, node: str) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            kinds = ", ".join(f"`{s}`" for s in SUFFIXES)
            raise HealDataError(
                f"`{path}` has an unsupported type `{path.suffix or path.name}`",
                node,
                f"use {kinds} files, a folder of them, or a `datasets` save_to_disk folder",
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise HealDataError(
            f"the folder `{path}` holds no `.txt`, `.jsonl`, `.csv` or `.parquet` file",
            node,
            "put the training text in such files, or save a data set with `save_to_disk`",
        )
    return files


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").is_file()
        or (path / "state.json").is_file()
        or (path / "dataset_dict.json").is_file()
    )


def _columns_error(field: str, columns: Sequence[str], node: str) -> HealDataError:
    from surgery.diagnostics import nearest

    guess = nearest(field, list(columns))
    listed = ", ".join(f"`{c}`" for c in columns) or "none"
    return HealDataError(
        f"the data has no field `{field}` (its fields: {listed})",
        node,
        f'did you mean `field "{guess}"`?' if guess else 'name one with `field "NAME"`',
    )


def _label(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise HealDataError(
            f"label `{str(value)[:40]}` of {where} is not a class number",
            "label",
            "labels must be integers 0 … classes−1",
        )
    return int(value)


def _records(path: Path, field: str, label: str | None, node: str) -> Iterator[dict[str, Any]]:
    """Raw records of a source, streamed (``datasets``), as dicts."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if _is_saved_dataset(path):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise HealDataError(
                f"cannot read the saved data set `{path}`: {_first_line(exc)}", node
            ) from exc
        if isinstance(loaded, datasets.DatasetDict):
            split = "train" if "train" in loaded else next(iter(loaded), None)
            if split is None:
                raise HealDataError(f"the saved data set `{path}` has no split", node)
            loaded = loaded[split]
        yield from loaded
        return
    for file in _files(path, node):
        builder = SUFFIXES[file.suffix.lower()]
        if builder == "text":
            yield from _text_lines(file, node)
            continue
        try:
            stream = datasets.load_dataset(
                builder, data_files=[str(file)], split="train", streaming=True
            )
            yield from stream
        except HealDataError:
            raise
        except Exception as exc:
            raise HealDataError(f"cannot read `{file}`: {_first_line(exc)}", node) from exc


def _text_lines(file: Path, node: str) -> Iterator[dict[str, Any]]:
    """One record per line of a text file; a line that is not UTF-8 is an error naming it."""
    with file.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise HealDataError(
                    f"`{file}` line {number} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                    node,
                    "save the file as UTF-8",
                ) from exc
            yield {"text": line.rstrip("\r\n")}


def read_rows(
    path: Path,
    *,
    field: str = "text",
    label: str | None = None,
    limit: int = ROW_LIMIT,
    node: str = "on",
    field_node: str = "field",
) -> list[Row]:
    """At most ``limit`` non-empty rows of a source (see the module docstring)."""
    if not path.exists():
        raise HealDataError(
            f"the data `{path}` does not exist", node, "paths are relative to the recipe's folder"
        )
    rows: list[Row] = []
    seen = 0
    records = _records(path, field, label, node)
    while len(rows) < limit:
        try:
            record = next(records)
        except StopIteration:
            break
        except HealDataError:
            raise
        except Exception as exc:  # pyarrow or json errors, surfacing while streaming
            raise HealDataError(
                f"cannot read `{path}` after {seen} rows: {_first_line(exc)}", node
            ) from exc
        seen += 1
        if field not in record:
            raise _columns_error(field, list(record), field_node)
        text = record[field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise HealDataError(
                f"field `{field}` of row {seen} of `{path}` is not text ({type(text).__name__})",
                field_node,
                "name a column that holds text",
            )
        text = text.strip()[:TEXT_LIMIT]
        if not text:
            continue
        value = None
        if label is not None:
            if label not in record:
                raise _columns_error(label, list(record), "label")
            value = _label(record[label], f"row {seen} of `{path}`")
        rows.append(Row(text, value))
    if not rows:
        raise HealDataError(
            f"the data `{path}` holds no text" + (f" in field `{field}`" if seen else ""),
            node,
            "give a file with at least one non-empty example",
        )
    return rows


def is_decoder(model: nn.Module) -> bool:
    """A causal language model (trained on packed blocks with the next-token loss)."""
    name = type(model).__name__
    return "CausalLM" in name or "LMHeadModel" in name


def rows_needed(examples: int, packed: bool, max_length: int, split: float | None) -> int:
    """How many rows to read for ``examples`` training examples (packed: blocks of
    ``max_length`` tokens, assuming at least one token per row), with room for a held-out
    share ``split``."""
    need = examples * (max_length if packed else 1)
    if split:
        need = math.ceil(need / (1 - split)) + 1
    return max(1, min(ROW_LIMIT, need))


@dataclass
class Examples:
    """Tokenised examples: each a dict of 1-D tensors (``input_ids``, ``attention_mask``, …)
    with its label; :meth:`batch` collates a list of them into one model call."""

    items: list[dict[str, Tensor]]
    labels: list[int] | None
    pad_id: int
    forward_keys: frozenset[str]
    use_cache: bool

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, indices: Sequence[int]) -> tuple[Inputs, Tensor | None]:
        """``(inputs, labels)`` of these examples, padded (right) to the longest."""
        chosen = [self.items[i] for i in indices]
        width = max(int(x["input_ids"].shape[0]) for x in chosen)
        kwargs: dict[str, Any] = {}
        for key in chosen[0]:
            pad = self.pad_id if key == "input_ids" else 0
            rows = []
            for x in chosen:
                t = x[key]
                if t.shape[0] < width:
                    t = torch.cat([t, t.new_full((width - t.shape[0],), pad)])
                rows.append(t)
            kwargs[key] = torch.stack(rows)
        if self.use_cache:
            kwargs["use_cache"] = False
        labels = (
            torch.tensor([self.labels[i] for i in indices]) if self.labels is not None else None
        )
        return Inputs((), kwargs), labels


def _tokenizer(loaded: Any, tokenizer: Any) -> Any:
    if tokenizer is not None:
        return tokenizer
    model_dir = getattr(loaded, "model_dir", None)
    if model_dir is None:
        raise HealDataError(
            "training text needs the model's tokenizer, but the model was not loaded from a "
            "Hugging Face directory",
            "on",
            "load the model from its Hugging Face folder (with its tokenizer files)",
        )
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:
        raise HealDataError(
            f"no usable tokenizer in `{model_dir}`: {_first_line(exc)}", "on"
        ) from exc


def build_examples(
    rows: list[Row],
    model: nn.Module,
    tokenizer: Any,
    *,
    max_length: int,
    packed: bool,
) -> Examples:
    """Tokenise rows into examples (packed into blocks for decoders)."""
    import inspect

    try:
        params = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = set()
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and limit > 0:
        max_length = min(max_length, limit)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    texts = [r.text for r in rows]
    if packed:
        enc = tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
        eos = tokenizer.eos_token_id
        stream: list[int] = []
        for ids in enc:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
        blocks = len(stream) // max_length
        if blocks == 0:  # less text than one block: one shorter block
            blocks, max_length = 1, len(stream)
        items = []
        for b in range(blocks):
            ids = torch.tensor(stream[b * max_length : (b + 1) * max_length], dtype=torch.long)
            item = {"input_ids": ids}
            if "attention_mask" in params:
                item["attention_mask"] = torch.ones_like(ids)
            items.append(item)
        return Examples(items, None, int(pad_id), frozenset(params), "use_cache" in params)
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    keys = [k for k in enc if not params or k in params or k == "input_ids"]
    if "token_type_ids" in keys and not getattr(config, "type_vocab_size", None):
        keys.remove("token_type_ids")
    items = [
        {k: torch.tensor(enc[k][i], dtype=torch.long) for k in keys} for i in range(len(texts))
    ]
    labels = [r.label for r in rows if r.label is not None]
    return Examples(
        items,
        labels if labels and len(labels) == len(rows) else None,
        int(pad_id),
        frozenset(params),
        "use_cache" in params,
    )


@dataclass
class TrainingData:
    """The training examples and the held-out ones of one ``heal``."""

    train: Examples
    held_out: Examples | None
    batch: int  # examples per micro-batch
    packed: bool
    source: str  # what the progress line and the report call it

    @classmethod
    def load(
        cls,
        statement: Any,
        model: nn.Module,
        *,
        loaded: Any = None,
        tokenizer: Any = None,
        base: Path | None = None,
        seed: int = 0,
    ) -> TrainingData:
        """Read, split and tokenise the data a ``heal`` statement names (``on`` is set)."""
        from surgery.heal_config import HealConfig

        d = HealConfig.of(statement)
        base = base or Path.cwd()

        def resolve(text: str) -> Path:
            p = Path(text)
            return p if p.is_absolute() else base / p

        packed = is_decoder(model)
        label = statement.label.value if statement.label is not None else None
        if statement.label is not None and packed:
            raise HealDataError(
                "`label` names class labels, but this model is a language model",
                "label",
                "remove `label`: a decoder's task loss is the next-token loss",
            )
        split = statement.eval_split.magnitude if statement.eval_split is not None else None
        examples = d.steps * d.batch * d.accumulate
        limit = rows_needed(examples, packed, d.max_length, split)
        rows = read_rows(resolve(statement.on.value), field=d.field, label=label, limit=limit)
        held_rows: list[Row] | None = None
        if statement.eval_on is not None:
            held_rows = read_rows(
                resolve(statement.eval_on.value),
                field=d.field,
                label=label,
                limit=ROW_LIMIT,
                node="eval_on",
            )
        elif split is not None:
            gen = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(rows), generator=gen).tolist()
            n_held = math.ceil(split * len(rows))
            if n_held >= len(rows):
                raise HealDataError(
                    f"a held-out share of {split:.0%} of {len(rows)} rows leaves none to train on",
                    "eval_split",
                    "give more data or a smaller share",
                )
            held = set(order[:n_held])
            held_rows = [r for i, r in enumerate(rows) if i in held]
            rows = [r for i, r in enumerate(rows) if i not in held]
        tok = _tokenizer(loaded, tokenizer)
        if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None):
            tok.pad_token = tok.eos_token
        train = build_examples(rows, model, tok, max_length=d.max_length, packed=packed)
        held_out = (
            build_examples(held_rows, model, tok, max_length=d.max_length, packed=packed)
            if held_rows
            else None
        )
        return cls(train, held_out, d.batch, packed, statement.on.value)
