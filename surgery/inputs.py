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
    "DriftRows",
    "InputError",
    "Inputs",
    "calibration_inputs",
    "example_inputs",
    "flatten_outputs",
    "held_out_inputs",
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


def _sub_config(config: Any, name: str) -> Any | None:
    sub = getattr(config, name, None)
    return sub if sub is not None and not isinstance(sub, (dict, str, int, float)) else None


def _processor_config(loaded: Any) -> dict[str, Any]:
    """The model directory's ``preprocessor_config.json`` (read as JSON only), or ``{}``."""
    model_dir = getattr(loaded, "model_dir", None) if loaded is not None else None
    if model_dir is None:
        return {}
    path = Path(model_dir) / "preprocessor_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError, RecursionError):
        return {}
    return raw if isinstance(raw, dict) else {}


# What a model's forward is fed, by modality.
Modality = str  # "text" | "text+pixels" | "pixels" | "features" | "waveform"


def _modality(model: nn.Module, config: Any) -> Modality | None:
    """Which kind of inputs ``model`` takes, from its main input and its config.

    >>> from transformers import ResNetConfig, ResNetModel
    >>> _modality(ResNetModel(ResNetConfig(hidden_sizes=[8], depths=[1])), None)
    'pixels'
    """
    params = _forward_params(model)
    main = getattr(model, "main_input_name", None)
    if main == "input_features" or "input_features" in params:
        return "features"
    if main == "input_values" or "input_values" in params:
        return "waveform"
    if (
        config is not None
        and _sub_config(config, "text_config") is not None
        and _sub_config(config, "vision_config") is not None
        and {"input_ids", "pixel_values"} <= params
    ):
        return "text+pixels"
    if config is not None and _is_text(config) and ("input_ids" in params or not params):
        return "text"
    if main == "pixel_values" or "pixel_values" in params:
        return "pixels"
    if config is not None and _is_vision(config):
        return "pixels"
    return None


_SPECIAL_IDS = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "cls_token_id",
    "unk_token_id",
    "mask_token_id",
    "decoder_start_token_id",
)


