"""Decode calibration media: audio clips (``.wav``, ``.flac``, ``.ogg``) and images.

Audio is read with `soundfile` when it is installed (``pip install 'surgery[audio]'``);
without it, PCM ``.wav`` files are still read with the standard library's :mod:`wave`, and
any other audio file is a :class:`MediaError` that says what to install. Images need Pillow.
Every failure is a :class:`MediaError` whose message names the file.

>>> import tempfile, wave
>>> from pathlib import Path
>>> path = Path(tempfile.mkdtemp()) / "tone.wav"
>>> with wave.open(str(path), "wb") as w:
...     w.setnchannels(1); w.setsampwidth(2); w.setframerate(8000)
...     w.writeframes(b"\\x00\\x40" * 800)
>>> clip, rate = read_audio(path)
>>> tuple(clip.shape), rate, round(float(clip[0]), 3)
((800,), 8000, 0.5)
>>> tuple(resample(clip, 8000, 16000).shape)
(1600,)
"""

from __future__ import annotations

import wave
from pathlib import Path

import torch

__all__ = [
    "AUDIO_SUFFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "MediaError",
    "read_audio",
    "read_image",
    "resample",
]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MediaError(Exception):
    """A media file could not be decoded; ``str(err)`` is a user-facing sentence."""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def read_audio(path: Path) -> tuple[torch.Tensor, int]:
    """``(samples, rate)``: the clip as mono float32 in [-1, 1] (channels averaged)."""
    try:
        import soundfile
    except ImportError:
        soundfile = None
    if soundfile is not None:
        try:
            data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except Exception as exc:
            raise MediaError(f"cannot read audio `{path}`: {_first_line(exc)}") from exc
        clip = torch.from_numpy(data).mean(dim=1)  # (frames, channels) -> (frames,)
        return clip.contiguous(), int(rate)
    if path.suffix.lower() != ".wav":
        raise MediaError(
            f"reading `{path}` needs the `soundfile` package (`pip install soundfile`, or "
            "`pip install 'surgery[audio]'`); without it only PCM `.wav` files are read"
        )
    return _read_wav(path)


def _read_wav(path: Path) -> tuple[torch.Tensor, int]:
    """A PCM ``.wav`` read with the standard library (8-bit unsigned, 16/24/32-bit signed)."""
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (OSError, EOFError, wave.Error) as exc:
        raise MediaError(f"cannot read audio `{path}`: {_first_line(exc)}") from exc
    if width not in (1, 2, 3, 4) or channels < 1:
        raise MediaError(f"`{path}` is a {8 * width}-bit WAV: only PCM 8/16/24/32-bit is read")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    data = data[: len(data) - len(data) % (width * channels)].reshape(-1, width)  # (n, width)
    if width == 1:  # unsigned, centred on 128
        values = data[:, 0].to(torch.float32) - 128.0
    else:  # little-endian signed: assemble the bytes, then sign-extend
        values = torch.zeros(len(data), dtype=torch.int64)
        for i in range(width):
            values |= data[:, i].to(torch.int64) << (8 * i)
        sign = 1 << (8 * width - 1)
        values = ((values ^ sign) - sign).to(torch.float32)
    scale = float(1 << (8 * width - 1))
    clip = (values / scale).reshape(-1, channels).mean(dim=1)  # (frames,)
    return clip, rate


def resample(clip: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """``clip`` at ``target`` samples per second (linear interpolation; unchanged if equal)."""
    if rate == target or clip.numel() == 0:
        return clip
    length = max(1, round(clip.numel() * target / rate))
    out = torch.nn.functional.interpolate(
        clip.reshape(1, 1, -1), size=length, mode="linear", align_corners=False
    )
    return out.reshape(-1)


def read_image(
    path: Path,
    size: tuple[int, int],
    channels: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> torch.Tensor:
    """The image at ``size`` (height, width), scaled to [0, 1], normalised: ``(C, H, W)``."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise MediaError(
            f"reading the image `{path}` needs Pillow (`pip install pillow`); or give the "
            "pixels as a tensor file (`.safetensors` with a `pixel_values` entry)"
        ) from exc
    if channels not in (1, 3):
        raise MediaError(
            f"the model takes {channels}-channel images, which `{path}` cannot give: give the "
            "pixels as a tensor file (`.safetensors` with a `pixel_values` entry)"
        )
    try:
        with Image.open(path) as opened:
            img = opened.convert("RGB" if channels == 3 else "L")
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            data = bytearray(img.tobytes())
    except Exception as exc:
        raise MediaError(f"cannot read the image `{path}`: {_first_line(exc)}") from exc
    pixels = torch.frombuffer(data, dtype=torch.uint8).to(torch.float32) / 255.0
    pixels = pixels.reshape(size[0], size[1], channels).permute(2, 0, 1)  # (C, H, W)
    m = torch.tensor(mean[:channels] if len(mean) >= channels else mean[:1] * channels)
    s = torch.tensor(std[:channels] if len(std) >= channels else std[:1] * channels)
    return (pixels - m[:, None, None]) / s[:, None, None]
