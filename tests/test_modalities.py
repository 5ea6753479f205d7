"""Inputs for every modality, as a user meets them: `surgery apply` and `surgery load` on tiny
encoder–decoder (T5, BART), audio (Whisper, Wav2Vec2), text–image (CLIP), video (VideoMAE)
and CNN (ResNet, ConvNeXt) models built from Hugging Face configs, with and without a
`calibrate with FILE` line (tensor files, `.wav`/`.flac` audio, image folders)."""

from __future__ import annotations

import math
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from surgery.cli import main
from surgery.inputs import InputError, calibration_inputs, example_inputs, flatten_outputs
from surgery.load import load_model


def t5() -> nn.Module:
    from transformers import T5Config, T5Model

    cfg = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    return T5Model(cfg)


def bart() -> nn.Module:
    from transformers import BartConfig, BartModel

    return BartModel(
        BartConfig(
            vocab_size=100,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
        )
    )


def whisper() -> nn.Module:
    from transformers import WhisperConfig, WhisperModel

    return WhisperModel(
        WhisperConfig(
            vocab_size=100,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=16,
            max_source_positions=16,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
    )


def wav2vec2() -> nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    return Wav2Vec2Model(
        Wav2Vec2Config(
            vocab_size=32,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(16, 16),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
        )
    )


def clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(
        CLIPConfig(
            text_config={
                "vocab_size": 100,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "max_position_embeddings": 32,
            },
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            projection_dim=16,
        )
    )


def videomae() -> nn.Module:
    from transformers import VideoMAEConfig, VideoMAEModel

    return VideoMAEModel(
        VideoMAEConfig(
            image_size=32,
            patch_size=8,
            num_frames=4,
            tubelet_size=2,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )


def resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    return ResNetModel(cfg)


def convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextModel

    return ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "t5": t5,
    "bart": bart,
    "whisper": whisper,
    "wav2vec2": wav2vec2,
    "clip": clip,
    "videomae": videomae,
    "resnet": resnet,
    "convnext": convnext,
}
# CNNs have no Linear layer (no classification head): their recipe decomposes convolutions.
RECIPES = {"resnet": "decompose Conv2d rank = 0.5\n", "convnext": "decompose Conv2d rank = 0.5\n"}


def save(name: str, root: Path) -> Path:
    torch.manual_seed(0)
    d = root / name
    FAMILIES[name]().save_pretrained(d, safe_serialization=True)
    return d


def write_wav(path: Path, seconds: float, rate: int = 16000, freq: float = 440.0) -> None:
    n = int(seconds * rate)
    samples = [int(12000 * math.sin(2 * math.pi * freq * i / rate)) for i in range(n)]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(s.to_bytes(2, "little", signed=True) for s in samples))


def write_images(folder: Path, count: int, size: int = 40) -> None:
    pil = pytest.importorskip("PIL.Image")
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(3)
    for i in range(count):
        data = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8)
        pil.fromarray(data.numpy()).save(folder / f"img{i:02d}.png")


