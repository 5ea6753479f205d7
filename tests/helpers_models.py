"""Tiny models shared by tests: importable factories (``tests.helpers_models:tiny_mlp``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "ARCHS",
    "TinyMLP",
    "Untraceable",
    "WideMLP",
    "broken_factory",
    "mismatched_mlp",
    "tiny_bert",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_mlp",
    "tiny_vit",
    "wide_mlp",
]


class TinyMLP(nn.Module):
    """Two linears; ``example_inputs`` makes it usable without calibration data."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)
        self.example_inputs = (torch.randn(3, 8, generator=torch.Generator().manual_seed(0)),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 8) -> (B, 4)
        return self.fc2(self.act(self.fc1(x)))


def tiny_mlp() -> nn.Module:
    """Factory for `--arch tests.helpers_models:tiny_mlp` (deterministic weights)."""
    torch.manual_seed(0)
    return TinyMLP()


def broken_factory() -> nn.Module:
    raise RuntimeError("factory exploded")


class Untraceable(nn.Module):
    """Data-dependent Python control flow: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.b(self.a(x))
        return self.a(x)


def tiny_bert(vocab: int = 100) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    return BertModel(cfg).eval()


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=100,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=1,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        attn_implementation="eager",
    )
    return ViTModel(cfg).eval()


class WideMLP(nn.Module):
    """Wide enough that low-rank factors save parameters: 64→128→16."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(128, 16)
        self.example_inputs = (torch.randn(4, 64, generator=torch.Generator().manual_seed(0)),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 64) -> (B, 16)
        return self.fc2(self.act(self.fc1(x)))


def wide_mlp() -> nn.Module:
    """Factory for ``--arch tests.helpers_models:wide_mlp`` (seeded weights)."""
    torch.manual_seed(0)
    return WideMLP()


def mismatched_mlp() -> nn.Module:
    """A WideMLP whose ``example_inputs`` have the wrong width (64 expected, 10 given)."""
    model = wide_mlp()
    model.example_inputs = (torch.zeros(2, 10),)
    return model


# --- one tiny random-weight model per architecture family (the coverage matrix) ---------------
#
# Hidden size 32, 4 heads, 3 repeated blocks (so `skip tokens ... after block 1` and
# `truncate blocks keep 1` have room), eager attention so that the exported graph shows the
# attention's softmax. Each builder is seeded, offline, and returns the model in eval mode.

_TEXT = {"vocab_size": 96, "max_position_embeddings": 64}


def _kw(**kwargs: Any) -> dict[str, Any]:
    """Config keywords (transformers' config classes take more than their stubs declare)."""
    return kwargs


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return build().eval()


def arch_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        **_kw(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            attn_implementation="eager",
            **_TEXT,
        )
    )
    return _seeded(lambda: BertModel(cfg))


def arch_distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertModel

    cfg = DistilBertConfig(
        **_kw(dim=32, n_layers=3, n_heads=4, hidden_dim=64, attn_implementation="eager", **_TEXT)
    )
    return _seeded(lambda: DistilBertModel(cfg))


def arch_deberta_v2() -> nn.Module:
    from transformers import DebertaV2Config, DebertaV2Model

    cfg = DebertaV2Config(
        **_kw(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            relative_attention=True,
            position_buckets=16,
            max_relative_positions=32,
            pos_att_type=["p2c", "c2p"],
            type_vocab_size=2,
            **_TEXT,
        )
    )
    return _seeded(lambda: DebertaV2Model(cfg))


def arch_albert() -> nn.Module:
    from transformers import AlbertConfig, AlbertModel

    cfg = AlbertConfig(
        **_kw(
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            attn_implementation="eager",
            **_TEXT,
        )
    )
    return _seeded(lambda: AlbertModel(cfg))


def arch_bart() -> nn.Module:
    from transformers import BartConfig, BartModel

    cfg = BartConfig(
        **_kw(
            d_model=32,
            encoder_layers=3,
            decoder_layers=3,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            attn_implementation="eager",
            **_TEXT,
        )
    )
    return _seeded(lambda: BartModel(cfg))


def _t5_config() -> Any:
    from transformers import T5Config

    return T5Config(
        **_kw(
            vocab_size=96,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=3,
            num_decoder_layers=3,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            attn_implementation="eager",
        )
    )


def arch_t5_encoder() -> nn.Module:
    from transformers import T5EncoderModel

    cfg = _t5_config()
    return _seeded(lambda: T5EncoderModel(cfg))


def arch_t5() -> nn.Module:
    from transformers import T5ForConditionalGeneration

    cfg = _t5_config()
    return _seeded(lambda: T5ForConditionalGeneration(cfg))


def arch_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        **_kw(
            vocab_size=96,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=1,
            attn_implementation="eager",
        )
    )
    return _seeded(lambda: GPT2LMHeadModel(cfg))


def arch_gpt_neox() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        **_kw(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            rotary_pct=0.5,
            bos_token_id=0,
            eos_token_id=1,
            attn_implementation="eager",
            **_TEXT,
        )
    )
    return _seeded(lambda: GPTNeoXForCausalLM(cfg))


