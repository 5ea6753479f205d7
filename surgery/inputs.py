"""Example and calibration inputs: what a model is called with while it is measured.

* :func:`example_inputs` derives one small, seeded batch from the model itself (HF text,
  decoder-only and vision configs, the example inputs saved in a ``.pt2``, or an
  ``example_inputs`` attribute on a plain module).
* :func:`calibration_inputs` turns a ``calibrate with FILE`` source (tensor file, ``.txt`` or
  ``.jsonl`` text) into batches, or makes seeded random batches when there is no file.
* :func:`flatten_outputs` gives the tensors of any model output in a stable order, so outputs
  of the original and the surgered model can be compared pairwise.

>>> import torch
>>> ins = Inputs((torch.ones(2, 3),), {"mask": torch.ones(2, 3, dtype=torch.long)})
>>> ins.batch_size()
2
>>> ins.to(torch.float16).args[0].dtype, ins.to(torch.float16).kwargs["mask"].dtype
(torch.float16, torch.int64)
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "InputError",
    "Inputs",
    "calibration_inputs",
    "example_inputs",
    "flatten_outputs",
    "prepare_inputs",
]


class InputError(Exception):
    """Inputs could not be made or read; ``str(err)`` is a user-facing sentence."""


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


@dataclass
class Inputs:
    """Positional and keyword arguments of one model call."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def call(self, model: Callable[..., Any]) -> Any:
        """``model(*args, **kwargs)`` without autograd."""
        with torch.no_grad():
            return model(*self.args, **self.kwargs)

    def to(self, device_or_dtype: torch.device | torch.dtype | str) -> Inputs:
        """Move to a device, or cast *floating* tensors to a dtype (ids and masks stay ints)."""
        if isinstance(device_or_dtype, torch.dtype):
            dtype = device_or_dtype

            def fn(t: torch.Tensor) -> torch.Tensor:
                return t.to(dtype) if t.is_floating_point() else t

        else:
            device = torch.device(device_or_dtype)

            def fn(t: torch.Tensor) -> torch.Tensor:
                return t.to(device)

        return Inputs(_map_tensors(self.args, fn), _map_tensors(self.kwargs, fn))

    def batch_size(self) -> int:
        """Leading dimension of the first tensor argument (1 if there is none)."""
        for t in flatten_outputs((self.args, self.kwargs)):
            if t.dim() > 0:
                return int(t.shape[0])
        return 1

    def slice(self, start: int, stop: int) -> Inputs:
        """Rows ``start:stop`` of every tensor whose leading dimension is the batch."""
        n = self.batch_size()

        def fn(t: torch.Tensor) -> torch.Tensor:
            return t[start:stop] if t.dim() > 0 and t.shape[0] == n else t

        return Inputs(_map_tensors(self.args, fn), _map_tensors(self.kwargs, fn))


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Tensors of a model output in a stable order (ModelOutput/dict in key order, depth first).

    >>> import torch
    >>> [t.shape for t in flatten_outputs({"a": torch.zeros(1), "b": (torch.zeros(2), None)})]
    [torch.Size([1]), torch.Size([2])]
    """
    found: list[torch.Tensor] = []

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            found.append(o)
        elif isinstance(o, Mapping):  # HF ModelOutput is an OrderedDict of its non-None fields
            for v in o.values():
                walk(v)
        elif isinstance(o, (tuple, list)):
            for v in o:
                walk(v)

    walk(out)
    return found


# --- example inputs ---------------------------------------------------------------------------


def _unwrap(loaded_or_model: Any) -> tuple[nn.Module, Any, Any]:
    """(model, HF config or None, the LoadedModel or None)."""
    if isinstance(loaded_or_model, nn.Module):
        return loaded_or_model, getattr(loaded_or_model, "config", None), None
    model = getattr(loaded_or_model, "model", None)
    if isinstance(model, nn.Module):
        config = getattr(loaded_or_model, "config", None) or getattr(model, "config", None)
        return model, config, loaded_or_model
    raise InputError(
        f"expected a torch module or a loaded model, got `{type(loaded_or_model).__name__}`"
    )


def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _int_attr(config: Any, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _is_text(config: Any) -> bool:
    return _int_attr(config, "vocab_size") is not None


def _is_vision(config: Any) -> bool:
    return (
        getattr(config, "image_size", None) is not None
        and _int_attr(config, "num_channels") is not None
    )


def _text_inputs(
    model: nn.Module, config: Any, batch: int, seq_len: int, gen: torch.Generator
) -> Inputs:
    vocab = int(config.vocab_size)
    max_pos = _int_attr(config, "max_position_embeddings", "n_positions")
    if max_pos is not None:
        seq_len = min(seq_len, max_pos)
    special = {
        v
        for n in (
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
            "sep_token_id",
            "cls_token_id",
            "unk_token_id",
            "mask_token_id",
            "decoder_start_token_id",
        )
        if isinstance(v := getattr(config, n, None), int)
    }
    allowed = torch.tensor([i for i in range(vocab) if i not in special] or list(range(vocab)))
    ids = allowed[torch.randint(0, len(allowed), (batch, seq_len), generator=gen)]  # (B, T)
    mask = torch.ones(batch, seq_len, dtype=torch.long)  # (B, T)
    if batch >= 2 and seq_len >= 2:
        # Right-pad the last sample to half its length so attention masks actually matter.
        mask[-1, seq_len // 2 :] = 0
        pad = getattr(config, "pad_token_id", None)
        if isinstance(pad, int) and 0 <= pad < vocab:
            ids[-1, seq_len // 2 :] = pad
    params = _forward_params(model)
    kwargs: dict[str, Any] = {"input_ids": ids}
    if "attention_mask" in params or not params:
        kwargs["attention_mask"] = mask
    # Only encoders with segment embeddings get token_type_ids; GPT-2 accepts the argument but
    # would look the zeros up in its token embedding.
    if "token_type_ids" in params and _int_attr(config, "type_vocab_size"):
        kwargs["token_type_ids"] = torch.zeros(batch, seq_len, dtype=torch.long)
    if "use_cache" in params:
        # Decoders (GPT-2, LLaMA) would return KV-cache objects that are not tensors and break
        # export; encoders ignore the flag, so it is passed to every model that accepts it.
        kwargs["use_cache"] = False
    return Inputs((), kwargs)


def _vision_inputs(model: nn.Module, config: Any, batch: int, gen: torch.Generator) -> Inputs:
    size = config.image_size
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    c = int(config.num_channels)
    frames = getattr(config, "num_frames", None)
    if frames:  # video models (VideoMAE, ViViT, ...): (B, T, C, H, W)
        shape: tuple[int, ...] = (batch, int(frames), c, h, w)
    else:  # (B, C, H, W)
        shape = (batch, c, h, w)
    pixels = torch.randn(*shape, generator=gen).to(_float_dtype(model))
    return Inputs((), {"pixel_values": pixels})


def _attr_inputs(model: nn.Module) -> Inputs | None:
    """``model.example_inputs``: Inputs, a tensor, a dict (kwargs), a tuple of args, an
    ``(args, kwargs)`` pair, or a no-argument callable returning one of those."""
    ex = getattr(model, "example_inputs", None)
    if ex is None:
        return None
    if callable(ex) and not isinstance(ex, nn.Module):
        ex = ex()
    if isinstance(ex, Inputs):
        return ex
    if isinstance(ex, torch.Tensor):
        return Inputs((ex,), {})
    if isinstance(ex, Mapping):
        return Inputs((), dict(ex))
    if (
        isinstance(ex, tuple)
        and len(ex) == 2
        and isinstance(ex[0], (tuple, list))
        and isinstance(ex[1], Mapping)
    ):
        return Inputs(tuple(ex[0]), dict(ex[1]))  # the (args, kwargs) pair torch.export uses
    if isinstance(ex, (tuple, list)):
        return Inputs(tuple(ex), {})
    return None


def _no_inputs_error(model: nn.Module) -> InputError:
    return InputError(
        f"cannot derive example inputs for `{type(model).__name__}`: give inputs with "
        "`calibrate with FILE` (a `.pt`/`.safetensors` tensor file), or define an "
        "`example_inputs` attribute on the model"
    )


def example_inputs(
    loaded_or_model: Any, *, batch: int = 2, seq_len: int = 32, seed: int = 0
) -> Inputs:
    """One seeded batch of inputs the model accepts.

    >>> from transformers import BertConfig, BertModel
    >>> m = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
    ...                          num_attention_heads=2, intermediate_size=64))
    >>> ins = example_inputs(m, batch=2, seq_len=8)
    >>> sorted(ins.kwargs), tuple(ins.kwargs["input_ids"].shape)
    (['attention_mask', 'input_ids', 'token_type_ids', 'use_cache'], (2, 8))
    """
    model, config, loaded = _unwrap(loaded_or_model)
    saved = getattr(loaded, "example_inputs", None) if loaded is not None else None
    if saved is not None:
        args, kwargs = saved
        return Inputs(tuple(args), dict(kwargs))
    gen = torch.Generator().manual_seed(seed)
    if config is not None and _is_text(config):
        return _text_inputs(model, config, batch, seq_len, gen)
    if config is not None and _is_vision(config):
        return _vision_inputs(model, config, batch, gen)
    ins = _attr_inputs(model)
    if ins is None:
        raise _no_inputs_error(model)
    return ins


# --- calibration inputs ---------------------------------------------------------------------


def _split(ins: Inputs, batch: int) -> list[Inputs]:
    n = ins.batch_size()
    return [ins.slice(i, min(i + batch, n)) for i in range(0, n, batch)]


def _read_tensor_file(path: Path) -> Inputs:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"cannot read calibration tensors from `{path}`: {first}") from exc
    if isinstance(obj, torch.Tensor):
        return Inputs((obj,), {})
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return Inputs((), {str(k): v for k, v in obj.items()})
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(v, torch.Tensor) for v in obj):
        return Inputs(tuple(obj), {})
    raise InputError(
        f"calibration file `{path}` holds a `{type(obj).__name__}`: expected a tensor (the first "
        "positional input), a list of tensors (positional inputs) or a dict of tensors (keyword inputs)"
    )


# A calibration text longer than this many characters per token of the sequence length is
# cut before tokenizing: the tokenizer keeps only `seq_len` tokens anyway, and handing it a
# whole multi-gigabyte line aborts the process (tokenizers' Rust core) instead of raising.
_CHARS_PER_TOKEN = 64
# A `.jsonl` line must be parsed whole to find its "text"; past this it is refused, not read.
_MAX_JSON_LINE = 16 * 1024 * 1024


def _lines(path: Path, limit: int) -> Iterator[tuple[int, str, bool]]:
    """``(line number, text, complete)`` of each line, at most ``limit`` bytes of each.

    The file is streamed: memory stays near ``limit`` however long the file or its lines.
    ``complete`` is False for a line that was cut. Text that is not UTF-8 is an
    :class:`InputError` naming the line.
    """
    with path.open("rb") as f:
        no = 0
        while True:
            raw = f.readline(limit + 1)
            if not raw:
                return
            no += 1
            complete = raw.endswith(b"\n") or len(raw) <= limit
            if not complete:
                while True:  # skip the rest of an over-long line, a chunk at a time
                    rest = f.readline(1 << 20)
                    if not rest or rest.endswith(b"\n"):
                        break
                raw = raw[:limit]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if complete or exc.start < len(raw) - 3:
                    raise InputError(
                        f"`{path}` line {no} is not UTF-8 text (byte {exc.start + 1} of the "
                        f"line: {exc.reason})"
                    ) from exc
                text = raw[: exc.start].decode("utf-8")  # the cut fell inside a character
            yield no, text.rstrip("\r\n"), complete


def _read_texts(path: Path, samples: int, seq_len: int) -> list[str]:
    """The first ``samples`` texts of a ``.txt`` (one per line) or ``.jsonl`` file."""
    max_chars = max(1, seq_len) * _CHARS_PER_TOKEN
    texts: list[str] = []
    try:
        if path.suffix.lower() == ".txt":
            for _, line, _ in _lines(path, 4 * max_chars):
                if line.strip():
                    texts.append(line.strip())
                    if len(texts) >= samples:
                        break
        else:
            for no, line, complete in _lines(path, _MAX_JSON_LINE):
                if not line.strip():
                    continue
                if not complete:
                    raise InputError(
                        f"`{path}` line {no} is longer than {_MAX_JSON_LINE // (1 << 20)} MiB: "
                        "split the text into several lines"
                    )
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise InputError(f"`{path}` line {no} is not valid JSON: {exc}") from exc
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise InputError(f'`{path}` line {no} has no string "text" field')
                texts.append(obj["text"][:max_chars])
                if len(texts) >= samples:
                    break
    except OSError as exc:
        raise InputError(f"cannot read calibration text `{path}`: {exc.strerror or exc}") from exc
    if not texts:
        raise InputError(f"calibration text `{path}` contains no texts")
    return texts


def _tokenize(
    texts: list[str], model: nn.Module, config: Any, loaded: Any, seq_len: int, path: Path
) -> Inputs:
    model_dir = getattr(loaded, "model_dir", None) if loaded is not None else None
    if model_dir is None:
        raise InputError(
            f"calibration text `{path}` needs a tokenizer, but the model was not loaded from a "
            "Hugging Face directory: give a `.pt`/`.safetensors` tensor file instead"
        )
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:
        raise InputError(
            f"no usable tokenizer in `{model_dir}` for calibration text `{path}`: "
            f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]}"
        ) from exc
    if tok.pad_token is None:  # GPT-2 style tokenizers have no pad token
        tok.pad_token = tok.eos_token or tok.unk_token
    enc = tok(
        texts,
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="pt",
    )
    params = _forward_params(model)
    kwargs: dict[str, Any] = {
        k: v for k, v in enc.items() if not params or k in params or k == "input_ids"
    }
    if "token_type_ids" in kwargs and not (
        config is not None and _int_attr(config, "type_vocab_size")
    ):
        del kwargs["token_type_ids"]
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return Inputs((), kwargs)


def calibration_inputs(
    source: str | Path | None,
    loaded: Any,
    *,
    samples: int = 32,
    batch: int = 8,
    seq_len: int = 64,
    seed: int = 0,
) -> list[Inputs]:
    """Calibration batches: from a tensor/text file, or seeded random ones when ``source`` is None.

    At most ``samples`` rows are used, in batches of ``batch`` (the last may be smaller).
    Inputs fixed by the model (a ``.pt2``'s saved example, an ``example_inputs`` attribute)
    cannot be resampled: they are repeated until ``samples`` rows are covered.
    """
    if samples <= 0 or batch <= 0:
        raise InputError(
            f"samples and batch must be positive, got samples={samples}, batch={batch}"
        )
    model, config, loaded_model = _unwrap(loaded)
    if source is None:
        if (
            config is not None
            and (_is_text(config) or _is_vision(config))
            and getattr(loaded_model, "example_inputs", None) is None
        ):
            ins = example_inputs(loaded, batch=samples, seq_len=seq_len, seed=seed)
            return _split(ins, batch)
        fixed = example_inputs(loaded, seed=seed)
        return [fixed] * max(1, math.ceil(samples / max(1, fixed.batch_size())))
    path = Path(source)
    if not path.is_file():
        raise InputError(f"calibration file `{path}` does not exist")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".safetensors"):
        ins = _read_tensor_file(path)
    elif suffix in (".txt", ".jsonl"):
        texts = _read_texts(path, samples, seq_len)
        ins = _tokenize(texts, model, config, loaded_model, seq_len, path)
    else:
        raise InputError(
            f"calibration file `{path}` has an unsupported type `{suffix or path.name}`: "
            "use `.pt`/`.safetensors` tensors, `.txt` (one text per line) or `.jsonl` "
            '(objects with a "text" field)'
        )
    ins = ins.slice(0, min(samples, ins.batch_size()))
    return _split(ins, batch)


def prepare_inputs(
    loaded_or_model: Any,
    source: Path | None,
    *,
    samples: int,
    batch: int,
    seed: int = 0,
) -> tuple[Inputs, list[Inputs]]:
    """A run's example inputs and calibration batches (``calibrate with SOURCE``, or drawn
    from the model when ``source`` is None).

    A model that cannot make its own example inputs runs on the first calibration batch.
    """
    try:
        example: Inputs | None = example_inputs(loaded_or_model, seed=seed)
    except InputError:
        if source is None:
            raise
        example = None
    calibration = calibration_inputs(
        source, loaded_or_model, samples=samples, batch=batch, seed=seed
    )
    return (example if example is not None else calibration[0]), calibration
