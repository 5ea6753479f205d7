"""Tiny models shared by tests: importable factories (``tests.helpers_models:tiny_mlp``)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
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