def arch_opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        **_kw(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            ffn_dim=64,
            word_embed_proj_dim=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
            attn_implementation="eager",
            **_TEXT,
        )
    )
    return _seeded(lambda: OPTForCausalLM(cfg))


def arch_bloom() -> nn.Module:
    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(
        **_kw(
            vocab_size=96,
            hidden_size=32,
            n_layer=3,
            n_head=4,
            bos_token_id=0,
            eos_token_id=1,
            attn_implementation="eager",
        )
    )
    return _seeded(lambda: BloomForCausalLM(cfg))


def arch_falcon() -> nn.Module:
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(
        **_kw(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            new_decoder_architecture=False,
            multi_query=False,
            bos_token_id=0,
            eos_token_id=1,
            attn_implementation="eager",
            **_TEXT,
        )
    )
    return _seeded(lambda: FalconForCausalLM(cfg))


def arch_phi3() -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        **_kw(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
            attn_implementation="eager",
            **_TEXT,
        )
    )
    return _seeded(lambda: Phi3ForCausalLM(cfg))


def arch_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **_kw(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            bos_token_id=0,
            eos_token_id=1,
            attn_implementation="eager",
            **_TEXT,
        )
    )
    return _seeded(lambda: LlamaForCausalLM(cfg))


def arch_clip_text() -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        **_kw(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            projection_dim=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
            attn_implementation="eager",
            **_TEXT,
        )
    )
    return _seeded(lambda: CLIPTextModel(cfg))


def arch_clip_vision() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        **_kw(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=16,
            attn_implementation="eager",
        )
    )
    return _seeded(lambda: CLIPVisionModel(cfg))


def arch_clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        **_TEXT,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    }
    cfg = CLIPConfig(
        **_kw(
            text_config=text, vision_config=vision, projection_dim=16, attn_implementation="eager"
        )
    )
    return _seeded(lambda: CLIPModel(cfg))


def arch_vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        **_kw(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            attn_implementation="eager",
        )
    )
    return _seeded(lambda: ViTModel(cfg))


def arch_swin() -> nn.Module:
    from transformers import SwinConfig, SwinModel

    cfg = SwinConfig(
        **_kw(
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[2, 2],
            num_heads=[2, 4],
            window_size=4,
            attn_implementation="eager",
        )
    )
    return _seeded(lambda: SwinModel(cfg))


def arch_videomae() -> nn.Module:
    from transformers import VideoMAEConfig, VideoMAEModel

    cfg = VideoMAEConfig(
        **_kw(
            image_size=16,
            patch_size=8,
            num_frames=4,
            tubelet_size=2,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            attn_implementation="eager",
        )
    )
    return _seeded(lambda: VideoMAEModel(cfg))


def arch_convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextModel

    cfg = ConvNextConfig(
        **_kw(num_channels=3, hidden_sizes=[8, 16], depths=[2, 3], image_size=32, num_stages=2)
    )
    return _seeded(lambda: ConvNextModel(cfg))


def arch_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(
        **_kw(
            num_channels=3,
            embedding_size=8,
            hidden_sizes=[8, 16],
            depths=[2, 3],
            layer_type="basic",
            image_size=32,
        )
    )
    return _seeded(lambda: ResNetModel(cfg))


def arch_whisper() -> nn.Module:
    from transformers import WhisperConfig, WhisperModel

    cfg = WhisperConfig(
        **_kw(
            vocab_size=96,
            num_mel_bins=16,
            d_model=32,
            encoder_layers=3,
            decoder_layers=3,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_source_positions=16,
            max_target_positions=32,
            decoder_start_token_id=0,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=1,
            attn_implementation="eager",
        )
    )
    return _seeded(lambda: WhisperModel(cfg))


def arch_wav2vec2() -> nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(
        **_kw(
            vocab_size=32,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            conv_dim=(16, 16),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            attn_implementation="eager",
        )
    )
    return _seeded(lambda: Wav2Vec2Model(cfg))


ARCHS: dict[str, Callable[[], nn.Module]] = {
    "bert": arch_bert,
    "distilbert": arch_distilbert,
    "deberta-v2": arch_deberta_v2,
    "albert": arch_albert,
    "bart": arch_bart,
    "t5-encoder": arch_t5_encoder,
    "t5": arch_t5,
    "gpt2": arch_gpt2,
    "gpt-neox": arch_gpt_neox,
    "opt": arch_opt,
    "bloom": arch_bloom,
    "falcon": arch_falcon,
    "phi3": arch_phi3,
    "llama": arch_llama,
    "clip-text": arch_clip_text,
    "clip-vision": arch_clip_vision,
    "clip": arch_clip,
    "vit": arch_vit,
    "swin": arch_swin,
    "videomae": arch_videomae,
    "convnext": arch_convnext,
    "resnet": arch_resnet,
    "whisper": arch_whisper,
    "wav2vec2": arch_wav2vec2,
}
"""Family name → seeded builder of a tiny random-weight model (``tests/test_arch_matrix.py``)."""