def _random_ids(config: Any, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``(batch, length)`` token ids drawn from the vocabulary without special tokens."""
    vocab = int(config.vocab_size)
    special = {v for n in _SPECIAL_IDS if isinstance(v := getattr(config, n, None), int)}
    allowed = torch.tensor([i for i in range(vocab) if i not in special] or list(range(vocab)))
    return allowed[torch.randint(0, len(allowed), (batch, length), generator=gen)]


def _text_inputs(
    model: nn.Module, config: Any, batch: int, seq_len: int, gen: torch.Generator
) -> Inputs:
    vocab = int(config.vocab_size)
    max_pos = _int_attr(config, "max_position_embeddings", "n_positions")
    if max_pos is not None:
        seq_len = min(seq_len, max_pos)
    ids = _random_ids(config, batch, seq_len, gen)  # (B, T)
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
    return Inputs((), kwargs)


def _image_size(config: Any, loaded: Any) -> tuple[int, int]:
    """(height, width): the config's ``image_size``, else the image processor's, else 224."""
    size = getattr(config, "image_size", None) if config is not None else None
    if size is None:
        proc = _processor_config(loaded)
        size = proc.get("crop_size") if proc.get("do_center_crop", True) else None
        size = size or proc.get("size")
        if isinstance(size, dict):
            if "height" in size and "width" in size:
                size = (size["height"], size["width"])
            else:
                size = size.get("shortest_edge")
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return int(size[0]), int(size[1])
    return 224, 224


def _pixel_shape(config: Any, loaded: Any, batch: int) -> tuple[int, ...]:
    h, w = _image_size(config, loaded)
    c = (_int_attr(config, "num_channels") if config is not None else None) or 3
    frames = getattr(config, "num_frames", None) if config is not None else None
    if isinstance(frames, int) and frames > 0:  # video models (VideoMAE, ViViT, ...)
        return (batch, frames, c, h, w)
    return (batch, c, h, w)


def _vision_inputs(
    model: nn.Module, config: Any, loaded: Any, batch: int, gen: torch.Generator
) -> Inputs:
    pixels = torch.randn(*_pixel_shape(config, loaded, batch), generator=gen)
    return Inputs((), {"pixel_values": pixels.to(_float_dtype(model))})


def _text_image_inputs(
    model: nn.Module, config: Any, loaded: Any, batch: int, seq_len: int, gen: torch.Generator
) -> Inputs:
    """Token ids from ``text_config`` and pixels from ``vision_config`` (CLIP, SigLIP, ...)."""
    text = _text_inputs(model, config.text_config, batch, seq_len, gen)
    pixels = _vision_inputs(model, config.vision_config, loaded, batch, gen)
    return Inputs((), {**text.kwargs, **pixels.kwargs})


def _audio_rate(loaded: Any) -> int:
    rate = _processor_config(loaded).get("sampling_rate")
    return rate if isinstance(rate, int) and rate > 0 else 16000


def _waveform_length(config: Any, frames: int) -> int:
    """Samples a waveform encoder turns into ``frames`` frames (its conv feature encoder).

    >>> from types import SimpleNamespace
    >>> _waveform_length(SimpleNamespace(conv_kernel=(10, 3), conv_stride=(5, 2)), 32)
    330
    """
    kernels = getattr(config, "conv_kernel", None)
    strides = getattr(config, "conv_stride", None)
    if (
        isinstance(kernels, (tuple, list))
        and isinstance(strides, (tuple, list))
        and len(kernels) == len(strides) > 0
    ):
        field, hop = 1, 1
        for k, s in zip(kernels, strides, strict=True):
            field += (int(k) - 1) * hop
            hop *= int(s)
        return (max(1, frames) - 1) * hop + field
    return max(1, frames) * 320  # wav2vec2's 20 ms per frame at 16 kHz


def _waveform_inputs(
    model: nn.Module, config: Any, batch: int, seq_len: int, gen: torch.Generator
) -> Inputs:
    """Normalised random waveforms (the feature extractor's zero mean, unit variance)."""
    length = _waveform_length(config, seq_len)
    waves = torch.randn(batch, length, generator=gen).to(_float_dtype(model))
    return Inputs((), {"input_values": waves})


def _feature_frames(config: Any, seq_len: int) -> int:
    """Frames of log-mel features the encoder takes: Whisper needs exactly 2×its positions."""
    positions = _int_attr(config, "max_source_positions")
    if _int_attr(config, "num_mel_bins") is not None and positions is not None:
        return 2 * positions
    return max(1, seq_len) * 4


def _feature_inputs(
    model: nn.Module, config: Any, batch: int, seq_len: int, gen: torch.Generator
) -> Inputs | None:
    """Random log-mel features: Whisper ``(B, mel, frames)``, Speech2Text ``(B, frames, F)``."""
    frames = _feature_frames(config, seq_len)
    dtype = _float_dtype(model)
    mels = _int_attr(config, "num_mel_bins")
    if mels is not None:
        return Inputs(
            (), {"input_features": torch.randn(batch, mels, frames, generator=gen).to(dtype)}
        )
    per_channel = _int_attr(config, "input_feat_per_channel")
    if per_channel is not None:
        width = per_channel * (_int_attr(config, "input_channels") or 1)
        feats = torch.randn(batch, frames, width, generator=gen).to(dtype)
        return Inputs((), {"input_features": feats})
    return None


def _decoder_ids(config: Any, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``(B, T)`` decoder ids: the decoder start token, then random tokens."""
    limit = _int_attr(config, "max_target_positions", "max_position_embeddings", "n_positions")
    length = max(1, min(seq_len, limit) if limit is not None else seq_len)
    ids = _random_ids(config, batch, length, gen)
    start = _int_attr(config, "decoder_start_token_id", "bos_token_id", "pad_token_id")
    if start is not None and 0 <= start < int(config.vocab_size):
        ids[:, 0] = start
    return ids


def _shift_right(config: Any, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced decoder ids for ``ids``: the start token, then ``ids`` without its last.

    >>> from types import SimpleNamespace
    >>> _shift_right(SimpleNamespace(decoder_start_token_id=0), torch.tensor([[5, 6, 7]]))
    tensor([[0, 5, 6]])
    """
    start = _int_attr(config, "decoder_start_token_id", "bos_token_id", "pad_token_id") or 0
    out = ids.new_full(ids.shape, start)
    out[:, 1:] = ids[:, :-1]
    return out


def _model_inputs(
    model: nn.Module, config: Any, loaded: Any, batch: int, seq_len: int, gen: torch.Generator
) -> Inputs | None:
    """Seeded random inputs for ``model``'s modality (None when it cannot be told)."""
    modality = _modality(model, config)
    ins: Inputs | None
    if modality == "features":
        ins = _feature_inputs(model, config, batch, seq_len, gen) if config is not None else None
    elif modality == "waveform":
        ins = _waveform_inputs(model, config, batch, seq_len, gen)
    elif modality == "text+pixels":
        ins = _text_image_inputs(model, config, loaded, batch, seq_len, gen)
    elif modality == "text":
        ins = _text_inputs(model, config, batch, seq_len, gen)
    elif modality == "pixels":
        ins = _vision_inputs(model, config, loaded, batch, gen)
    else:
        ins = None
    if ins is not None:
        _finish(model, config, ins, gen, seq_len)
    return ins


def _finish(model: nn.Module, config: Any, ins: Inputs, gen: torch.Generator, seq_len: int) -> None:
    """Add what every call of ``model`` needs besides its main inputs, in place: decoder ids
    for an encoder–decoder (teacher-forced from ``input_ids`` when there are some) and
    ``use_cache=False``."""
    params = _forward_params(model)
    kwargs = ins.kwargs
    if (
        "decoder_input_ids" in params
        and "decoder_input_ids" not in kwargs
        and "decoder_inputs_embeds" not in kwargs
        and config is not None
        and _is_text(config)
    ):
        ids = kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            kwargs["decoder_input_ids"] = _shift_right(config, ids)
        else:
            kwargs["decoder_input_ids"] = _decoder_ids(config, ins.batch_size(), seq_len, gen)
    if "use_cache" in params:
        # Decoders (GPT-2, LLaMA, T5) would return KV-cache objects that are not tensors and
        # break export; encoders ignore the flag, so it is passed to every model that accepts it.
        kwargs["use_cache"] = False


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
        "`calibrate with FILE` (a `.pt`/`.safetensors` tensor file, or text, audio or an image "
        "folder the model takes), or define an `example_inputs` attribute on the model"
    )


def example_inputs(
    loaded_or_model: Any, *, batch: int = 2, seq_len: int = 32, seed: int = 0
) -> Inputs:
    """One seeded batch of inputs the model accepts.

    Text models get token ids (and decoder ids when they are encoder–decoders), vision models
    pixels (video models a clip of ``num_frames``), text–image models (CLIP) both, audio
    encoders normalised waveforms and speech models (Whisper) log-mel features, at the shapes
    their configs and feature extractors give.

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
    ins = _model_inputs(model, config, loaded, batch, seq_len, gen)
    if ins is None:
        ins = _attr_inputs(model)
    if ins is None:
        ins = _image_probe(model, batch, gen)
    if ins is None:
        raise _no_inputs_error(model)
    return ins


def _image_probe(model: nn.Module, batch: int, gen: torch.Generator) -> Inputs | None:
    """Images for a plain CNN (a torchvision ResNet): when the first layer with weights is a
    ``Conv2d``, a ``(B, in_channels, 224, 224)`` batch, kept only if the model runs on it.

    >>> cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> tuple(example_inputs(cnn).args[0].shape)
    (2, 3, 224, 224)
    """
    first = next(
        (
            m
            for m in model.modules()
            if not any(True for _ in m.children())
            and any(True for _ in m.parameters(recurse=False))
        ),
        None,
    )
    if not isinstance(first, nn.Conv2d):
        return None
    pixels = torch.randn(batch, first.in_channels, 224, 224, generator=gen)
    ins = Inputs((pixels.to(_float_dtype(model)),), {})
    was_training = model.training
    model.eval()  # in training mode the trial would update batch-norm statistics
    try:
        ins.call(model)
    except Exception:
        return None
    finally:
        model.train(was_training)
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
    return Inputs((), kwargs)


_MODALITY_HINT = {
    "text": "token ids: give `.txt`/`.jsonl` text or a tensor file with `input_ids`",
    "text+pixels": "token ids and images: give an image folder, text or a tensor file",
    "pixels": "images: give a folder of images or a tensor file with `pixel_values`",
    "features": "audio features: give `.wav`/`.flac` audio (a file or a folder) or a tensor "
    "file with `input_features`",
    "waveform": "audio: give `.wav`/`.flac` audio (a file or a folder) or a tensor file with "
    "`input_values`",
}


def _misfit(what: str, path: Path, model: nn.Module, modality: Modality | None) -> InputError:
    takes = _MODALITY_HINT.get(modality or "", "inputs that only a tensor file can give")
    return InputError(
        f"calibration {what} `{path}` does not fit `{type(model).__name__}`, which takes {takes}"
    )


def _media_files(path: Path) -> tuple[list[Path], list[Path]]:
    """(audio files, image files) of a calibration file or folder, in name order."""
    from surgery.media import AUDIO_SUFFIXES, IMAGE_SUFFIXES

    if path.is_dir():
        try:
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        except OSError as exc:
            raise InputError(
                f"cannot list calibration folder `{path}`: {exc.strerror or exc}"
            ) from exc
    else:
        files = [path]
    audio = [p for p in files if p.suffix.lower() in AUDIO_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return audio, images


def _windows(clip: torch.Tensor, length: int) -> list[torch.Tensor]:
    """``clip`` cut into whole windows of ``length`` samples (a shorter clip is zero-padded)."""
    if clip.numel() <= length:
        return [torch.nn.functional.pad(clip, (0, length - clip.numel()))]
    return [clip[i : i + length] for i in range(0, clip.numel() - length + 1, length)]


def _audio_windows(files: list[Path], rate: int, length: int, samples: int) -> list[torch.Tensor]:
    from surgery.media import MediaError, read_audio, resample

    found: list[torch.Tensor] = []
    for file in files:
        try:
            clip, clip_rate = read_audio(file)
        except MediaError as exc:
            raise InputError(str(exc)) from exc
        found += _windows(resample(clip, clip_rate, rate), length)
        if len(found) >= samples:
            break
    return found[:samples]


def _feature_extractor(model: nn.Module, config: Any, loaded: Any, path: Path) -> Any:
    """The model's feature extractor (its directory's, else Whisper's for a Whisper config)."""
    model_dir = getattr(loaded, "model_dir", None) if loaded is not None else None
    try:
        if model_dir is not None and (Path(model_dir) / "preprocessor_config.json").is_file():
            from transformers import AutoFeatureExtractor

            return AutoFeatureExtractor.from_pretrained(
                str(model_dir), local_files_only=True, trust_remote_code=False
            )
        mels = _int_attr(config, "num_mel_bins") if config is not None else None
        if mels is not None:
            from transformers import WhisperFeatureExtractor

            return WhisperFeatureExtractor(feature_size=mels)
    except Exception as exc:
        raise InputError(
            f"cannot build the feature extractor for calibration audio `{path}`: "
            f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]}"
        ) from exc
    raise InputError(
        f"calibration audio `{path}` needs the model's feature extractor "
        "(`preprocessor_config.json` in the model directory), which `"
        f"{type(model).__name__}` does not have: give a tensor file with `input_features`"
    )