def apply(recipe: Path, model: Path, out: Path, *extra: str) -> int:
    return main(["apply", str(recipe), str(model), "-o", str(out), "--no-measure", "-q", *extra])


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "bart" else n for n in sorted(FAMILIES)],
)
def test_apply_and_load_without_calibrate(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every modality gets example inputs from its config alone: apply works, OUT reloads."""
    model_dir = save(name, tmp_path)
    recipe = tmp_path / "r.surg"
    recipe.write_text(RECIPES.get(name, "decompose Linear rank = 0.5\n"))
    out = tmp_path / "out"
    assert apply(recipe, model_dir, out) == 0, capsys.readouterr().err
    assert "matched no module" not in capsys.readouterr().err
    assert main(["load", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ran the example inputs" in printed


def test_encoder_decoder_example_inputs_have_decoder_ids() -> None:
    for factory in (t5, bart):
        model = factory().eval()
        ins = example_inputs(model, batch=2, seq_len=8)
        ids, dec = ins.kwargs["input_ids"], ins.kwargs["decoder_input_ids"]
        assert dec.shape == ids.shape == (2, 8)
        cfg = model.config
        start = getattr(cfg, "decoder_start_token_id", None)
        start = start if start is not None else cfg.pad_token_id  # T5 starts with its pad id
        assert (dec[:, 0] == start).all() and torch.equal(dec[:, 1:], ids[:, :-1])
        out = ins.call(model)
        assert out.last_hidden_state.shape == (2, 8, 32)


def test_audio_and_video_example_shapes() -> None:
    ins = example_inputs(whisper(), batch=3)
    # Whisper's encoder takes exactly 2 × max_source_positions frames of num_mel_bins
    assert ins.kwargs["input_features"].shape == (3, 16, 32)
    assert ins.kwargs["decoder_input_ids"][:, 0].eq(1).all()
    ins = example_inputs(wav2vec2(), batch=2, seq_len=32)
    # conv strides 5·2 and receptive field 20: 31·10 + 20 samples give 32 frames
    assert ins.kwargs["input_values"].shape == (2, 330)
    out = ins.call(wav2vec2().eval())
    assert out.last_hidden_state.shape == (2, 32, 32)
    assert example_inputs(videomae()).kwargs["pixel_values"].shape == (2, 4, 3, 32, 32)
    assert example_inputs(resnet()).kwargs["pixel_values"].shape == (2, 3, 224, 224)
    clip_ins = example_inputs(clip())
    assert set(clip_ins.kwargs) >= {"input_ids", "pixel_values"}


def test_tensor_file_is_used_and_completed_for_t5(tmp_path: Path) -> None:
    """A tensor file with only `input_ids` feeds T5: decoder ids are teacher-forced from it."""
    model_dir = save("t5", tmp_path)
    ids = torch.randint(3, 100, (6, 10), generator=torch.Generator().manual_seed(5))
    path = tmp_path / "calib.safetensors"
    save_file({"input_ids": ids}, path)
    loaded = load_model(model_dir)
    batches = calibration_inputs(path, loaded, samples=6, batch=4)
    assert [b.batch_size() for b in batches] == [4, 2]
    got = torch.cat([b.kwargs["input_ids"] for b in batches])
    assert torch.equal(got, ids)
    dec = torch.cat([b.kwargs["decoder_input_ids"] for b in batches])
    assert torch.equal(dec[:, 1:], ids[:, :-1]) and (dec[:, 0] == 0).all()
    recipe = tmp_path / "r.surg"
    recipe.write_text(
        f'calibrate with "{path.name}" samples 6 batch 3\n'
        "decompose Linear rank = 0.5 method svd-llm\n"
    )
    assert apply(recipe, model_dir, tmp_path / "out") == 0


def _wav_folder(root: Path) -> Path:
    folder = root / "clips"
    folder.mkdir()
    write_wav(folder / "a.wav", 0.05, rate=8000, freq=300.0)  # resampled to 16 kHz
    write_wav(folder / "b.wav", 0.1, rate=16000, freq=500.0)
    return folder


def test_wav_folder_gives_normalised_waveform_windows(tmp_path: Path) -> None:
    model_dir = save("wav2vec2", tmp_path)
    folder = _wav_folder(tmp_path)
    batches = calibration_inputs(folder, load_model(model_dir), samples=16, batch=8, seq_len=32)
    waves = torch.cat([b.kwargs["input_values"] for b in batches])
    # a.wav: 400 samples at 8 kHz -> 800 at 16 kHz -> 2 windows of 330; b.wav: 1600 -> 4
    assert waves.shape == (6, 330)
    assert torch.allclose(waves.mean(dim=1), torch.zeros(6), atol=1e-4)
    assert torch.allclose(waves.std(dim=1, unbiased=False), torch.ones(6), atol=1e-3)
    # the windows are the clips, not random numbers: a pure tone correlates with itself
    first = waves[2]  # b.wav's first window (500 Hz at 16 kHz: a period of 32 samples)
    assert (
        float(torch.dot(first[:-32], first[32:]) / (first[:-32].norm() * first[32:].norm())) > 0.99
    )


def test_wav2vec2_apply_with_audio_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = save("wav2vec2", tmp_path)
    _wav_folder(tmp_path)
    recipe = tmp_path / "r.surg"
    recipe.write_text(
        'calibrate with "clips" samples 6 batch 3\ndecompose Linear rank = 0.5 method svd-llm\n'
    )
    out = tmp_path / "out"
    assert apply(recipe, model_dir, out) == 0, capsys.readouterr().err
    assert main(["load", str(out)]) == 0


def test_whisper_wav_gives_log_mel_features(tmp_path: Path) -> None:
    model_dir = save("whisper", tmp_path)
    clip_path = tmp_path / "speech.wav"
    write_wav(clip_path, 0.5)  # 8000 samples; a window is 32 frames × hop 160 = 5120
    loaded = load_model(model_dir)
    batches = calibration_inputs(clip_path, loaded, samples=4, batch=4)
    assert len(batches) == 1
    ins = batches[0]
    feats = ins.kwargs["input_features"]
    assert feats.shape == (1, 16, 32)
    assert ins.kwargs["decoder_input_ids"].shape[0] == 1
    random_feats = example_inputs(loaded, batch=1).kwargs["input_features"]
    assert not torch.allclose(feats, random_feats)
    out = ins.call(loaded.model)
    assert out.last_hidden_state.shape[0] == 1


def test_flac_via_soundfile(tmp_path: Path) -> None:
    soundfile = pytest.importorskip("soundfile")
    model_dir = save("wav2vec2", tmp_path)
    t = torch.arange(1600, dtype=torch.float32) / 16000
    soundfile.write(
        str(tmp_path / "tone.flac"), (0.3 * torch.sin(2 * math.pi * 440 * t)).numpy(), 16000
    )
    batches = calibration_inputs(
        tmp_path / "tone.flac", load_model(model_dir), samples=8, seq_len=32
    )
    assert torch.cat([b.kwargs["input_values"] for b in batches]).shape == (4, 330)


def test_flac_without_soundfile_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "soundfile", None)  # `import soundfile` fails
    model_dir = save("wav2vec2", tmp_path)
    (tmp_path / "x.flac").write_bytes(b"fLaC")
    with pytest.raises(InputError, match="needs the `soundfile` package"):
        calibration_inputs(tmp_path / "x.flac", load_model(model_dir))


def test_image_folder_for_cnn_clip_and_video(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    write_images(folder, 8)
    res = load_model(save("resnet", tmp_path))
    batches = calibration_inputs(folder, res, samples=5, batch=4)
    pixels = torch.cat([b.kwargs["pixel_values"] for b in batches])
    assert pixels.shape == (5, 3, 224, 224)
    # ImageNet-normalised [0, 1] pixels lie within [-0.485/0.229, (1-0.406)/0.225]
    assert float(pixels.min()) >= -2.2 and float(pixels.max()) <= 2.7
    clip_loaded = load_model(save("clip", tmp_path))
    ins = calibration_inputs(folder, clip_loaded, samples=3, batch=3)[0]
    assert ins.kwargs["pixel_values"].shape == (3, 3, 32, 32)
    assert ins.kwargs["input_ids"].shape[0] == 3  # the text half is drawn like the example's
    ins.call(clip_loaded.model)
    video = load_model(save("videomae", tmp_path))
    ins = calibration_inputs(folder, video, samples=4)[0]
    assert ins.kwargs["pixel_values"].shape == (2, 4, 3, 32, 32)  # 8 frames: 2 clips of 4


def test_clip_apply_with_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = save("clip", tmp_path)
    write_images(tmp_path / "images", 4)
    recipe = tmp_path / "r.surg"
    recipe.write_text('calibrate with "images" samples 4 batch 2\nsparsify Linear 2:4\n')
    assert apply(recipe, model_dir, tmp_path / "out") == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("family", "make", "expected"),
    [
        ("t5", lambda p: _wav_folder(p), "takes token ids"),
        ("resnet", lambda p: _wav_folder(p), "takes images"),
        ("whisper", lambda p: (p / "t.txt", (p / "t.txt").write_text("hello\n"))[0], "audio"),
        ("wav2vec2", lambda p: (write_images(p / "im", 1), p / "im")[1], "takes audio"),
    ],
)
def test_calibration_that_does_not_fit_the_model_is_located(
    family: str,
    make: Callable[[Path], Path],
    expected: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model_dir = save(family, tmp_path)
    source = make(tmp_path)
    recipe = tmp_path / "r.surg"
    recipe.write_text(f'calibrate with "{source.name}"\ndecompose Linear rank = 0.5\n')
    assert apply(recipe, model_dir, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "S0320" in err and "does not fit" in err and expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_empty_media_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("x")
    loaded: Any = load_model(save("resnet", tmp_path))
    with pytest.raises(InputError, match="holds no audio"):
        calibration_inputs(tmp_path / "empty", loaded)


def test_outputs_are_deterministic_for_every_family() -> None:
    for factory in FAMILIES.values():
        torch.manual_seed(0)
        model = factory().eval()
        a = flatten_outputs(example_inputs(model, seed=4).call(model))
        b = flatten_outputs(example_inputs(model, seed=4).call(model))
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_model_directorys_processors_are_used(tmp_path: Path) -> None:
    """A `preprocessor_config.json` decides the audio rate, the feature extractor and the
    image normalisation."""
    from transformers import WhisperFeatureExtractor

    model_dir = save("whisper", tmp_path)
    WhisperFeatureExtractor(feature_size=16, sampling_rate=8000).save_pretrained(model_dir)
    clip_path = tmp_path / "speech.wav"
    write_wav(clip_path, 0.7, rate=16000)  # resampled to the extractor's 8 kHz: 5600 samples
    ins = calibration_inputs(clip_path, load_model(model_dir), samples=4)[0]
    assert ins.kwargs["input_features"].shape == (1, 16, 32)  # one window of 32 × 160

    res_dir = save("resnet", tmp_path)
    (res_dir / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 48, '
        '"width": 64}, "do_center_crop": false}'
    )
    write_images(tmp_path / "images", 2)
    loaded = load_model(res_dir)
    pixels = calibration_inputs(tmp_path / "images", loaded, samples=2)[0].kwargs["pixel_values"]
    assert pixels.shape == (2, 3, 48, 64)
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0  # (x - 0.5) / 0.5
    assert example_inputs(loaded).kwargs["pixel_values"].shape == (2, 3, 48, 64)


def test_plain_cnn_gets_images_without_changing_it(tmp_path: Path) -> None:
    """A CNN without a config (a torchvision-style module) is probed with 224×224 images; the
    probe runs in eval mode, so batch-norm statistics stay as they were."""
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).train()
    stats = cnn[1].running_mean.clone()
    ins = example_inputs(cnn)
    assert tuple(ins.args[0].shape) == (2, 3, 224, 224)
    assert torch.equal(cnn[1].running_mean, stats) and cnn.training
    flat = nn.Sequential(nn.Linear(4, 4))  # no way to tell what a plain MLP takes
    with pytest.raises(InputError, match="calibrate with FILE"):
        example_inputs(flat)
