"""The Ascend roofline estimate: tile padding, free views, conv and attention GEMMs, and the
labels that keep it from reading as a measurement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgery.backends.ascend_estimate import (
    ASCEND_910,
    DeviceSpec,
    estimate,
    estimate_speedup,
)
from surgery.inputs import Inputs

# 1 GFLOP/s and 1 GB/s: times in ms read as FLOPs or bytes / 1e6.
TOY = DeviceSpec("toy", peak_flops=1e9, bandwidth=1e9, tile=16, source="a test's figures")


def _pad(n: int) -> int:
    return max(16, math.ceil(n / 16) * 16)


def test_linear_is_one_padded_gemm_bound_by_the_slower_roof() -> None:
    x = torch.randn(10, 64)
    est = estimate(nn.Linear(64, 48), Inputs((x,), {}), TOY)
    flops = 2 * 16 * 64 * 48
    moved = (10 * 64 + 48 * 64 + 48 + 10 * 48) * 2  # x, weight, bias, y at 2 bytes
    assert est.matrix_flops == flops and est.bytes_moved == moved
    assert est.matrix_ms == pytest.approx(max(flops, moved) / 1e6)
    assert est.other_ms == 0.0 and est.ops == 1


@pytest.mark.parametrize("rank", [1, 8, 12, 16, 17, 40])
def test_factor_ranks_cost_whole_tiles(rank: int) -> None:
    """Ranks inside one tile cost the same cube work; one more rank costs another tile."""
    factored = nn.Sequential(nn.Linear(64, rank, bias=False), nn.Linear(rank, 64, bias=False))
    est = estimate(factored, Inputs((torch.randn(32, 64),), {}), TOY)
    assert est.matrix_flops == 2 * (2 * 32 * 64 * _pad(rank))


class _Views(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        y = x.view(4, 8, 16).transpose(1, 2).permute(0, 2, 1).reshape(4, 128)
        return y.unsqueeze(0).squeeze(0)[:, :64]


def test_views_cost_nothing_and_elementwise_ops_are_memory_bound() -> None:
    assert estimate(_Views(), Inputs((torch.randn(32, 16),), {}), TOY).ops == 0
    est = estimate(nn.GELU(), Inputs((torch.randn(1000),), {}), TOY)
    assert est.matrix_ms == 0 and est.other_ms == pytest.approx(2 * 1000 * 2 / 1e6)


def test_integer_tensors_keep_their_width() -> None:
    emb = nn.Embedding(10, 16)
    est = estimate(emb, Inputs((torch.zeros(4, 5, dtype=torch.long),), {}), TOY)
    assert est.bytes_moved == 10 * 16 * 2 + 20 * 8 + 20 * 16 * 2


def test_convolution_is_its_im2col_gemm() -> None:
    conv = nn.Conv2d(6, 10, 3, padding=1, groups=2, bias=False)
    est = estimate(conv, Inputs((torch.randn(2, 6, 5, 5),), {}), TOY)
    rows, k, cols = 2 * 5 * 5, 3 * 9, 5  # per group: (N·H·W) × (C/G·k²) × (O/G)
    assert est.matrix_flops == 2 * 2 * _pad(rows) * _pad(k) * _pad(cols)
    up = nn.ConvTranspose2d(4, 6, 2, stride=2, bias=False)
    est = estimate(up, Inputs((torch.randn(1, 4, 3, 3),), {}), TOY)
    assert est.matrix_flops == 2 * _pad(1 * 3 * 3) * _pad(4 * 4) * _pad(6)


class _Attention(nn.Module):
    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def test_fused_attention_is_two_batched_gemms() -> None:
    q, k, v = torch.randn(2, 3, 20, 8), torch.randn(2, 3, 24, 8), torch.randn(2, 3, 24, 40)
    est = estimate(_Attention(), Inputs((q, k, v), {}), TOY)
    scores = 2 * 6 * _pad(20) * _pad(8) * _pad(24)
    values = 2 * 6 * _pad(20) * _pad(24) * _pad(40)
    assert est.matrix_flops == scores + values


def test_speedup_estimate_is_labelled_and_restores_training_mode() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)).train()
    low = nn.Sequential(
        nn.Linear(512, 64), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 64), nn.Linear(64, 512)
    )
    est = estimate_speedup(dense, low, Inputs((torch.randn(256, 512),), {}), ASCEND_910)
    assert dense.training and est.speedup > 1
    text = str(est)
    assert text.startswith("Ascend 910 estimate") and "not a measurement" in text
    assert est.as_dict()["kind"] == "estimate (roofline), not a measurement"