def _audio_inputs(
    files: list[Path],
    path: Path,
    model: nn.Module,
    config: Any,
    loaded: Any,
    modality: Modality | None,
    samples: int,
    seq_len: int,
) -> Inputs:
    """Audio clips as the model takes them: normalised waveforms or log-mel features."""
    dtype = _float_dtype(model)
    if modality == "waveform":
        rate = _audio_rate(loaded)
        length = _waveform_length(config, seq_len)
        windows = _audio_windows(files, rate, length, samples)
        waves = torch.stack(windows)  # (N, samples)
        if _processor_config(loaded).get("do_normalize", True):
            mean = waves.mean(dim=1, keepdim=True)
            var = waves.var(dim=1, keepdim=True, unbiased=False)
            waves = (waves - mean) / torch.sqrt(var + 1e-7)
        return Inputs((), {"input_values": waves.to(dtype)})
    if modality != "features":
        raise _misfit("audio", path, model, modality)
    fe = _feature_extractor(model, config, loaded, path)
    rate = int(getattr(fe, "sampling_rate", 16000))
    hop = getattr(fe, "hop_length", None)
    frames = _feature_frames(config, seq_len)
    whisper_like = isinstance(hop, int) and hasattr(fe, "n_samples")
    length = frames * hop if isinstance(hop, int) and whisper_like else rate * 4
    windows = _audio_windows(files, rate, length, samples)
    arrays = [w.numpy() for w in windows]
    try:
        if whisper_like:
            enc = fe(arrays, sampling_rate=rate, return_tensors="pt", max_length=length)
        else:
            enc = fe(arrays, sampling_rate=rate, return_tensors="pt", padding=True)
    except Exception as exc:
        raise InputError(
            f"the feature extractor cannot read calibration audio `{path}`: "
            f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]}"
        ) from exc
    feats = enc["input_features"]
    if whisper_like and feats.shape[-1] != frames:  # the encoder takes exactly `frames`
        feats = torch.nn.functional.pad(feats, (0, max(0, frames - feats.shape[-1])))
        feats = feats[..., :frames]
    kwargs: dict[str, Any] = {"input_features": feats.to(dtype)}
    mask = enc.get("attention_mask")
    if mask is not None and not whisper_like and "attention_mask" in _forward_params(model):
        kwargs["attention_mask"] = mask
    return Inputs((), kwargs)


def _image_inputs(
    files: list[Path],
    path: Path,
    model: nn.Module,
    config: Any,
    loaded: Any,
    modality: Modality | None,
    samples: int,
) -> Inputs:
    """Images resized to the model's size and normalised (its processor's mean and std, else
    ImageNet's); a video model gets clips of ``num_frames`` consecutive images."""
    from surgery.media import IMAGENET_MEAN, IMAGENET_STD, MediaError, read_image

    if modality not in ("pixels", "text+pixels"):
        raise _misfit("images", path, model, modality)
    vision = config.vision_config if modality == "text+pixels" else config
    shape = _pixel_shape(vision, loaded, 1)
    frames = shape[1] if len(shape) == 5 else 1
    channels, h, w = shape[-3:]
    proc = _processor_config(loaded)
    mean = proc.get("image_mean")
    std = proc.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and mean and std):
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    needed = samples * frames
    if len(files) < frames:
        raise InputError(
            f"calibration folder `{path}` has {len(files)} image(s), but a clip of "
            f"`{type(model).__name__}` is {frames} frames: give at least {frames} images "
            "(consecutive images make one clip)"
        )
    try:
        pics = [read_image(f, (h, w), channels, tuple(mean), tuple(std)) for f in files[:needed]]
    except MediaError as exc:
        raise InputError(str(exc)) from exc
    pixels = torch.stack(pics[: len(pics) - len(pics) % frames])  # (N·T, C, H, W)
    if len(shape) == 5:
        pixels = pixels.reshape(-1, frames, channels, h, w)  # (N, T, C, H, W)
    return Inputs((), {"pixel_values": pixels.to(_float_dtype(model))})


# The inputs a file may leave out for a model that takes several (CLIP given only images).
_MAIN_INPUTS = ("input_ids", "pixel_values", "input_features", "input_values")


def _complete(
    model: nn.Module, config: Any, loaded: Any, ins: Inputs, seq_len: int, seed: int
) -> Inputs:
    """``ins`` with the model's other main inputs drawn at random (as for the example inputs),
    decoder ids for an encoder–decoder (teacher-forced from ``input_ids``) and
    ``use_cache=False``. Positional inputs are taken as given."""
    if ins.args:
        return ins
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = dict(ins.kwargs)
    missing = [k for k in _MAIN_INPUTS if k not in kwargs]
    if missing and any(k in kwargs for k in _MAIN_INPUTS):
        drawn = _model_inputs(model, config, loaded, ins.batch_size(), seq_len, gen)
        for key in missing:
            if drawn is not None and key in drawn.kwargs:
                kwargs[key] = drawn.kwargs[key]
                mask = drawn.kwargs.get("attention_mask")
                if key == "input_ids" and mask is not None and "attention_mask" not in kwargs:
                    kwargs["attention_mask"] = mask
    out = Inputs((), kwargs)
    _finish(model, config, out, gen, seq_len)
    return out


def _refuse_unknown_keys(model: nn.Module, ins: Inputs, path: Path) -> None:
    """A tensor file's keyword inputs must be inputs the model's ``forward`` names: a model
    that takes ``**kwargs`` (Hugging Face's) would otherwise drop a misnamed key silently,
    and the run would calibrate on inputs drawn at random instead of the user's data."""
    params = _forward_params(model)
    named = (
        {
            n
            for n, p in inspect.signature(model.forward).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
        if params
        else set()
    )
    # `labels` are read by quality contracts (`expect accuracy`), not fed to the model.
    unknown = sorted(k for k in ins.kwargs if named and k not in named and k != "labels")
    if unknown:
        takes = ", ".join(f"`{n}`" for n in sorted(named) if n in _MAIN_INPUTS or "mask" in n)
        raise InputError(
            f"calibration file `{path}` holds `{unknown[0]}`, which `{type(model).__name__}` "
            f"does not take" + (f" (it takes {takes}, ...)" if takes else "")
        )


def _file_rows(
    path: Path,
    model: nn.Module,
    config: Any,
    loaded_model: Any,
    modality: Modality | None,
    samples: int,
    seq_len: int,
) -> Inputs:
    """The rows of a calibration file or folder (at least the first ``samples`` it has)."""
    if not (path.is_file() or path.is_dir()):
        raise InputError(f"calibration file `{path}` does not exist")
    suffix = "" if path.is_dir() else path.suffix.lower()
    if suffix in (".pt", ".pth", ".safetensors"):
        ins = _read_tensor_file(path)
        _refuse_unknown_keys(model, ins, path)
    elif suffix in (".txt", ".jsonl"):
        if modality not in (None, "text", "text+pixels"):
            raise _misfit("text", path, model, modality)
        text_config = config.text_config if modality == "text+pixels" else config
        max_pos = (
            _int_attr(text_config, "max_position_embeddings", "n_positions")
            if text_config is not None
            else None
        )
        length = min(seq_len, max_pos) if max_pos is not None else seq_len
        texts = _read_texts(path, samples, length)
        ins = _tokenize(texts, model, text_config, loaded_model, length, path)
    else:
        audio, images = _media_files(path)
        if audio and (modality in ("waveform", "features") or not images):
            ins = _audio_inputs(
                audio, path, model, config, loaded_model, modality, samples, seq_len
            )
        elif images:
            ins = _image_inputs(images, path, model, config, loaded_model, modality, samples)
        elif path.is_dir():
            raise InputError(
                f"calibration folder `{path}` holds no audio (`.wav`, `.flac`, `.ogg`) or "
                "images (`.png`, `.jpg`, ...): give such files, or a tensor or text file"
            )
        else:
            raise InputError(
                f"calibration file `{path}` has an unsupported type `{suffix or path.name}`: "
                "use `.pt`/`.safetensors` tensors, `.txt` (one text per line) or `.jsonl` "
                '(objects with a "text" field), `.wav`/`.flac`/`.ogg` audio, or a folder of '
                "images or audio clips"
            )
    return ins


def calibration_inputs(
    source: str | Path | None,
    loaded: Any,
    *,
    samples: int = 32,
    batch: int = 8,
    seq_len: int = 64,
    seed: int = 0,
) -> list[Inputs]:
    """Calibration batches from ``source``, or seeded random ones when it is None.

    ``source`` is a tensor file (``.pt``/``.safetensors``: a tensor, a list or a dict of
    model inputs), text (``.txt``/``.jsonl``, tokenized with the model's tokenizer), audio
    (``.wav``/``.flac``/``.ogg``, one clip or a folder of clips, resampled to the feature
    extractor's rate and cut into windows the model takes: waveforms for wav2vec2-style
    encoders, log-mel features for Whisper) or a folder of images (resized to the model's size;
    a video model takes consecutive images as one clip). What a file leaves out of a model's
    inputs is completed: an encoder–decoder gets decoder ids teacher-forced from the input ids,
    and a text–image model (CLIP) given only images or only text gets the other half drawn at
    random, as for the example inputs.

    At most ``samples`` rows are used, in batches of ``batch`` (the last may be smaller).
    Inputs fixed by the model (a ``.pt2``'s saved example, an ``example_inputs`` attribute)
    cannot be resampled: they are repeated until ``samples`` rows are covered.
    """
    if samples <= 0 or batch <= 0:
        raise InputError(
            f"samples and batch must be positive, got samples={samples}, batch={batch}"
        )
    model, config, loaded_model = _unwrap(loaded)
    modality = _modality(model, config)
    if source is None:
        if modality is not None and getattr(loaded_model, "example_inputs", None) is None:
            ins = example_inputs(loaded, batch=samples, seq_len=seq_len, seed=seed)
            return _split(ins, batch)
        fixed = example_inputs(loaded, seed=seed)
        return [fixed] * max(1, math.ceil(samples / max(1, fixed.batch_size())))
    ins = _file_rows(Path(source), model, config, loaded_model, modality, samples, seq_len)
    ins = ins.slice(0, min(samples, ins.batch_size()))
    ins = _complete(model, config, loaded_model, ins, seq_len, seed)
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


# --- drift rows -----------------------------------------------------------------------------


@dataclass
class DriftRows:
    """Rows to measure a run's final drift on, and what they are.

    ``fresh`` is True when no row of ``batches`` is a calibration row: data-aware steps
    (`svd-llm`, `asvd`, `by sensitivity`, Wanda scores, `by similarity`, `heal`) fit to the
    calibration rows, so a drift measured on those rows says little about other inputs. When
    ``fresh`` is False, ``batches`` is empty and ``description`` says why.
    """

    batches: list[Inputs]
    fresh: bool
    description: str


def _like(ins: Inputs, gen: torch.Generator) -> Inputs:
    """Random tensors with the shapes, dtypes and value ranges of ``ins``'s tensors."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() or t.is_complex():
            ref = t.detach().to(torch.float64)
            std = float(ref.std()) if t.numel() > 1 else 1.0
            noise = torch.randn(tuple(t.shape), generator=gen, dtype=torch.float64)
            return (noise * (std or 1.0) + float(ref.mean())).to(t.dtype)
        if t.dtype == torch.bool or t.numel() == 0:
            return t.clone()
        lo, hi = int(t.min()), int(t.max())  # ids stay in the range the example used
        return torch.randint(lo, hi + 1, tuple(t.shape), generator=gen).to(t.dtype)

    return Inputs(_map_tensors(ins.args, fn), _map_tensors(ins.kwargs, fn))


def held_out_inputs(
    loaded_or_model: Any,
    source: Path | None,
    *,
    samples: int,
    batch: int,
    seed: int = 0,
    seq_len: int = 64,
) -> DriftRows:
    """Rows the run's data-aware steps never saw, for its final drift (see :class:`DriftRows`).

    * inputs drawn from the model (no ``calibrate`` line): ``samples`` other random rows;
    * inputs fixed by the model (a ``.pt2``'s saved example, an ``example_inputs``
      attribute): random rows with the example's shapes, dtypes and value ranges;
    * a calibration file: its rows after the first ``samples`` (up to ``samples`` of them);
      a file with no more rows gives ``fresh=False``.

    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
    ...                              num_attention_heads=2, intermediate_size=64))
    >>> calib = calibration_inputs(None, model, samples=4, batch=2)
    >>> rows = held_out_inputs(model, None, samples=4, batch=2)
    >>> rows.fresh, len(rows.batches), rows.description
    (True, 2, '2 fresh random batches (4 rows), not the calibration rows')
    >>> bool((rows.batches[0].kwargs["input_ids"] != calib[0].kwargs["input_ids"]).any())
    True
    """
    if samples <= 0 or batch <= 0:
        raise InputError(
            f"samples and batch must be positive, got samples={samples}, batch={batch}"
        )
    model, config, loaded = _unwrap(loaded_or_model)
    other = seed + 7919  # another seed than the calibration rows'
    if source is None:
        modality = _modality(model, config)
        if modality is not None and getattr(loaded, "example_inputs", None) is None:
            ins = example_inputs(loaded_or_model, batch=samples, seq_len=seq_len, seed=other)
            batches = _split(ins, batch)
            return DriftRows(
                batches,
                True,
                f"{len(batches)} fresh random batches ({samples} rows), not the calibration rows",
            )
        fixed = example_inputs(loaded_or_model, seed=seed)
        gen = torch.Generator().manual_seed(other)
        count = max(1, math.ceil(samples / max(1, fixed.batch_size())))
        batches = [_like(fixed, gen) for _ in range(count)]
        return DriftRows(
            batches,
            True,
            f"{count} random batches shaped like the model's fixed example inputs (the "
            "calibration rows are that example, repeated)",
        )
    path = Path(source)
    modality = _modality(model, config)
    rows = _file_rows(path, model, config, loaded, modality, 2 * samples, seq_len)
    total = rows.batch_size()
    if total <= samples:
        return DriftRows(
            [],
            False,
            f"`{path.name}` has no rows beyond the {samples} calibration rows, so drift is "
            "measured on the rows data-aware steps were fitted to; give a file with more "
            "rows than `samples` to measure it on held-out ones",
        )
    held = rows.slice(samples, min(total, 2 * samples))
    held = _complete(model, config, loaded, held, seq_len, other)
    batches = _split(held, batch)
    first, last = samples + 1, samples + held.batch_size()
    return DriftRows(
        batches,
        True,
        f"{len(batches)} held-out batches (rows {first}–{last} of `{path.name}`), not the "
        "calibration rows",
    )
